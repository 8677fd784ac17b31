"""What to turn when a recipe does not fit: the knobs the planner tries, and the search over them.

Each suggestion is a set of recipe changes that the estimate (memory_estimate.py) says fits, written as
`key=value` overrides that can be pasted after `echoink-lite plan` or `train`. Memory-only knobs (batch
sizes, the log-prob chunk, checkpointing) come before knobs that change the training math (quantization,
completion length, LoRA rank, group size).

The batch knobs follow the engine's meaning of them (recipe.py checks the same rules):
- `grpo.micro_batch_size`: completions of ONE group per loss pass (the group's prompt runs once per pass),
  so the values worth trying are the divisors of group_size;
- `grpo.rollout_batch_size`: rows decoded together in one static KV cache, whole groups or a slice of one
  group, so the values are multiples of group_size (fewer groups per decode batch) and then divisors of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .memory_estimate import DEFAULT_TEXT_TOKENS, MemoryEstimate, estimate_memory
from .recipe import Recipe, RecipeError, recipe_from_dict

GROUP_SIZES = (12, 8, 4)
COMPLETION_TOKENS = (640, 512, 384, 256)
LORA_RANKS = (8, 4)
LOGPROB_CHUNKS = (128, 64, 32)
# In the combined search a knob value counts as a gain only if it lowers the summed phases by this much (GiB).
MIN_GAIN_GIB = 0.05
# A knob with more than MAX_VALUES values is thinned so that each one tried is at most VALUE_STEP of the last
# one tried: a decode batch of 65536 rows would otherwise try 32767 sizes (minutes), neighbours that differ by
# nothing. Shorter lists (the paper recipes') are tried whole, so the mildest value that fits is found.
MAX_VALUES = 32
VALUE_STEP = 0.75


@dataclass
class Suggestion:
    """One way to make a recipe fit: recipe changes [(key, old, new)], and the estimate with them (GiB)."""

    changes: list[tuple[str, Any, Any]]
    saves_gb: float
    total_gb: float
    changes_math: bool

    @property
    def overrides(self) -> list[str]:
        """The changes as `key=value` overrides for the CLI or `load_recipe`."""
        return [f"{k}={_show(new)}" for k, _, new in self.changes]

    def __str__(self) -> str:
        what = ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, old, new in self.changes)
        extra = " (changes the training math)" if self.changes_math else ""
        return f"{what} saves {self.saves_gb:.1f} GiB (total {self.total_gb:.1f} GiB){extra}"


@dataclass(frozen=True)
class Knob:
    """A recipe key the search may turn: its values from mildest to strongest."""

    key: str
    values: list[Any]
    changes_math: bool


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, bool) else str(v)


def divisors_below(n: int, below: int) -> list[int]:
    """Divisors of n smaller than `below`, largest first (found up to sqrt(n): any n takes milliseconds)."""
    found: set[int] = set()
    x = 1
    while x * x <= n:
        if n % x == 0:
            found.update((x, n // x))
        x += 1
    return sorted((d for d in found if d < below), reverse=True)


def thinned(values: list[Any]) -> list[Any]:
    """Numeric knob values (mildest first, falling); past MAX_VALUES of them, only values at most VALUE_STEP
    of the last one kept (the strongest value is always kept)."""
    if len(values) <= MAX_VALUES or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return values
    kept = [values[0]]
    for v in values[1:-1]:
        if v <= kept[-1] * VALUE_STEP:
            kept.append(v)
    return kept + [values[-1]]


def micro_batch_sizes(recipe: Recipe) -> list[int]:
    """Smaller micro-batches than the recipe's: divisors of group_size (a micro-batch is part of one group)."""
    g = recipe.grpo
    return divisors_below(g.group_size, min(g.micro_batch_size, g.group_size))


