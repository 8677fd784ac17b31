"""The ranges of `eval` and `infer`'s numeric flags: the recipe's own validators, not a second copy of them.

A flag that means the same as a recipe key accepts exactly what that key accepts: `--temperature` is
`generation.temperature` (> 0, finite), `--top-p` is `generation.top_p` (0 < p <= 1), `--max-new-tokens` is
`generation.max_completion_tokens` (1 to the model's context), and so on (`FLAGS`). The value is assigned to
a recipe section with pydantic's assignment validation on (the fields' own ranges), then checked against the
key's limits in recipe_bounds.py, so a change of a range in either changes the flag's range too. Without
this, `eval --sample --temperature 0` divided the logits by zero (NaN probabilities), `--top-p -1` decoded
greedily while the summary said "sampled", `infer --max-new-tokens 0` ended in a traceback, and
`--max-new-tokens 40000` (past the model's context) was accepted.
"""

from __future__ import annotations

from pydantic import ValidationError

from .eval_protocols import EvalError
from .recipe_bounds import BOUNDS, bound_problem

# parameter name -> (flag as the user typed it, recipe section, section key, field)
FLAGS: dict[str, tuple[str, str, str]] = {
    "max_new_tokens": ("--max-new-tokens", "generation", "max_completion_tokens"),
    "temperature": ("--temperature", "generation", "temperature"),
    "top_p": ("--top-p", "generation", "top_p"),
    "top_k": ("top_k", "generation", "top_k"),
    "max_prompt_tokens": ("max_prompt_tokens", "generation", "max_prompt_tokens"),
    "max_audio_seconds": ("--max-audio-seconds", "data", "max_audio_seconds"),
    "max_pixels": ("--max-pixels", "data", "max_pixels"),
    "limit": ("--limit", "data", "limit_valid_rows"),
    "max_bad_fraction": ("max_bad_fraction", "data", "max_bad_fraction"),
    # rows x samples are decoded together, as grpo.rollout_batch_size completions are in training
    "batch_size": ("--batch-size", "grpo", "rollout_batch_size"),
    # data synth's and demo's --seed seeds numpy's generators and becomes the demo recipe's schedule.seed
    "data_seed": ("--seed", "schedule", "seed"),
}

# torch.manual_seed takes a 64-bit value (signed or unsigned); the recipe's schedule.seed has no bound.
SEED_RANGE = (-(2**63), 2**64 - 1)


class FlagRangeError(EvalError):
    """A numeric flag outside its range; the message names the flag, the range and the recipe key."""


def check_flag(name: str, value) -> None:
    """Raise FlagRangeError (one line) when `value` is outside the range of parameter `name` (a key of FLAGS)."""
    from . import recipe

    flag, section_key, field = FLAGS[name]
    section_class = type(recipe.Recipe.model_fields[section_key].default_factory())
    section = section_class.model_construct()
    try:
        setattr(section, field, value)  # the sections validate assignments (ConfigDict(validate_assignment=True))
    except ValidationError as err:
        reason = err.errors()[0]["msg"]
        raise FlagRangeError(
            f"{flag} {value!r}: {reason[:1].lower() + reason[1:]} (the range of the recipe's {section_key}.{field}). "
            f"Fix: pass {flag} within that range."
        ) from None
    key = f"{section_key}.{field}"
    problem = bound_problem(key, getattr(section, field)) if key in BOUNDS else None  # the recipe's upper limits
    if problem:
        raise FlagRangeError(f"{flag} {value!r}: {problem.rsplit('; ', 1)[0]}. "
                             f"Fix: pass {flag} within that limit.")


def check_flags(**values) -> None:
    """check_flag for each given parameter; None means "not given" and is skipped."""
    for name, value in values.items():
        if value is None:
            continue
        if name == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
                raise FlagRangeError(f"--seed {value!r}: expected an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} "
                                     "(torch.manual_seed's range). Fix: pass a smaller --seed.")
            continue
        if name == "samples":  # completions per row, as grpo.group_size is per prompt (1 allowed: greedy or one pass)
            most = int(BOUNDS["grpo.group_size"][1])
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise FlagRangeError(f"--samples {value!r}: expected an integer from 1 to {most} (the limit of the "
                                     "recipe's grpo.group_size, completions per prompt). Fix: pass --samples within that range.")
            continue
        check_flag(name, value)
