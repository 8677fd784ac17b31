"""`echoink-lite plan`: peak GPU memory of a recipe, from the recipe and the model config alone.

No weights are loaded and nothing is downloaded: parameter counts come from the thinker config (a local
folder's config.json, or for `Qwen/Qwen2.5-Omni-7B` the bundled copy of the real thinker config in
`echoink_lite/configs/`), and every activation term from the recipe's batch and token sizes.

The estimate (all sizes in GiB = 2**30 bytes; "24GB" cards hold 24 GiB, so GB on the command line is read
as GiB):

    peak = weights + LoRA training state + max(rollout phase, training phase) + CUDA context/allocator

weights
  - LLM linear layers (q,k,v,o,gate,up,down x layers) in 4-bit: 0.5 byte/param plus the NF4 absmax
    constants. bitsandbytes quantizes blocks of 64 weights with one absmax each: without double
    quantization that is one fp32 per 64 params (+0.5 bit/param); with it the absmax is stored in 8 bits
    (+8/64 = 0.125 bit) plus one fp32 per 256 blocks (+32/(64*256) = 0.002 bit): 4.127 bit/param.
    Without 4-bit: compute-dtype bytes per param.
  - unquantized parts in the compute dtype (2 bytes in bf16): embed_tokens, lm_head (4-bit when
    quantization.quantize_lm_head), norms, the q/k/v biases, the audio and vision towers (their linear
    layers in 4-bit when quantize_audio_tower / quantize_vision_tower; convolutions, norms and biases
    stay in the compute dtype).
LoRA training state: parameters, gradients and the two AdamW moments, all fp32: 16 bytes per parameter.
rollout phase (rollout.py, no grad, decode batch Br = min(grpo.rollout_batch_size, completions per process)):
  - the prompt embeddings after the towers, kept for the whole step: prompts x prompt x H x bytes;
  - the static KV cache: 2 x layers x kv_heads x head_dim x bytes x Br x (prompt + completion)
    (56 KiB/token in bf16), preallocated once per decode batch;
  - plus the largest of: one prompt's prefill (batch 1: one layer's activations and the prompt's keys/values;
    lm_head runs on the last position only), one prompt's tower forward, and the decode step's fp32 logits
    and sampling copies (Br x vocab x 4 bytes x 4).
training phase (loss.py, per micro-batch of Bm = min(grpo.micro_batch_size, group_size) completions of one
group; the prompt runs once, Nt = prompt + Bm x completion tokens):
  - with gradient checkpointing (the kit's own, per layer): the input of every layer is kept:
    (layers + 1) x Nt x H x bytes, plus the prompt's keys/values of every layer, plus, while one layer is
    recomputed in backward, its saved tensors and gradient working set for the completion tokens:
    Bm x completion x (cH H + cKV KV + cI I) x bytes with cH = 16.25, cKV = 2, cI = 5 for the saved tensors
    (counted on CPU with `torch.autograd.graph.saved_tensors_hooks` on one Qwen2.5-Omni decoder layer
    with LoRA on its 7 projections, sdpa: RMSNorm keeps fp32 copies, rotary, q/k/v, attention output,
    MLP intermediates), +6 H +2 I when lora.dropout > 0 (dropout outputs and masks), plus 2 H + 3 I of
    gradients in flight, plus the layer's prompt + completion keys/values expanded to all heads for sdpa;
  - without checkpointing: every layer's saved tensors at once;
  - the log-prob chunk: min(chunk, Bm x completion) tokens x vocab x (3 x 4 + bytes): bf16 logits, fp32
    logits, logsumexp working copy and the gradient (recomputed in backward, never kept);
  - the reference forward (beta > 0) runs before, without grad: the prompt's keys/values plus one layer's
    activations for the completion tokens;
  training = prompt embeddings + max(reference forward, kept layer inputs + prompt keys/values +
  max(layer recompute, log-prob chunk)).
Both phases add one dequantized 4-bit weight (the largest, I x H x bytes) when load_in_4bit.
Overhead: the CUDA context (a constant 1.0 GiB; 0.83 GB measured on an H100) and the caching allocator's
reserve beyond its allocated peak (ALLOCATOR_RESERVE_FRACTION of the peak, with expandable segments on).

Prompt tokens = text tokens (200 when unknown) + 25 audio tokens per second x data.max_audio_seconds
+ data.max_pixels / (patch x merge)^2 image tokens (28 x 28 pixels per token for Qwen2.5-Omni).

Nothing here is a GPU measurement. `benchmarks/bench_grpo.py` measures the same workloads on a GPU, and
`tests/test_plan.py` holds the planner to within 15% of every committed measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict

GIB = 2**30
DEFAULT_MODEL_ID = "Qwen/Qwen2.5-Omni-7B"
BUNDLED_CONFIG = Path(__file__).parent / "configs" / "qwen2_5_omni_7b_thinker.json"
PAPER_TRAIN_ROWS = 4490  # AVQA-R1-6K train split (field notes §1)
DEFAULT_TEXT_TOKENS = 200  # template + question + options + instruction, when the real prompt is unknown
DEFAULT_HEADROOM = 0.10
DEFAULT_GPU_GB = 24.0
CUDA_CONTEXT_GIB = 1.0
AUDIO_TOKENS_PER_SECOND = 25

# Saved tensors of one decoder layer per token, in compute-dtype elements (see the module docstring).
SAVED_H, SAVED_KV, SAVED_I = 16.25, 2.0, 5.0
DROPOUT_H, DROPOUT_I = 6.0, 2.0
GRAD_H, GRAD_I = 2.0, 3.0
NOGRAD_H, NOGRAD_I = 4.0, 5.0
LOGPROB_FP32_COPIES = 3
DECODE_FP32_COPIES = 4  # decode step: logits, temperature-scaled logits, their log-softmax, the filtered copy
# Memory the caching allocator holds beyond its allocated peak, as a fraction of that peak. Measured on one
# H100 (2026-11-26, benchmarks/results/): 0.30 without expandable segments (16.03 GB reserved for 12.37 GB
# allocated), 0.05 with them (19.73 GB for 18.80 GB, paper_24gb.yaml under a 24 GB cap). The kit turns
# expandable segments on (echoink_lite/__init__.py).
ALLOCATOR_RESERVE_FRACTION = 0.05

NF4_BLOCK = 64
NF4_DQ_BLOCK = 256


class PlanError(ValueError):
    """A model config the planner cannot read; the message says what to pass instead."""


# ---------------------------------------------------------------------------------------------------
# The model config, without the network
# ---------------------------------------------------------------------------------------------------
def bundled_thinker_config() -> dict[str, Any]:
    return json.loads(BUNDLED_CONFIG.read_text())


def _hub_cache_config(name: str, revision: str | None) -> dict[str, Any] | None:
    """The config of a Hub id if it is already in the local Hugging Face cache (never downloads)."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name, revision=revision, local_files_only=True)
    except Exception:
        return None
    if cfg.model_type == "qwen2_5_omni":
        return cfg.thinker_config.to_dict()
    if cfg.model_type == "qwen2_5_omni_thinker":
        return cfg.to_dict()
    return None


