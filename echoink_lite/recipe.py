"""Typed training recipes: the schema, YAML loading, `key=value` overrides and cross-field checks.

A recipe is the whole description of a run. Users state `grpo.prompts_per_step` and `grpo.group_size`;
micro-batches, completions per step and the number of steps are derived (see `Recipe.derived`) so that
nobody has to solve the batch-size / num_generations divisibility puzzle by hand.

Why pydantic: unknown keys are errors (a typo in a key must not silently fall back to a default), every
field carries a one-line description that `echoink-lite recipes explain` prints (recipe_reference.py), and
checks that involve several fields live next to the fields. Fields are strict: `lora.r: true` or `lora.r: "16"`
is an error, not r=1 or r=16 (an int is still a float). Recipes are read with PyYAML's safe loader only, made strict
(strict_yaml.py: a repeated key is an error naming both lines; `1e-6` is a number).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .grpo_options import canonical_loss_type, math_keys, upgrade_saved_math, variant_problem

from . import strict_yaml
from .attention import refusal as attention_refusal
from .recipe_bounds import bound_problems
from .rewards import reward_problem


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the field and the fix."""


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in any number (a learning rate, a reward weight) is an error here,
    # not NaN losses a few steps into the run. strict=True: no coercion, so `lora.r: true` is not r=1, `16.5` is
    # not 16 and "0.1" is not a number (pydantic's strict mode still takes an int for a float field).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)


class ModelSection(_Section):
    name_or_path: str = Field("Qwen/Qwen2.5-Omni-7B", description="Hub id or local folder of a full Qwen2.5-Omni or a thinker-only checkpoint.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin the base weights.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Compute dtype of unquantized weights and activations; bfloat16 needs an Ampere+ GPU.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention kernel: sdpa or eager, both exact (tests/test_attention_backends.py); flash_attention_2 is refused until a GPU test proves it.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward: much less memory, about 30% slower.")


class QuantizationSection(_Section):
    load_in_4bit: bool = Field(True, description="Store the language model in 4 bits (QLoRA). False = bf16 LoRA, about 4x more weight memory.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 is the QLoRA paper's choice.")
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.4 bit/param).")
    quantize_audio_tower: bool = Field(False, description="Quantize the audio encoder too (saves ~1 GB, may cost accuracy).")
    quantize_vision_tower: bool = Field(False, description="Quantize the vision encoder too (saves ~1 GB, may cost accuracy).")
    quantize_lm_head: bool = Field(False, description="Quantize lm_head (saves ~0.8 GB; log-probs get noisier).")


class LoraSection(_Section):
    r: int = Field(16, ge=1, description="LoRA rank; higher = more trainable parameters and memory.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Projection names inside the language model's layers; towers never get LoRA.",
    )


class DataSection(_Section):
    train: str = Field("data/avqa/train", description="AVQA-layout split folder, its JSON list, or a JSON Lines file.")
    valid: str | None = Field("data/avqa/valid", description="Validation split (same forms as `train`); None to skip.")
    max_audio_seconds: float = Field(10.0, gt=0, description="Audio is cut to its first N seconds (25 audio tokens per second); higher = longer prompts.")
    max_pixels: int = Field(256 * 28 * 28, ge=4 * 28 * 28, description="Image pixel cap; 28*28 pixels = one visual token, so 256*28*28 = at most 256 tokens.")
    max_bad_fraction: float = Field(0.02, ge=0.0, le=1.0, description="Stop if more than this fraction of rows is unusable: before training (the scan), and during it counting rows skipped when loaded.")
    limit_train_rows: int | None = Field(None, ge=1, description="Use only the first N usable training rows (quick trials).")
    limit_valid_rows: int | None = Field(None, ge=1, description="Use only the first N usable validation rows.")


