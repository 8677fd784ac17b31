"""The GRPO variant keys of a recipe: TRL 1.16's names, their aliases, and the combinations refused.

EchoInk-R1 trains with one update per rollout, a per-sequence mean and group-scaled advantages. TRL 1.16
(trl/trainer/grpo_config.py, `GRPOConfig`) names the variants that followed: `loss_type` (grpo, bnpo,
dr_grpo, dapo, cispo, sapo), `importance_sampling_level` (token, or sequence = GSPO), `num_iterations` with
`epsilon` / `epsilon_high`, `scale_rewards` (group, batch, none) and `mask_truncated_completions`. The recipe
uses those names (recipe.py, `GRPOSection`); the formulas are in loss_variants.py. Kept apart from recipe.py
and without torch so `recipes validate` stays light.
"""

from __future__ import annotations

from typing import Any

# The kit's first names for two of TRL's loss types; recipes written with them keep working.
LOSS_TYPE_ALIASES = {"sequence": "grpo", "token": "dapo"}
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # -min(r A, clip(r, 1 - eps, 1 + eps_high) A)

# Keys added with the variants, and the value every run before them used. A checkpoint written before
# they existed lacks them; resuming it with these values is the same math (see `upgrade_saved_math`).
VARIANT_DEFAULTS: dict[str, Any] = {
    "grpo.num_iterations": 1,
    "grpo.epsilon": 0.2,
    "grpo.epsilon_high": None,
    "grpo.importance_sampling_level": "token",
    "grpo.scale_rewards": "group",
    "grpo.mask_truncated_completions": False,
    "grpo.skip_zero_advantage_groups": "auto",
    "grpo.sapo_temperature_pos": 1.0,
    "grpo.sapo_temperature_neg": 1.05,
}


def canonical_loss_type(value: Any) -> Any:
    """TRL's name for a loss type written with an alias; anything else unchanged (the schema judges it)."""
    return LOSS_TYPE_ALIASES.get(value, value) if isinstance(value, str) else value


def skips_zero_advantage(grpo) -> bool:
    """Whether the loss pass skips micro-batches whose advantages are all exactly 0. `auto` = when beta is 0:
    their policy gradient is exactly 0 for every loss type (each token's loss is a multiple of its
    advantage), so the update is the same. With beta > 0 skipping also drops their KL term: only on request."""
    setting = grpo.skip_zero_advantage_groups
    return grpo.beta == 0 if setting == "auto" else bool(setting)


def upper_clip(grpo) -> float:
    """TRL's epsilon_high: the upper clipping epsilon (cispo: the ratio cap), `epsilon` when unset."""
    return grpo.epsilon if grpo.epsilon_high is None else grpo.epsilon_high


def variant_problem(recipe) -> str | None:
    """The first combination of GRPO variant keys that makes no sense, as one line naming the fix."""
    g = recipe.grpo
    if g.loss_type == "cispo":
        if g.epsilon_high is None or g.epsilon_high < 1:
            have = f"unset (TRL then takes epsilon={g.epsilon})" if g.epsilon_high is None else f"{g.epsilon_high}"
            return (f"grpo.loss_type=cispo caps each token's ratio at grpo.epsilon_high (TRL's epsilon_high, the "
                    f"ScaleRL paper's epsilon_max), which is {have}: a cap below 1 scales every gradient down; "
                    "set grpo.epsilon_high=5.0 (ScaleRL's value) or another value of at least 1")
    elif g.epsilon_high is not None and g.epsilon_high < g.epsilon:
        return (f"grpo.epsilon_high={g.epsilon_high} is below grpo.epsilon={g.epsilon}: the ratio would be clipped to "
                f"[{1 - g.epsilon:g}, {1 + g.epsilon_high:g}], tighter above than below; raise epsilon_high "
                "(DAPO's clip-higher uses 0.28 with epsilon 0.2) or lower epsilon")
    return None


def math_keys(recipe) -> set[str]:
    """Fields that are memory knobs for most recipes but change the math of this one: bnpo divides each
    micro-batch's loss by that micro-batch's own token count (TRL's "local batch"), so its size matters."""
    return {"grpo.micro_batch_size"} if recipe.grpo.loss_type == "bnpo" else set()


def upgrade_saved_math(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved math fields in today's names: aliases resolved, and the variant keys a checkpoint
    written before them lacks filled with the values it ran with."""
    if not saved:
        return saved
    out = dict(saved)
    if "grpo.loss_type" in out:
        out["grpo.loss_type"] = canonical_loss_type(out["grpo.loss_type"])
    for key, value in VARIANT_DEFAULTS.items():
        out.setdefault(key, value)
    return out


def describe(recipe) -> str:
    """One line for the plan table: the loss and its update rule."""
    g = recipe.grpo
    parts = [f"{g.loss_type}", f"{g.importance_sampling_level}-level ratio", f"beta {g.beta}",
             f"advantages scaled by {g.scale_rewards}" if g.scale_rewards != "none" else "advantages not scaled"]
    if g.num_iterations > 1:
        parts.append(f"{g.num_iterations} updates per rollout, clip [{1 - g.epsilon:g}, {1 + upper_clip(g):g}]"
                     if g.loss_type in CLIPPED_LOSS_TYPES else f"{g.num_iterations} updates per rollout")
    if g.mask_truncated_completions:
        parts.append("truncated completions masked")
    parts.append("zero-advantage micro-batches skipped" + (" (drops their KL: approximate)" if g.beta > 0 else "")
                 if skips_zero_advantage(g) else "every micro-batch runs")
    return ", ".join(parts)
