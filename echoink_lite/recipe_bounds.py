"""The largest (and a few smallest) values a recipe may hold, each with why and what to do instead.

The fields of recipe.py carry their lower bounds (`ge=1`, `gt=0`). Without upper bounds, a typo such as
`grpo.group_size=1000000000000` passed validation and then made `plan` search for minutes, `train`
allocate a KV cache the size of the machine, or the data order hold billions of steps. The limits below are
far beyond any run on one GPU and far below where the kit breaks; a value outside them is refused when the
recipe is validated (`recipes validate`, `plan`, `train`), with a message that names the key, the limit
and the fix.

The context limits come from Qwen2.5-Omni-7B's thinker config (`text_config.max_position_embeddings`
32768, echoink_lite/configs/qwen2_5_omni_7b_thinker.json): a prompt plus its completion must fit it.
"""

from __future__ import annotations

from typing import Any

# Qwen2.5-Omni-7B thinker: text_config.max_position_embeddings.
CONTEXT_TOKENS = 32768
# Qwen2.5-Omni: 25 audio tokens per second of audio (memory_estimate.AUDIO_TOKENS_PER_SECOND), 28 x 28 pixels
# per visual token (media.py); the fewest samples that make one audio token (media.MIN_AUDIO_SAMPLES at 16 kHz).
AUDIO_TOKENS_PER_SECOND = 25
PIXELS_PER_VISUAL_TOKEN = 28 * 28
MIN_AUDIO_SECONDS = (2 * 160 + 1) / 16000

# key -> (lowest or None, highest or None, why: what the value is, and why the limit sits there)
BOUNDS: dict[str, tuple[float | None, float | None, str]] = {
    "grpo.prompts_per_step": (None, 65536, "prompts per optimizer step (the paper: 8)"),
    "grpo.group_size": (None, 1024, "completions per prompt (the paper: 16; DeepSeekMath's GRPO: 64)"),
    "grpo.micro_batch_size": (None, 65536, "completions per loss pass"),
    "grpo.rollout_batch_size": (None, 65536, "completions decoded together"),
    "grpo.logprob_chunk_tokens": (None, CONTEXT_TOKENS, "completion tokens per log-prob chunk"),
    "lora.r": (None, 4096, "the LoRA rank (the 7B's hidden size is 3584; a rank above a layer's width adds nothing)"),
    "data.max_audio_seconds": (MIN_AUDIO_SECONDS, CONTEXT_TOKENS / AUDIO_TOKENS_PER_SECOND,
                               "the audio cut in seconds (the paper: 10)"),
    "data.max_pixels": (None, CONTEXT_TOKENS * PIXELS_PER_VISUAL_TOKEN,
                        f"the image pixel cap ({PIXELS_PER_VISUAL_TOKEN} pixels per visual token; the paper: 200704)"),
    "generation.max_prompt_tokens": (None, CONTEXT_TOKENS, f"the prompt cap (the model's context is {CONTEXT_TOKENS} tokens)"),
    "generation.max_completion_tokens": (None, CONTEXT_TOKENS,
                                         f"the completion budget (the model's context is {CONTEXT_TOKENS} tokens; the paper: 768)"),
    "schedule.epochs": (None, 1000, "passes over the training data"),
    "schedule.learning_rate": (None, 1.0, "the peak learning rate (the paper: 1e-6, a full fine-tune; the kit's "
                                          "recipes: 1e-5 for the 7B's LoRA, 3e-3 for the tiny CPU model)"),
    "schedule.seed": (0, 2**32 - 1, "the seed (numpy's generators take seeds from 0)"),
}
# Why a limit, where the value's description alone does not say it.
WHY = {
    ("data.max_audio_seconds", "low"): "shorter audio never makes one audio token (321 samples at 16 kHz), so every "
                                       "row would be skipped",
    ("data.max_audio_seconds", "high"): f"longer audio alone ({AUDIO_TOKENS_PER_SECOND} tokens per second) overflows "
                                        f"the model's {CONTEXT_TOKENS}-token context",
    ("data.max_pixels", "high"): f"a larger image alone overflows the model's {CONTEXT_TOKENS}-token context",
}


# The projections of a Qwen2.5-Omni thinker decoder layer (Qwen2 attention and MLP); modeling.add_lora puts LoRA
# on these names inside the language model's layers only, and PEFT raises a traceback for a name that matches
# nothing there.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _value(recipe: Any, key: str) -> Any:
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def bound_problem(key: str, value: Any) -> str | None:
    """One message when `value` of `key` (a key of BOUNDS) is outside its limits, else None. The recipe's
    validation and the CLI flags that stand for these keys (flag_ranges.py) both use it."""
    low, high, what = BOUNDS[key]
    if value is None:
        return None
    if high is not None and value > high:
        why = WHY.get((key, "high"), "")
        limit = f"{int(high):,}" if float(high).is_integer() else f"{high:g}"  # 4,294,967,295, not 4.29497e+09
        return f"{key}={value:,} is over its limit {limit}, {what}{': ' + why if why else ''}; lower it"
    if low is not None and value < low:
        why = WHY.get((key, "low"), "")
        return f"{key}={value:g} is under its limit {low:g}, {what}{': ' + why if why else ''}; raise it"
    return None


def bound_problems(recipe: Any) -> list[str]:
    """One message per value of `recipe` outside BOUNDS, a prompt + completion over the context, LoRA targets
    that are not the language model's projections, and rewards that are all weighted 0 (a run on nothing)."""
    problems = [p for p in (bound_problem(key, _value(recipe, key)) for key in BOUNDS) if p]
    unknown = [t for t in recipe.lora.target_modules if t not in LORA_TARGETS]
    if unknown or not recipe.lora.target_modules:
        what = f"names {', '.join(map(repr, unknown))}, which are not" if unknown else "is empty; list some of"
        problems.append(f"lora.target_modules {what} the language model's projections ({', '.join(LORA_TARGETS)}); "
                        "the towers never get LoRA")
    if recipe.grpo.rewards and not any(recipe.grpo.rewards.values()):
        problems.append("every weight in grpo.rewards is 0: every completion gets reward 0 and no step learns anything; "
                        "give at least one reward a weight, e.g. {accuracy: 1.0, format: 1.0}")
    gen = recipe.generation
    if not problems and gen.max_prompt_tokens + gen.max_completion_tokens > CONTEXT_TOKENS:
        problems.append(f"generation.max_prompt_tokens={gen.max_prompt_tokens} + generation.max_completion_tokens="
                        f"{gen.max_completion_tokens} is over the model's {CONTEXT_TOKENS}-token context; lower one of them")
    return problems