class GRPOSection(_Section):
    prompts_per_step: int = Field(8, ge=1, description="Prompts per optimizer step (the paper: 8). With the data size it fixes the number of steps.")
    group_size: int = Field(16, ge=2, description="Completions sampled per prompt (the paper: 16); higher = better advantage estimates, more rollout time and memory.")
    micro_batch_size: int = Field(4, ge=1, description="Completions of one group per loss forward/backward (the group's prompt runs once per micro-batch); higher = fewer prompt passes, more activation memory.")
    rollout_batch_size: int = Field(16, ge=1, description="Completions decoded together in one static KV cache; higher = faster rollouts, more KV-cache memory (rows x (prompt + completion tokens) x 56 KiB on the 7B).")
    beta: float = Field(0.001, ge=0.0, description="KL penalty weight (the paper: 0.001, k3 estimator). 0 skips the reference forward pass.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = Field("grpo", description="TRL's loss types (loss_variants.py has each formula): grpo = per-completion token mean, then mean over the step's completions (the paper; alias 'sequence'); bnpo = token mean per micro-batch; dr_grpo = token sum / (max_completion_tokens x completions); dapo = token mean over the whole step (alias 'token'); cispo = dapo with a capped, detached ratio; sapo = grpo with a soft gate instead of clipping.")
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description="Ratio per token, or per completion from its mean token log-ratio (GSPO).")
    num_iterations: int = Field(1, ge=1, description="Updates per rollout (mu). 1 = the paper: the ratio is exactly 1 and no old log-probs are computed; >1 reuses the step's completions, clipped against the rollout policy's log-probs.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clipping epsilon: the ratio is clipped to [1 - epsilon, 1 + epsilon_high] (matters with num_iterations > 1).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping epsilon (null = epsilon; DAPO: 0.28). For cispo, the cap on the ratio itself (ScaleRL: 5.0).")
    sapo_temperature_pos: float = Field(1.0, gt=0, description="sapo's gate temperature for tokens with a positive advantage.")
    sapo_temperature_neg: float = Field(1.05, gt=0, description="sapo's gate temperature for the other tokens.")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Advantage = (r - group mean) / (std + advantage_eps) with the std of the group (the paper) or of the whole step ('batch'), or r - group mean ('none', Dr. GRPO).")
    advantage_eps: float = Field(1e-4, gt=0, description="Added to the std the advantages are divided by.")
    mask_truncated_completions: bool = Field(False, description="A completion that hit max_completion_tokens without EOS gets no loss (DAPO); its reward still counts in its group's advantages.")
    skip_zero_advantage_groups: bool | Literal["auto"] = Field("auto", description="Skip the loss pass of micro-batches whose advantages are all 0 (groups whose completions all got the same reward). auto = when beta is 0, where it is exact; true with beta > 0 also drops their KL term (an approximation).")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 1.0, "format": 1.0},
        description="Reward name (built-in or 'package.module:function') -> weight; the paper sums accuracy and format.",
    )
    logprob_chunk_tokens: int = Field(256, ge=16, description="Completion tokens turned into vocabulary logits at once in the loss pass; lower = less memory, more passes.")
    max_nonfinite_steps: int = Field(3, ge=1, description="Stop after this many steps in a row whose loss or gradients are not finite.")


    @field_validator("loss_type", mode="before")
    @classmethod
    def _loss_type_alias(cls, value: Any) -> Any:
        return canonical_loss_type(value)  # 'sequence' and 'token', the kit's first names, still read


class GenerationSection(_Section):
    max_prompt_tokens: int = Field(1024, ge=32, description="Refuse a prompt longer than this (audio + image + text tokens) before the forward pass.")
    max_completion_tokens: int = Field(768, ge=1, description="Completion budget (the paper: 768); higher = more KV cache and activation memory.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts (the paper: 1.0).")
    top_p: float = Field(0.95, gt=0, le=1.0, description="Nucleus sampling for rollouts (the paper: 0.95).")
    top_k: int = Field(50, ge=0, description="Top-k for rollouts (0 disables; the generation default is 50).")
    cuda_graph: bool = Field(True, description="Capture the rollout's decode step as a CUDA graph (CUDA only; falls back to eager by itself). Off = slower decoding, for debugging.")


class ScheduleSection(_Section):
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate of the LoRA parameters.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warm-up (the paper: cosine).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (the paper: 0).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (the paper: 0.01).")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    max_grad_norm: float = Field(5.0, gt=0, description="Gradient clipping norm (the paper: 5).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training prompts (the paper: 1 -> 562 steps).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs for the length of the run).")
    seed: int = Field(42, description="Seeds data order, sampling and LoRA init.")