def rollout_batch_sizes(recipe: Recipe) -> list[int]:
    """Smaller decode batches than the recipe's: fewer whole groups, then slices of one group."""
    g = recipe.grpo
    rows = min(g.rollout_batch_size, recipe.derived()["completions_per_process"])  # the rows actually decoded
    if rows >= g.group_size:
        return [m * g.group_size for m in range(rows // g.group_size - 1, 0, -1)] + divisors_below(g.group_size, g.group_size)
    return divisors_below(g.group_size, rows)


def candidate_knobs(recipe: Recipe) -> list[Knob]:
    """The knobs in the order they are tried, each with the values that would lower the estimate."""
    g, gen, q = recipe.grpo, recipe.generation, recipe.quantization
    knobs = [
        Knob("grpo.micro_batch_size", micro_batch_sizes(recipe), False),
        Knob("grpo.rollout_batch_size", rollout_batch_sizes(recipe), False),
        Knob("grpo.logprob_chunk_tokens", [c for c in LOGPROB_CHUNKS if c < g.logprob_chunk_tokens], False),
    ]
    if not recipe.model.gradient_checkpointing:
        knobs.append(Knob("model.gradient_checkpointing", [True], False))
    if not q.load_in_4bit:
        knobs.append(Knob("quantization.load_in_4bit", [True], True))
    else:
        for key in ("quantize_vision_tower", "quantize_audio_tower", "quantize_lm_head", "double_quant"):
            if not getattr(q, key):
                knobs.append(Knob(f"quantization.{key}", [True], True))
    knobs += [
        Knob("generation.max_completion_tokens", [c for c in COMPLETION_TOKENS if c < gen.max_completion_tokens], True),
        Knob("lora.r", [r for r in LORA_RANKS if r < recipe.lora.r], True),
        Knob("grpo.group_size", [x for x in GROUP_SIZES if x < g.group_size], True),
    ]
    return [Knob(k.key, thinned(k.values), k.changes_math) for k in knobs if k.values]


def recipe_value(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def with_valid_batches(recipe: Recipe, changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` plus what a smaller group needs to stay a valid recipe: a micro-batch that divides the
    group, a decode batch of whole groups or a slice of one. Each added change is as mild as it can be."""
    group = changes.get("grpo.group_size", recipe.grpo.group_size)
    out = dict(changes)
    micro = out.get("grpo.micro_batch_size", recipe.grpo.micro_batch_size)
    if micro < group and group % micro:
        out["grpo.micro_batch_size"] = divisors_below(group, micro)[0]
    rows = out.get("grpo.rollout_batch_size", recipe.grpo.rollout_batch_size)
    if rows % group and group % rows:
        out["grpo.rollout_batch_size"] = (rows // group) * group if rows > group else divisors_below(group, rows)[0]
    return {k: v for k, v in out.items() if v != recipe_value(recipe, k)}


def recipe_with(recipe: Recipe, changes: dict[str, Any]) -> Recipe | None:
    """The recipe with `changes` applied, or None if that is not a valid recipe."""
    data = recipe.model_dump(mode="json")
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    try:
        return recipe_from_dict(data, "planner alternative")
    except RecipeError:
        return None


def suggest_changes(recipe: Recipe, est: MemoryEstimate, *, config: dict[str, Any], prompt_tokens: int | None = None,
                    text_tokens: int = DEFAULT_TEXT_TOKENS) -> list[Suggestion]:
    """Changes that make the recipe fit, memory-only ones first:
    1. every single knob that fits alone, at its mildest fitting value;
    2. if no memory-only knob fits alone, the memory-only knobs turned together (one suggestion), before
       the single knobs that change the training math;
    3. if no knob fits alone, all knobs turned together (one suggestion).
    An empty list: nothing the planner tries fits."""
    knobs = candidate_knobs(recipe)
    math_keys = {k.key for k in knobs if k.changes_math}

    def estimate(changes: dict[str, Any]) -> MemoryEstimate | None:
        alt = recipe_with(recipe, with_valid_batches(recipe, changes))
        return None if alt is None else estimate_memory(alt, est.gpu_memory_gb, config=config, prompt_tokens=prompt_tokens,
                                                        text_tokens=text_tokens, headroom=est.headroom)

    def total(changes: dict[str, Any]) -> float | None:
        e = estimate(changes)
        return None if e is None else e.total_gb

    def phase_sum(changes: dict[str, Any]) -> float | None:
        e = estimate(changes)
        return None if e is None else e.phases["rollout"] + e.phases["training"] + e.phases["weights"] + e.phases["lora_state"]

    def suggestion(changes: dict[str, Any]) -> Suggestion:
        full = with_valid_batches(recipe, changes)
        new_total = total(changes)
        return Suggestion([(k, recipe_value(recipe, k), v) for k, v in full.items()], est.total_gb - new_total, new_total,
                          any(k in math_keys for k in full))

    def combined(knobs: list[Knob]) -> dict[str, Any] | None:
        """Several of `knobs` turned together until the total fits, each as mildly as it can be; None if
        they cannot fit. The two phases are a max(): lowering one phase's knob alone can show no gain while
        the other phase dominates, so knobs are turned in order by how much they lower the SUM of the
        phases, then every turned knob is backed off again as far as the total still fits."""
        changes: dict[str, Any] = {}
        current = phase_sum({}) or 0.0
        for knob in knobs:
            trials = [(v, phase_sum(dict(changes, **{knob.key: v}))) for v in knob.values]
            trials = [(v, t) for v, t in trials if t is not None]
            if not trials or min(t for _, t in trials) >= current - MIN_GAIN_GIB:
                continue
            best = min(t for _, t in trials)
            value, current = next((v, t) for v, t in trials if t <= best + MIN_GAIN_GIB)
            changes[knob.key] = value
            t = total(changes)
            if t is not None and t <= est.budget_gb:
                break
        else:
            return None
        order = {k.key: i for i, k in enumerate(knobs)}
        values_of = {k.key: k.values for k in knobs}
        for key in sorted(changes, key=lambda k: (k not in math_keys, -order[k])):  # math knobs first, last turned first
            values = values_of[key]
            for milder in [recipe_value(recipe, key)] + values[: values.index(changes[key])]:
                trial = dict(changes)
                if milder == recipe_value(recipe, key):
                    del trial[key]
                else:
                    trial[key] = milder
                t = total(trial)
                if t is not None and t <= est.budget_gb:
                    changes = trial
                    break
        return changes

    singles: list[Suggestion] = []
    for knob in knobs:
        for value in knob.values:
            t = total({knob.key: value})
            if t is not None and t <= est.budget_gb:
                singles.append(suggestion({knob.key: value}))
                break
    singles.sort(key=lambda s: s.changes_math)  # stable: memory-only knobs first, in trial order
    if singles and not singles[0].changes_math:
        return singles
    # No memory-only knob fits alone: memory-only knobs together come before any change of the training math.
    memory_only = combined([k for k in knobs if not k.changes_math])
    if memory_only:
        return [suggestion(memory_only)] + singles
    if singles:
        return singles
    everything = combined(knobs)
    return [suggestion(everything)] if everything else []