def load_thinker_config(name_or_path: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """(thinker config as a dict, where it came from). Local folders are read; Hub ids are never fetched."""
    if Path(name_or_path).expanduser().is_dir():
        from .modeling import ModelLoadError, resolve_thinker_config

        try:
            cfg, _ = resolve_thinker_config(str(Path(name_or_path).expanduser()), revision)
        except ModelLoadError as err:
            raise PlanError(str(err)) from None
        return cfg.to_dict(), f"{name_or_path}/config.json"
    if name_or_path == DEFAULT_MODEL_ID:
        return bundled_thinker_config(), f"bundled copy of the {DEFAULT_MODEL_ID} thinker config"
    cached = _hub_cache_config(name_or_path, revision)
    if cached is not None:
        return cached, f"{name_or_path} (local Hugging Face cache)"
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    where = "no such folder here" if looks_local else "not in the local Hugging Face cache"
    return bundled_thinker_config(), (
        f"note: no config for '{name_or_path}' ({where}; the planner never downloads): "
        f"assuming the {DEFAULT_MODEL_ID} thinker sizes"
    )


def _sub(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    sub = cfg.get(key)
    if not isinstance(sub, dict):
        raise PlanError(f"thinker config has no '{key}' section; is this a Qwen2.5-Omni config?")
    return sub


@dataclass(frozen=True)
class Dims:
    """The sizes the estimate needs, read from a thinker config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    a_dim: int
    a_layers: int
    a_ffn: int
    a_mel: int
    a_out: int
    a_positions: int
    v_dim: int
    v_depth: int
    v_inter: int
    v_in: int
    v_patch: int
    v_temporal: int
    v_merge: int
    v_out: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Dims":
        t, a, v = _sub(cfg, "text_config"), _sub(cfg, "audio_config"), _sub(cfg, "vision_config")
        hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
        head_dim = int(t.get("head_dim") or hidden // heads)
        tied = bool(t.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
        return cls(
            hidden=hidden, intermediate=int(t["intermediate_size"]), layers=int(t["num_hidden_layers"]), heads=heads,
            kv_heads=int(t.get("num_key_value_heads") or heads), head_dim=head_dim, vocab=int(t["vocab_size"]), tied=tied,
            a_dim=int(a["d_model"]), a_layers=int(a.get("encoder_layers") or a["num_hidden_layers"]),
            a_ffn=int(a["encoder_ffn_dim"]), a_mel=int(a["num_mel_bins"]), a_out=int(a.get("output_dim") or hidden),
            a_positions=int(a.get("max_source_positions", 1500)),
            v_dim=int(v.get("hidden_size") or v["embed_dim"]), v_depth=int(v["depth"]), v_inter=int(v["intermediate_size"]),
            v_in=int(v.get("in_channels") or v.get("in_chans") or 3), v_patch=int(v.get("patch_size") or 14),
            v_temporal=int(v.get("temporal_patch_size") or 2), v_merge=int(v.get("spatial_merge_size") or 2),
            v_out=int(v.get("out_hidden_size") or hidden),
        )

    @property
    def q_out(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each LLM layer projection."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_out), "k_proj": (h, self.kv_out), "v_proj": (h, self.kv_out), "o_proj": (self.q_out, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def pixels_per_visual_token(self) -> int:
        return (self.v_patch * self.v_merge) ** 2


# ---------------------------------------------------------------------------------------------------
# Parameter counts (checked against the field notes and a meta-device count in tests/test_plan.py)
# ---------------------------------------------------------------------------------------------------
def count_parameters(cfg: dict[str, Any] | Dims) -> dict[str, int]:
    """Analytic parameter counts of the thinker, split the way memory is spent."""
    d = cfg if isinstance(cfg, Dims) else Dims.from_config(cfg)
    h, L = d.hidden, d.layers
    llm_linear = L * sum(i * o for i, o in d.projection_shapes().values())
    llm_bias = L * (d.q_out + 2 * d.kv_out)  # Qwen2: biases on q, k, v only
    llm_norms = L * 2 * h + h
    embed = d.vocab * h
    lm_head = 0 if d.tied else d.vocab * h

    a, f = d.a_dim, d.a_ffn
    audio_linear = d.a_layers * (4 * a * a + 2 * a * f) + d.a_out * a  # q,k,v,out, fc1, fc2; proj
    audio_other = (
        a * d.a_mel * 3 + a + a * a * 3 + a  # conv1, conv2 (weights + biases)
        + 2 * d.a_out  # audio_bos_eos_token embedding
        + d.a_layers * (3 * a + 4 * a + f + a)  # q,v,out biases; two LayerNorms; fc1, fc2 biases
        + 2 * a + d.a_out  # ln_post; proj bias
    )
    v, vi, m2 = d.v_dim, d.v_inter, d.v_dim * d.v_merge**2
    vision_linear = d.v_depth * (4 * v * v + 3 * v * vi) + m2 * m2 + d.v_out * m2
    vision_other = (
        v * d.v_in * d.v_temporal * d.v_patch**2  # patch embedding (Conv3d, no bias)
        + d.v_depth * (2 * v + 4 * v + 2 * vi + v)  # two RMSNorms; q,k,v,proj biases; gate, up, down biases
        + v + m2 + d.v_out  # merger ln_q; merger MLP biases
    )
    out = {
        "llm_linear": llm_linear, "llm_bias": llm_bias, "llm_norms": llm_norms, "embed_tokens": embed, "lm_head": lm_head,
        "audio_linear": audio_linear, "audio_other": audio_other, "vision_linear": vision_linear, "vision_other": vision_other,
    }
    out["llm"] = llm_linear + llm_bias + llm_norms + embed + lm_head
    out["audio_tower"] = audio_linear + audio_other
    out["vision_tower"] = vision_linear + vision_other
    out["total"] = out["llm"] + out["audio_tower"] + out["vision_tower"]
    out["audio_position_buffer"] = d.a_positions * a  # a buffer, not a parameter, but it takes memory
    return out


def lora_parameter_count(cfg: dict[str, Any] | Dims, r: int, target_modules: list[str]) -> int:
    d = cfg if isinstance(cfg, Dims) else Dims.from_config(cfg)
    shapes = d.projection_shapes()
    return d.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in target_modules if t in shapes)


# ---------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------
@dataclass
class Suggestion:
    """One way to make a recipe fit: recipe changes [(key, old, new)], and the estimate with them."""

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
        return f"{what} saves {self.saves_gb:.1f} GB (total {self.total_gb:.1f} GB){extra}"


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, bool) else str(v)


@dataclass
class MemoryEstimate:
    components: dict[str, float]  # GiB, every term of the formula
    phases: dict[str, float]  # GiB: weights, lora_state, rollout, training, overhead
    total_gb: float
    gpu_memory_gb: float
    headroom: float
    fits: bool
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    config_source: str = ""

    @property
    def budget_gb(self) -> float:
        """What the estimate must stay under: the GPU memory less the headroom."""
        return self.gpu_memory_gb * (1 - self.headroom)

    @property
    def torch_peak_gb(self) -> float:
        """The estimate without the CUDA context: comparable to torch.cuda.max_memory_reserved()."""
        return self.total_gb - self.components["cuda_context"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["suggestions"] = [dict(asdict(s), text=str(s), overrides=s.overrides) for s in self.suggestions]
        d["budget_gb"], d["torch_peak_gb"] = self.budget_gb, self.torch_peak_gb
        return d


COMPONENT_LABELS = {
    "llm_linears": "LLM linear weights",
    "embed_lm_head": "embed_tokens + lm_head",
    "norms_biases": "LLM norms + q/k/v biases",
    "audio_tower": "audio tower",
    "vision_tower": "vision tower",
    "lora_state": "LoRA weights + grads + AdamW (fp32, 16 B/param)",
    "prompt_embeddings": "prompt embeddings after the towers (kept for the step)",
    "rollout_kv_cache": "static KV cache (decode batch x (prompt + completion))",
    "rollout_prefill": "prefill of one prompt (one layer + its keys/values)",
    "rollout_tower_activations": "tower forward (one prompt)",
    "rollout_decode_logits": "decode step logits and sampling (fp32)",
    "train_layer_inputs": "checkpointed layer inputs (prompt + micro-batch)",
    "train_prefix_kv": "the prompt's keys/values, shared by the micro-batch",
    "train_layer_recompute": "one layer's recompute + gradients",
    "train_all_layers": "all layers' saved activations (no checkpointing)",
    "train_logprob_chunk": "log-prob chunk (logits, logsumexp, grad)",
    "train_reference_forward": "reference forward (no grad)",
    "dequant_buffer": "dequantized 4-bit weight (largest layer)",
    "cuda_context": "CUDA context (constant)",
    "allocator_reserve": "allocator reserve beyond the peak (fraction of it)",
}


def _bytes_per(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def nf4_bits_per_param(double_quant: bool) -> float:
    if double_quant:
        return 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)
    return 4 + 32 / NF4_BLOCK


def prompt_token_estimate(recipe: Recipe, dims: Dims, text_tokens: int = DEFAULT_TEXT_TOKENS) -> dict[str, int]:
    audio = int(math.ceil(AUDIO_TOKENS_PER_SECOND * recipe.data.max_audio_seconds))
    image = int(recipe.data.max_pixels // dims.pixels_per_visual_token)
    return {"text": int(text_tokens), "audio": audio, "image": image, "prompt": int(text_tokens) + audio + image}


def detected_gpu_memory_gb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception:
        pass
    return None


def estimate_memory(recipe: Recipe, gpu_memory_gb: float | None = None, *, config: dict[str, Any] | None = None,
                    prompt_tokens: int | None = None, text_tokens: int = DEFAULT_TEXT_TOKENS,
                    headroom: float = DEFAULT_HEADROOM, suggest: bool = True, config_source: str | None = None) -> MemoryEstimate:
    """Peak GPU memory of one training process of `recipe` (see the module docstring for the formula).

    `config`: a thinker config dict (default: read for recipe.model.name_or_path without the network).
    `prompt_tokens`: a measured prompt length, instead of text_tokens + audio + image tokens.
    """
    if config is None:
        config, source = load_thinker_config(recipe.model.name_or_path, recipe.model.revision)
        config_source = config_source or source
    d = Dims.from_config(config)
    notes: list[str] = []
    if config_source and config_source.startswith("note:"):
        notes.append(config_source[len("note: "):])
    if gpu_memory_gb is None:
        gpu_memory_gb = detected_gpu_memory_gb() or DEFAULT_GPU_GB
    p = count_parameters(d)
    cb = _bytes_per(recipe.model.dtype)
    q = recipe.quantization
    q4 = nf4_bits_per_param(q.double_quant) / 8  # bytes per quantized param

    tok = prompt_token_estimate(recipe, d, text_tokens)
    if prompt_tokens is not None:
        tok = {"text": None, "audio": None, "image": None, "prompt": int(prompt_tokens)}
    Tp = tok["prompt"]
    C = recipe.generation.max_completion_tokens
    T = Tp + C
    if Tp > recipe.generation.max_prompt_tokens:
        notes.append(f"prompts of ~{Tp} tokens exceed generation.max_prompt_tokens={recipe.generation.max_prompt_tokens}: "
                     "training refuses them; raise the cap or lower data.max_audio_seconds / data.max_pixels")
    if recipe.model.dtype == "float16":
        notes.append("model.dtype float16 (for GPUs without bf16, e.g. T4): same memory as bf16, watch for overflow")
    derived = recipe.derived()
    per_step = derived["completions_per_process"]
    Br = min(recipe.grpo.rollout_batch_size, per_step)
    Bm = min(recipe.grpo.micro_batch_size, recipe.grpo.group_size)  # a micro-batch holds one group's completions
    H, I, L, V, KV = d.hidden, d.intermediate, d.layers, d.vocab, d.kv_out

    comp: dict[str, float] = {}
    # weights
    comp["llm_linears"] = p["llm_linear"] * (q4 if q.load_in_4bit else cb)
    lm_head_bytes = q4 if (q.load_in_4bit and q.quantize_lm_head) else cb
    comp["embed_lm_head"] = p["embed_tokens"] * cb + p["lm_head"] * lm_head_bytes
    comp["norms_biases"] = (p["llm_bias"] + p["llm_norms"]) * cb
    comp["audio_tower"] = (p["audio_linear"] * (q4 if q.load_in_4bit and q.quantize_audio_tower else cb)
                           + (p["audio_other"] + p["audio_position_buffer"]) * cb)
    comp["vision_tower"] = p["vision_linear"] * (q4 if q.load_in_4bit and q.quantize_vision_tower else cb) + p["vision_other"] * cb
    n_lora = lora_parameter_count(d, recipe.lora.r, recipe.lora.target_modules)
    comp["lora_state"] = n_lora * 16

    # rollout phase (rollout.py): a static KV cache for a decode batch, one prompt prefilled at a time
    kv_tok = 2 * L * KV * cb
    prompts_local = derived["completions_per_process"] // recipe.grpo.group_size
    comp["rollout_kv_cache"] = Br * T * kv_tok
    comp["rollout_prefill"] = Tp * (H + NOGRAD_H * H + NOGRAD_I * I) * cb + Tp * kv_tok  # batch 1, one layer + its KV
    seconds = recipe.data.max_audio_seconds
    patches = int(recipe.data.max_pixels // (d.v_patch**2))
    tower_per_sample = (
        100 * seconds * 2 * d.a_dim  # conv1 output and its GELU (100 feature frames per second)
        + 50 * seconds * (6 * d.a_dim + 2 * d.a_ffn)  # one encoder layer (50 positions per second after conv2)
        + patches * (6 * d.v_dim + 3 * d.v_inter)  # one vision block
        + d.a_mel * 3000  # the Whisper features, always padded to 30 s
    ) * cb
    comp["rollout_tower_activations"] = tower_per_sample  # towers run once per prompt, batch 1
    comp["rollout_decode_logits"] = Br * V * 4 * DECODE_FP32_COPIES
    comp["prompt_embeddings"] = prompts_local * Tp * H * cb  # kept for the whole step (rollout, reference, policy)
    dequant = I * H * cb if q.load_in_4bit else 0
    comp["dequant_buffer"] = dequant
    rollout = (comp["prompt_embeddings"] + comp["rollout_kv_cache"] + dequant
               + max(comp["rollout_prefill"], comp["rollout_tower_activations"], comp["rollout_decode_logits"]))

    # training phase (loss.py): per micro-batch the prompt runs once (Tp tokens) and Bm completions of C
    # tokens attend to its keys/values
    Nc = Bm * C  # completion tokens of a micro-batch
    Nt = Tp + Nc
    saved_h = SAVED_H + (DROPOUT_H if recipe.lora.dropout > 0 else 0)
    saved_i = SAVED_I + (DROPOUT_I if recipe.lora.dropout > 0 else 0)
    prefix_kv = Tp * kv_tok  # the prompt's keys/values of every layer, kept for the completions
    attention_kv = 2 * Bm * T * d.q_out * cb  # one layer's prompt + completion keys/values, expanded to all heads
    layer_saved = Nc * (saved_h * H + SAVED_KV * KV + saved_i * I) * cb + attention_kv
    layer_grads = Nc * (GRAD_H * H + GRAD_I * I) * cb
    chunk = min(recipe.grpo.logprob_chunk_tokens, Nc)
    comp["train_logprob_chunk"] = chunk * V * (LOGPROB_FP32_COPIES * 4 + cb)
    comp["train_reference_forward"] = (prefix_kv + Nc * (H + NOGRAD_H * H + NOGRAD_I * I) * cb + attention_kv) if recipe.grpo.beta > 0 else 0.0
    comp["train_prefix_kv"] = prefix_kv
    if recipe.model.gradient_checkpointing:
        comp["train_layer_inputs"] = (L + 1) * Nt * H * cb
        comp["train_layer_recompute"] = layer_saved + layer_grads
        policy = comp["train_layer_inputs"] + prefix_kv + max(comp["train_layer_recompute"], comp["train_logprob_chunk"])
    else:
        comp["train_all_layers"] = L * (layer_saved + Tp * (saved_h * H + SAVED_KV * KV + saved_i * I) * cb) + Nt * H * cb
        policy = comp["train_all_layers"] + prefix_kv + max(layer_grads, comp["train_logprob_chunk"])
    training = comp["prompt_embeddings"] + max(comp["train_reference_forward"], policy) + dequant
    comp["cuda_context"] = CUDA_CONTEXT_GIB * GIB

    weights = sum(comp[k] for k in ("llm_linears", "embed_lm_head", "norms_biases", "audio_tower", "vision_tower"))
    phases = {"weights": weights, "lora_state": comp["lora_state"], "rollout": rollout, "training": training,
              "overhead": comp["cuda_context"]}
    torch_peak = weights + comp["lora_state"] + max(rollout, training)
    comp["allocator_reserve"] = ALLOCATOR_RESERVE_FRACTION * torch_peak
    phases["overhead"] = comp["cuda_context"] + comp["allocator_reserve"]
    total = torch_peak + phases["overhead"]

    comp_gb = {k: v / GIB for k, v in comp.items()}
    phases_gb = {k: v / GIB for k, v in phases.items()}
    total_gb = total / GIB
    params = {k: v for k, v in p.items()}
    params["lora"] = n_lora
    tokens = {**{k: v for k, v in tok.items() if v is not None}, "completion": C, "sequence": T,
              "rollout_batch": Br, "micro_batch": Bm}
    est = MemoryEstimate(components=comp_gb, phases=phases_gb, total_gb=total_gb, gpu_memory_gb=float(gpu_memory_gb),
                         headroom=headroom, fits=total_gb <= gpu_memory_gb * (1 - headroom), notes=notes, tokens=tokens,
                         params=params, config_source=config_source or "")
    if suggest and not est.fits:
        est.suggestions = suggest_changes(recipe, est, config=config, prompt_tokens=prompt_tokens, text_tokens=text_tokens)
    return est


# ---------------------------------------------------------------------------------------------------
# What to turn when it does not fit
# ---------------------------------------------------------------------------------------------------
def _divisors_below(n: int, below: int) -> list[int]:
    return sorted((x for x in range(1, below) if n % x == 0), reverse=True)


def _candidates(recipe: Recipe) -> list[tuple[str, list[Any], bool]]:
    """(key, values from mildest to strongest, changes the math) in the order they are tried."""
    g, gen, q = recipe.grpo, recipe.generation, recipe.quantization
    completions = g.prompts_per_step * g.group_size
    cands: list[tuple[str, list[Any], bool]] = []
    cands.append(("grpo.micro_batch_size", _divisors_below(completions, min(g.micro_batch_size, completions)), False))
    if g.rollout_batch_size > g.group_size:  # whole groups per call: fewer groups, then slices of one group
        rb = [m * g.group_size for m in range(g.rollout_batch_size // g.group_size - 1, 0, -1)] + _divisors_below(g.group_size, g.group_size)
    else:
        rb = _divisors_below(g.group_size, g.rollout_batch_size)
    cands.append(("grpo.rollout_batch_size", rb, False))
    cands.append(("grpo.logprob_chunk_tokens", [c for c in (128, 64, 32) if c < g.logprob_chunk_tokens], False))
    if not recipe.model.gradient_checkpointing:
        cands.append(("model.gradient_checkpointing", [True], False))
    if not q.load_in_4bit:
        cands.append(("quantization.load_in_4bit", [True], True))
    else:
        if not q.quantize_vision_tower:
            cands.append(("quantization.quantize_vision_tower", [True], True))
        if not q.quantize_audio_tower:
            cands.append(("quantization.quantize_audio_tower", [True], True))
        if not q.quantize_lm_head:
            cands.append(("quantization.quantize_lm_head", [True], True))
        if not q.double_quant:
            cands.append(("quantization.double_quant", [True], True))
    cands.append(("generation.max_completion_tokens", [c for c in (640, 512, 384, 256) if c < gen.max_completion_tokens], True))
    cands.append(("lora.r", [r for r in (8, 4) if r < recipe.lora.r], True))
    cands.append(("grpo.group_size", [x for x in (12, 8, 4) if x < g.group_size], True))
    return [c for c in cands if c[1]]


def _with(recipe: Recipe, changes: dict[str, Any]) -> Recipe | None:
    data = recipe.model_dump(mode="json")
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    g = data["grpo"]
    if "grpo.group_size" in changes:  # keep the batches valid for a smaller group
        g["rollout_batch_size"] = min(g["rollout_batch_size"], g["group_size"])
        completions = g["prompts_per_step"] * g["group_size"]
        while completions % g["micro_batch_size"]:
            g["micro_batch_size"] -= 1
    try:
        return recipe_from_dict(data, "planner alternative")
    except RecipeError:
        return None


def suggest_changes(recipe: Recipe, est: MemoryEstimate, *, config: dict[str, Any], prompt_tokens: int | None = None,
                    text_tokens: int = DEFAULT_TEXT_TOKENS) -> list[Suggestion]:
    """Changes that make the recipe fit. First every single knob that fits alone, at its mildest fitting
    value, memory-only knobs before knobs that change the training math. If no knob fits alone, one
    combined suggestion: knobs are turned in the same order, each only as far as it still helps, until
    the estimate fits."""
    kw = dict(config=config, prompt_tokens=prompt_tokens, text_tokens=text_tokens, headroom=est.headroom, suggest=False)

    def total_for(changes: dict[str, Any]) -> float | None:
        alt = _with(recipe, changes)
        return None if alt is None else estimate_memory(alt, est.gpu_memory_gb, **kw).total_gb

    def make(changes: dict[str, Any], total: float) -> Suggestion:
        math_change = any(m for k, _, m in cands if k in changes and m)
        return Suggestion([(k, _get(recipe, k), v) for k, v in changes.items()], est.total_gb - total, total, math_change)

    cands = _candidates(recipe)
    out: list[Suggestion] = []
    for key, values, _ in cands:
        for value in values:
            total = total_for({key: value})
            if total is not None and total <= est.budget_gb:
                out.append(make({key: value}, total))
                break
    if out:
        return sorted(out, key=lambda s: s.changes_math)  # stable: memory-only knobs first, in trial order
    # Nothing fits alone. The two phases are a max(): lowering one phase's knob alone can show no gain while
    # the other phase dominates, so knobs are turned in order by how much they lower the SUM of the phases,
    # then every turned knob is backed off again as far as the total still fits.
    def phase_sum(changes: dict[str, Any]) -> float | None:
        alt = _with(recipe, changes)
        if alt is None:
            return None
        e = estimate_memory(alt, est.gpu_memory_gb, **kw)
        return e.phases["rollout"] + e.phases["training"] + e.phases["weights"] + e.phases["lora_state"]

    changes: dict[str, Any] = {}
    current = phase_sum({}) or 0.0
    for key, values, _ in cands:
        trials = [(v, phase_sum(dict(changes, **{key: v}))) for v in values]
        trials = [(v, t) for v, t in trials if t is not None]
        if not trials or min(t for _, t in trials) >= current - 0.05:
            continue
        best = min(t for _, t in trials)
        value, current = next((v, t) for v, t in trials if t <= best + 0.05)
        changes[key] = value
        total = total_for(changes)
        if total is not None and total <= est.budget_gb:
            break
    else:
        return []
    order = {k: i for i, (k, _, _) in enumerate(cands)}
    math_keys = {k for k, _, m in cands if m}
    for key in sorted(changes, key=lambda k: (k not in math_keys, -order[k])):  # math knobs first, last turned first
        values = next(v for k, v, _ in cands if k == key)
        for milder in [_get(recipe, key)] + values[: values.index(changes[key])]:
            trial = dict(changes)
            if milder == _get(recipe, key):
                del trial[key]
            else:
                trial[key] = milder
            total = total_for(trial)
            if total is not None and total <= est.budget_gb:
                changes = trial
                break
    return [make(changes, total_for(changes))]


def _get(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


# ---------------------------------------------------------------------------------------------------
# Used by `train` before loading the model
# ---------------------------------------------------------------------------------------------------
def check_recipe_fits_gpu(recipe: Recipe, device) -> tuple[bool, str]:
    """(fits, message) for the recipe on `device` (a CUDA device); never raises for planner problems."""
    try:
        import torch

        total = torch.cuda.get_device_properties(device).total_memory / GIB
        name = torch.cuda.get_device_name(device)
    except Exception as err:  # no CUDA: nothing to check
        return True, f"planner: no CUDA device to check ({err})"
    try:
        est = estimate_memory(recipe, total)
    except Exception as err:  # a planner problem must not stop a run
        return True, f"planner: could not estimate memory ({err})"
    if est.fits:
        return True, f"planner: ~{est.total_gb:.1f} GB of {total:.1f} GB on {name}"
    lines = [f"planner: this recipe needs ~{est.total_gb:.1f} GB but {name} has {total:.1f} GB "
             f"({100 * est.headroom:.0f}% kept as headroom: budget {est.budget_gb:.1f} GB)."]
    if est.suggestions:
        lines.append("Any one of these makes it fit (as key=value overrides):")
        lines += [f"  {s}" for s in est.suggestions[:5]]
    lines.append("Details: echoink-lite plan RECIPE [key=value ...]")
    return False, "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------
_MEM_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*$", re.IGNORECASE)


def parse_gpu_memory(text: str) -> float:
    """'24GB', '24', '80GiB', '24 G', '16000MiB' -> GiB. GB is read as GiB: a '24GB' card holds 24 GiB."""
    m = _MEM_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read GPU memory '{text}': write e.g. 24GB, 24, 80GiB or 16000MiB")
    value, unit = float(m.group(1)), (m.group(2) or "g").lower()
    if unit in ("mib", "mb", "m"):
        value /= 1024
    elif unit in ("tib", "tb", "t"):
        value *= 1024
    if value <= 0:
        raise argparse.ArgumentTypeError(f"GPU memory must be positive, got '{text}'")
    return value


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields, e.g. grpo.micro_batch_size=1")
    parser.add_argument("--gpu-memory", type=parse_gpu_memory, default=None, metavar="SIZE",
                        help="GPU memory to plan for, e.g. 24GB, 48, 80GiB (default: the detected GPU, else 24GB)")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                        help="fraction of the GPU kept free for what the estimate cannot see (default 0.10)")
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                        help="text tokens per prompt besides audio and image (default 200, the paper's prompts)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the estimate as JSON to this file")


def schedule_summary(recipe: Recipe) -> tuple[dict[str, Any], str]:
    """(derived numbers for the data, a note on where the row count came from)."""
    n, note = None, ""
    train = Path(recipe.data.train)
    if train.exists():
        try:
            from .data import scan_split

            n = len(scan_split(train, open_media=False).rows)
            if recipe.data.limit_train_rows:
                n = min(n, recipe.data.limit_train_rows)
            note = f"{n} usable rows in {train} (media files not opened)"
        except Exception as err:
            note = f"could not read {train} ({err}); "
    if n is None:
        n = PAPER_TRAIN_ROWS if not recipe.data.limit_train_rows else min(PAPER_TRAIN_ROWS, recipe.data.limit_train_rows)
        note += f"{train} not found: assuming the paper's {PAPER_TRAIN_ROWS} AVQA-R1-6K training rows"
    return recipe.derived(n), note


def print_estimate(est: MemoryEstimate, recipe: Recipe, console, recipe_name: str = "recipe") -> None:
    from rich.table import Table

    cb = _bytes_per(recipe.model.dtype)
    q = recipe.quantization
    t = Table(title=f"echoink-lite plan: peak GPU memory of {recipe_name} (estimate, GiB)")
    t.add_column("phase")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    rollout_keys = [k for k in est.components if k.startswith("rollout_")]
    train_keys = [k for k in est.components if k.startswith("train_")]

    def row(phase: str, key: str) -> None:
        label = COMPONENT_LABELS.get(key, key)
        if key == "llm_linears":
            label += (f" (4-bit {q.quant_type}, {nf4_bits_per_param(q.double_quant):.3f} bit/param)" if q.load_in_4bit
                      else f" ({recipe.model.dtype})")
        t.add_row(phase, label, f"{est.components[key]:.2f}")

    for key in ("llm_linears", "embed_lm_head", "norms_biases", "audio_tower", "vision_tower"):
        row("weights", key)
    t.add_row("", "[bold]weights[/]", f"[bold]{est.phases['weights']:.2f}[/]", end_section=True)
    row("LoRA", "lora_state")
    t.add_row("", f"[dim]{est.params['lora']:,} LoRA parameters (r={recipe.lora.r})[/]", "", end_section=True)
    for key in rollout_keys:
        row(f"rollout (x{est.tokens['rollout_batch']})", key)
    t.add_row("", "[bold]rollout phase peak[/] (incl. dequant buffer)", f"[bold]{est.phases['rollout']:.2f}[/]", end_section=True)
    for key in train_keys:
        row(f"training (x{est.tokens['micro_batch']})", key)
    t.add_row("", "[bold]training phase peak[/] (incl. dequant buffer)", f"[bold]{est.phases['training']:.2f}[/]", end_section=True)
    if est.components.get("dequant_buffer"):
        row("both", "dequant_buffer")
    row("overhead", "cuda_context")
    verdict = "[green]fits[/]" if est.fits else "[red]does not fit[/]"
    t.add_row("", f"[bold]peak = weights + LoRA + max(rollout, training) + overhead[/]", f"[bold]{est.total_gb:.2f}[/]", end_section=True)
    t.add_row("", f"GPU {est.gpu_memory_gb:.1f} GB, {100 * est.headroom:.0f}% headroom -> budget", f"{est.budget_gb:.2f}")
    t.add_row("", verdict, "")
    console.print(t)
    tk = est.tokens
    if "audio" in tk:
        console.print(f"tokens per completion sequence: prompt ~{tk['prompt']} (text {tk['text']} + audio {tk['audio']} + "
                      f"image {tk['image']}) + completion {tk['completion']} = {tk['sequence']}; "
                      f"compute dtype {recipe.model.dtype} ({cb} B)", highlight=False)
    else:
        console.print(f"tokens per completion sequence: prompt {tk['prompt']} (measured) + completion {tk['completion']} = {tk['sequence']}", highlight=False)
    console.print(f"model sizes from: {est.config_source}", highlight=False)
    for n in est.notes:
        console.print(f"[yellow]note:[/] {n}", highlight=False)


def plan_command(args, console=None) -> int:
    """`echoink-lite plan RECIPE [key=value ...] [--gpu-memory 24GB]`: 0 if the recipe fits, 1 if not."""
    from rich.console import Console

    console = console or Console()
    recipe = load_recipe(args.recipe, args.overrides)
    gpu = args.gpu_memory
    source = "--gpu-memory"
    if gpu is None:
        gpu = detected_gpu_memory_gb()
        source = "detected GPU" if gpu is not None else f"no GPU detected: planning for {DEFAULT_GPU_GB:.0f} GB"
        gpu = gpu or DEFAULT_GPU_GB
    try:
        est = estimate_memory(recipe, gpu, headroom=getattr(args, "headroom", DEFAULT_HEADROOM),
                              text_tokens=getattr(args, "text_tokens", DEFAULT_TEXT_TOKENS))
    except PlanError as err:
        raise RecipeError(str(err)) from None
    print_estimate(est, recipe, console, Path(args.recipe).name)
    console.print(f"GPU memory: {gpu:.1f} GB ({source})", highlight=False)

    derived, note = schedule_summary(recipe)
    g = recipe.grpo
    console.print(
        f"schedule: {derived['total_steps']} optimizer steps ({derived['steps_per_epoch']} per epoch x {recipe.schedule.epochs:g} epochs"
        f"{', capped by schedule.max_steps' if recipe.schedule.max_steps else ''}); {g.prompts_per_step} prompts x {g.group_size} "
        f"completions = {derived['completions_per_step']} per step in {derived['micro_batches_per_step']} micro-batches of up to "
        f"{min(g.micro_batch_size, g.group_size)} and {derived['decode_batches_per_step']} decode batch(es)",
        highlight=False,
    )
    console.print(f"  rows: {note}", highlight=False)
    console.print(
        f"rollout tokens per step: at most {derived['rollout_tokens_budget']:,} generated "
        f"({derived['completions_per_step']} x {recipe.generation.max_completion_tokens}) over "
        f"~{derived['completions_per_step'] * est.tokens['prompt']:,} prompt tokens; "
        f"whole run at most {derived['rollout_tokens_budget'] * derived['total_steps']:,} generated tokens",
        highlight=False,
    )
    if est.fits:
        console.print(f"[green]fits[/]: ~{est.total_gb:.1f} GB of a {est.budget_gb:.1f} GB budget "
                      f"({gpu:.1f} GB less {100 * est.headroom:.0f}% headroom)", highlight=False)
    else:
        console.print(f"[red]does not fit[/]: ~{est.total_gb:.1f} GB over a {est.budget_gb:.1f} GB budget", highlight=False)
        if est.suggestions:
            console.print("any one of these makes it fit (as key=value overrides, memory-only knobs first):")
            for s in est.suggestions:
                console.print(f"  {s}\n      [dim]{' '.join(s.overrides)}[/]", highlight=False)
        else:
            console.print("no combination of the usual knobs fits this GPU: use a larger GPU")
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(json.dumps(est.to_dict(), indent=2) + "\n")
    return 0 if est.fits else 1


__all__ = [
    "MemoryEstimate", "Suggestion", "estimate_memory", "check_recipe_fits_gpu", "add_plan_arguments", "plan_command",
    "count_parameters", "lora_parameter_count", "parse_gpu_memory", "load_thinker_config", "nf4_bits_per_param",
]