class CheckpointSection(_Section):
    output_dir: str = Field("runs/echoink-lite", description="Run folder: checkpoints/, metrics.jsonl, curves.png, adapter/.")
    save_every_steps: int = Field(25, ge=1, description="Checkpoint every N optimizer steps.")
    save_every_minutes: float = Field(20.0, gt=0, description="Also checkpoint when this many minutes passed since the last save (Colab runtimes vanish).")
    keep_last: int = Field(3, ge=1, description="Complete checkpoints to keep; older ones are deleted after a new one is complete.")


class LoggingSection(_Section):
    run_name: str | None = Field(None, description="Name shown in logs and trackers.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="Extra trackers (metrics.jsonl is always written).")
    log_completions_every: int = Field(0, ge=0, description="Print one sampled completion every N steps (0 = never).")
    progress: bool = Field(True, description="Show the rich progress bar.")


# Sections and fields that cannot change the math of a run: they may differ on resume.
NON_MATH_FIELDS = {
    "logging",
    "checkpoint.output_dir",
    "checkpoint.save_every_steps",
    "checkpoint.save_every_minutes",
    "checkpoint.keep_last",
    "data.train",
    "data.valid",
    "data.limit_valid_rows",
    "data.max_bad_fraction",
    "grpo.max_nonfinite_steps",
    "grpo.logprob_chunk_tokens",
    "grpo.rollout_batch_size",
    "grpo.micro_batch_size",
    "generation.cuda_graph",
    "model.attn_implementation",
    "model.gradient_checkpointing",
}


class Recipe(_Section):
    """The whole run. Sections mirror the order a run needs them."""

    description: str = Field("", description="Free text: what this recipe is for.")
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @model_validator(mode="after")
    def _cross_field_checks(self, info: ValidationInfo) -> "Recipe":
        problems = bound_problems(self)  # absurd values (recipe_bounds.py) before any check that uses them
        if problems:
            raise ValueError("; ".join(problems))
        g = self.grpo
        if attention_refusal(self.model.attn_implementation):
            raise ValueError(attention_refusal(self.model.attn_implementation))
        if g.micro_batch_size < g.group_size and g.group_size % g.micro_batch_size:
            raise ValueError(
                f"grpo.micro_batch_size={g.micro_batch_size} does not divide group_size={g.group_size}: a micro-batch "
                "holds completions of one group (the prompt runs once per micro-batch); set micro_batch_size to one of "
                f"{_divisors(g.group_size, 64)} (or >= group_size for one micro-batch per group)"
            )
        if g.rollout_batch_size % g.group_size and g.group_size % g.rollout_batch_size:
            raise ValueError(
                f"grpo.rollout_batch_size={g.rollout_batch_size} must be a multiple or a divisor of group_size={g.group_size} "
                f"so every generate call holds whole groups or whole slices of one; try {g.group_size} or {2 * g.group_size}"
            )
        if self.model.dtype == "float16" and self.quantization.load_in_4bit:
            pass  # allowed (T4 GPUs have no bf16), but noted in the plan output
        if self.schedule.warmup_steps and self.schedule.max_steps and self.schedule.warmup_steps >= self.schedule.max_steps:
            raise ValueError(
                f"schedule.warmup_steps={self.schedule.warmup_steps} >= schedule.max_steps={self.schedule.max_steps}: "
                "lower warmup_steps or raise max_steps"
            )
        if not g.rewards:
            raise ValueError("grpo.rewards is empty: list at least one reward, e.g. {accuracy: 1.0, format: 1.0}")
        if (info.context or {}).get("check_rewards", True):
            for name in g.rewards:
                problem = reward_problem(name)
                if problem:
                    raise ValueError(f"grpo.rewards['{name}']: {problem}")
        if self.quantization.quantize_lm_head and not self.quantization.load_in_4bit:
            raise ValueError("quantization.quantize_lm_head needs quantization.load_in_4bit: true")
        problem = variant_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    # ---- derived numbers -------------------------------------------------------------------------
    def derived(self, n_train_rows: int | None = None, world_size: int = 1) -> dict[str, Any]:
        """Everything the user did not have to state, computed from what they did."""
        g = self.grpo
        completions = g.prompts_per_step * g.group_size
        if g.prompts_per_step % world_size:
            raise RecipeError(
                f"grpo.prompts_per_step={g.prompts_per_step} cannot be split over {world_size} processes: each process "
                f"takes whole prompts, so some would idle. Fix: make prompts_per_step a multiple of {world_size}, "
                f"or run a number of processes that divides {g.prompts_per_step}"
            )
        prompts_per_rank = g.prompts_per_step // world_size
        per_rank = prompts_per_rank * g.group_size
        out: dict[str, Any] = {
            "completions_per_step": completions,
            "completions_per_process": per_rank,
            "micro_batches_per_step": prompts_per_rank * math.ceil(g.group_size / min(g.micro_batch_size, g.group_size)),
            "decode_batches_per_step": math.ceil(per_rank / min(g.rollout_batch_size, per_rank)),
            "tokens_per_completion_max": self.generation.max_completion_tokens,
            "rollout_tokens_budget": completions * self.generation.max_completion_tokens,
            "world_size": world_size,
        }
        if n_train_rows is not None and 0 < n_train_rows < g.prompts_per_step:  # a step would repeat prompts, and
            # the loop takes each row once per step: steps of fewer prompts than asked, without a word
            raise RecipeError(f"grpo.prompts_per_step={g.prompts_per_step} is more than the {n_train_rows} usable training "
                              f"rows; lower it to at most {n_train_rows}")
        if n_train_rows is not None:
            # Each epoch is its own permutation cut into steps; its last step takes the prompts left over and is
            # filled up with the epoch's first ones (as the original's data loader: step_data.data_schedule).
            spe = math.ceil(n_train_rows / g.prompts_per_step)
            full, frac = divmod(self.schedule.epochs, 1.0)
            total = int(full) * spe + math.ceil(round(frac * n_train_rows, 6) / g.prompts_per_step)
            out["train_rows"] = n_train_rows
            out["steps_per_epoch"] = spe
            out["total_steps"] = min(total, self.schedule.max_steps) if self.schedule.max_steps else total
            if out["total_steps"] < 1:  # a run of 0 steps would save an untrained adapter and say "done"
                raise RecipeError(f"schedule.epochs={self.schedule.epochs:g} of {n_train_rows} training rows at "
                                  f"{g.prompts_per_step} prompts per step makes 0 optimizer steps; raise schedule.epochs")
        return out

    def train_rows(self) -> tuple[int | None, str]:
        """(usable training rows, where the number comes from), reading `data.train` without opening media;
        (None, why) when the split cannot be read. The steps of a run need this number."""
        from .data import DataError, scan_split

        train = Path(self.data.train)
        if not train.exists():
            return None, f"{train} not found"
        try:
            n = len(scan_split(train, open_media=False).rows)
        except (DataError, OSError) as err:
            return None, f"cannot read {train}: {' '.join(str(err).split())}"
        note = f"{n} usable rows in {train} (media files not opened)"
        if self.data.limit_train_rows and self.data.limit_train_rows < n:
            n = self.data.limit_train_rows
            note += f", limited to {n} by data.limit_train_rows"
        return n, note

    def math_dict(self) -> dict[str, Any]:
        """The recipe without fields that cannot change the math (used for the resume hash)."""
        flat = flatten(self.model_dump(mode="json"))
        return {k: v for k, v in flat.items() if not _is_non_math(k) or k in math_keys(self)}

    def math_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.math_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _is_non_math(key: str) -> bool:
    return key == "description" or any(key == f or key.startswith(f + ".") for f in NON_MATH_FIELDS)


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "rewards":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_math_fields(old: dict[str, Any], new: "Recipe") -> list[str]:
    """Names of math fields whose value differs between a saved math_dict and a recipe."""
    cur = new.math_dict()
    old = upgrade_saved_math(old)  # written before the GRPO variant keys: the values it ran with
    keys = sorted(set(old) | set(cur))
    return [f"{k}: {old.get(k)!r} -> {cur.get(k)!r}" for k in keys if old.get(k) != cur.get(k)]


# ---- loading ---------------------------------------------------------------------------------------
def _all_field_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths += _all_field_paths(ann, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def _suggest(key: str) -> str:
    # Compare like with like: a section name with section names, a dotted key with dotted keys.
    candidates = list(Recipe.model_fields) if "." not in key else _all_field_paths()
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # a bare field name without its section, e.g. "group_size"
        leafs = {p.split(".")[-1]: p for p in _all_field_paths()}
        hit = difflib.get_close_matches(key.split(".")[-1], list(leafs), n=1, cutoff=0.6)
        close = [leafs[hit[0]]] if hit else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_value(text: str, item: str = "") -> Any:
    # YAML scalars: numbers, booleans, null, lists and dicts written inline; the strict safe loader only.
    try:
        return strict_yaml.load(text)
    except (strict_yaml.DuplicateKeyError, strict_yaml.YamlTooDeepError) as err:
        raise RecipeError(f"override '{item or text}': {str(err).removeprefix('line 1: ')}") from None
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` strings to a raw recipe dict (values parsed as YAML scalars)."""
    valid = set(_all_field_paths())
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not key=value (e.g. grpo.group_size=8)")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in valid and not key.startswith("grpo.rewards."):
            raise RecipeError(f"unknown recipe key '{key}' in override '{item}'{_suggest(key)}")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = _parse_value(value, item)
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}'{_suggest(loc)}")
        elif isinstance(e.get("input"), bool) and e["type"] in ("int_type", "float_type"):
            lines.append(f"{loc}: expects a number, not a boolean (got {str(e['input']).lower()}); write the number")
        elif e["type"] == "int_type" and isinstance(e.get("input"), float) and math.isfinite(e["input"]):
            lines.append(f"{loc}: expects a whole number, got {e['input']!r}; write it without a decimal point or exponent")
        elif e["type"] in ("int_type", "float_type") and not _finite_text(e.get("input")):
            lines.append(f"{loc}: Input should be a finite number (got {e['input']!r})")
        elif isinstance(e.get("input"), str) and e["type"] in ("int_type", "float_type", "bool_type"):
            kind = "true or false" if e["type"] == "bool_type" else "a number"
            lines.append(f"{loc}: expects {kind}, not the string {e['input']!r}; write it without quotes")
        elif e["type"] == "string_type" and isinstance(e.get("input"), (int, float)):
            lines.append(f"{loc}: expects text, got the number {e['input']!r}; put it in quotes")
        elif loc:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
        else:
            lines.append(e["msg"].removeprefix("Value error, "))
    if len(lines) == 1:
        return f"{source}: invalid recipe: {lines[0]}"
    return f"{source}: invalid recipe:\n  - " + "\n  - ".join(lines)


def _finite_text(value: Any) -> bool:
    """False for a string that reads as inf or nan (`key=inf` on the command line)."""
    try:
        return not isinstance(value, str) or math.isfinite(float(value))
    except ValueError:
        return True


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>", check_rewards: bool = True) -> Recipe:
    """Validate a raw recipe dict. `check_rewards=False` skips importing the rewards (reading a finished run's
    recipe where its reward module is not importable)."""
    try:
        return Recipe.model_validate(data, context={"check_rewards": check_rewards})
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, source)) from None


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML recipe file (safe loader), or a one-line RecipeError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"{p} is a folder, not a recipe file; pass a .yaml file such as recipes/paper_24gb.yaml")
    if not p.is_file():
        what = "is not a regular file" if p.exists() else "does not exist"
        raise RecipeError(f"recipe file {p} {what}; see recipes/ for examples")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{p}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          "save the recipe as UTF-8") from None
    except OSError as err:
        raise RecipeError(f"{p}: cannot read the recipe: {err.strerror or err}") from None
    try:
        data = strict_yaml.load(text)
    except strict_yaml.DuplicateKeyError as err:
        raise RecipeError(f"{p}: {err}: a second one silently replaces the first; keep one and merge the two") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{p}: not valid YAML: {' '.join(str(err).split())}") from None
    if data is None or data == {}:
        raise RecipeError(f"{p}: the recipe is empty; start from one in recipes/ (e.g. recipes/paper_24gb.yaml), "
                          "`echoink-lite recipes explain` lists every key")
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, check_rewards: bool = True) -> Recipe:
    """Read a YAML recipe (safe loader), apply overrides, validate. `path=None` starts from defaults."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        data = read_recipe_file(path)
        source = str(path)
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, source, check_rewards=check_rewards)
