"""Peak GPU memory of one training process of a recipe, from the recipe and the model config alone.

No weights are loaded and nothing is downloaded: parameter counts come from the thinker config (a local
folder's config.json, or for `Qwen/Qwen2.5-Omni-7B` the bundled copy of the real thinker config in
`echoink_lite/configs/`; read and counted in thinker_sizes.py), and every activation term from the recipe's
batch and token sizes.
`echoink-lite plan` (plan.py) prints the estimate; memory_suggestions.py searches the knobs that make a
recipe fit.

Units: every size is in GiB (2**30 bytes); the `*_gb` fields hold GiB. GPU sizes are read the same way: a
"24GB" card holds 24 GiB (24,576 MiB), so `--gpu-memory 24GB` means 24 GiB.

The estimate is a sum of terms held in memory together, where the phases that never overlap count only
by the largest of them (`MemoryEstimate.formula` holds this tree, and `echoink-lite plan` prints it):

    peak = weights + LoRA training state + largest of (rollout phase, training phase)
           + CUDA context + allocator reserve

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
  - the static KV cache: 2 x layers x kv_heads x head_dim x bytes x Br x (prompt + completion), which
    is 2 x 28 x 4 x 128 x 2 bytes = 56 KiB per token for Qwen2.5-Omni-7B in bf16, preallocated once
    per decode batch;
  - the dequantized 4-bit weight (below);
  - plus the largest of: one prompt's prefill (batch 1: one layer's activations and the prompt's
    keys/values; lm_head runs on the last position only), one prompt's tower forward, and the decode
    step's fp32 logits and sampling copies (Br x vocab x 4 bytes x 4).
training phase (loss.py, per micro-batch of Bm = min(grpo.micro_batch_size, group_size) completions of one
group; the prompt runs once, Nt = prompt + Bm x completion tokens):
  - the prompt embeddings (as above) and the dequantized 4-bit weight;
  - plus the largest of the reference forward and the policy forward + backward, which run one after
    the other:
  - the reference forward (beta > 0), without grad: the prompt's keys/values plus one layer's
    activations for the completion tokens;
  - the policy forward + backward with gradient checkpointing (the kit's own, per layer): the input of
    every layer is kept: (layers + 1) x Nt x H x bytes, plus the prompt's keys/values of every layer,
    plus the largest of
      - one layer recomputed in backward: its saved tensors and gradient working set for the completion
        tokens: Bm x completion x (cH H + cKV KV + cI I) x bytes with cH = 16.25, cKV = 2, cI = 5 for
        the saved tensors (counted on CPU with `torch.autograd.graph.saved_tensors_hooks` on one
        Qwen2.5-Omni decoder layer with LoRA on its 7 projections, sdpa: RMSNorm keeps fp32 copies,
        rotary, q/k/v, attention output, MLP intermediates), +6 H +2 I when lora.dropout > 0 (dropout
        outputs and masks), plus 2 H + 3 I of gradients in flight, plus the layer's prompt + completion
        keys/values expanded to all heads for sdpa;
      - the log-prob chunk: min(chunk, Bm x completion) tokens x vocab x (3 x 4 + bytes): bf16 logits,
        fp32 logits, logsumexp working copy and the gradient (recomputed in backward, never kept);
    without checkpointing: every layer's saved tensors at once, plus the larger of one layer's gradients
    and the log-prob chunk.
With grpo.num_iterations (mu) > 1 the training phase also holds the rollout policy's log-probs of every
completion of the process (and the reference's when beta > 0), fp32: completions x completion x 4 bytes each,
computed before the updates by a no-grad policy pass per micro-batch, as large as a reference forward.
Both phases hold one dequantized 4-bit weight (the largest, I x H x bytes) when load_in_4bit.
Overhead: the CUDA context (a constant 1.0 GiB; 0.83 GiB measured on an H100) and the caching allocator's
reserve beyond its allocated peak (ALLOCATOR_RESERVE_FRACTION of the peak, with expandable segments on).

Prompt tokens = text tokens (200 when unknown) + 25 audio tokens per second x data.max_audio_seconds
+ data.max_pixels / (patch x merge)^2 image tokens (28 x 28 pixels per token for Qwen2.5-Omni). For the
paper recipes that is 200 + 250 + 256 = 706; the benchmark's paper-length prompts measured 707 tokens
(benchmarks/results/*.json, `prompt_tokens`).

Nothing here is a GPU measurement. `benchmarks/bench_grpo.py` measures the same workloads on a GPU, and
`tests/test_plan.py` holds the estimate to within 15% of every committed measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Union

from .recipe import Recipe
from .thinker_sizes import Dims, count_parameters, load_thinker_config, lora_parameter_count

if TYPE_CHECKING:
    from .memory_suggestions import Suggestion

GIB = 2**30
DEFAULT_TEXT_TOKENS = 200  # template + question + options + instruction, when the real prompt is unknown
DEFAULT_HEADROOM = 0.10
DEFAULT_GPU_GIB = 24.0
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
# H100 (2026-11-26, benchmarks/results/): 0.30 without expandable segments (16.03 GiB reserved for 12.37 GiB
# allocated), 0.05 with them (19.73 GiB for 18.80 GiB, paper_24gb.yaml under a 24 GiB cap). The kit turns
# expandable segments on (echoink_lite/__init__.py).
ALLOCATOR_RESERVE_FRACTION = 0.05

NF4_BLOCK = 64
NF4_DQ_BLOCK = 256

WEIGHT_KEYS = ("llm_linears", "embed_lm_head", "norms_biases", "audio_tower", "vision_tower")

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
    "train_layer_grads": "one layer's gradients",
    "train_logprob_chunk": "log-prob chunk (logits, logsumexp, grad)",
    "train_reference_forward": "reference forward (no grad)",
    "train_old_logps_forward": "rollout policy's log-prob pass (no grad; num_iterations > 1)",
    "train_kept_logps": "old (and reference) log-probs kept for the num_iterations updates (fp32)",
    "dequant_buffer": "dequantized 4-bit weight (largest layer)",
    "cuda_context": "CUDA context (constant)",
    "allocator_reserve": "allocator reserve beyond the peak",
}


# ---------------------------------------------------------------------------------------------------
# Bytes per parameter, prompt tokens, the GPU
# ---------------------------------------------------------------------------------------------------
def nf4_bits_per_param(double_quant: bool) -> float:
    if double_quant:
        return 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)
    return 4 + 32 / NF4_BLOCK


def bytes_per_element(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def prompt_token_estimate(recipe: Recipe, dims: Dims, text_tokens: int = DEFAULT_TEXT_TOKENS) -> dict[str, int]:
    audio = int(math.ceil(AUDIO_TOKENS_PER_SECOND * recipe.data.max_audio_seconds))
    image = int(recipe.data.max_pixels // dims.pixels_per_visual_token)
    return {"text": int(text_tokens), "audio": audio, "image": image, "prompt": int(text_tokens) + audio + image}


def detected_gpu_memory_gib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception:
        pass
    return None


# ---------------------------------------------------------------------------------------------------
# The shape of the formula: terms in memory together add up; of alternatives only the largest counts
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Terms:
    """A group of terms of the estimate. `combine` is "sum" for terms held in memory at the same time, or
    "largest" for alternatives that never are (phases that run one after the other): only the largest of
    those counts. A term is a component key (of `MemoryEstimate.components`) or a nested group."""

    combine: str
    name: str
    terms: tuple[Union[str, "Terms"], ...]


def together(name: str, *terms: str | Terms) -> Terms:
    return Terms("sum", name, terms)


def largest_of(name: str, *terms: str | Terms) -> Terms:
    return Terms("largest", name, terms)


def term_size(term: str | Terms, components: dict[str, float]) -> float:
    """The size of a term: a component's size, a group's sum, or an alternative group's largest member."""
    if isinstance(term, str):
        return components[term]
    sizes = [term_size(t, components) for t in term.terms]
    return sum(sizes) if term.combine == "sum" else max(sizes)


def largest_member(group: Terms, components: dict[str, float]) -> str | Terms:
    """The member of a "largest" group that counts (the first one on a tie)."""
    sizes = [term_size(t, components) for t in group.terms]
    return group.terms[sizes.index(max(sizes))]


def find_group(term: str | Terms, name: str) -> Terms | None:
    """The group called `name` inside `term`, or None."""
    if isinstance(term, str):
        return None
    if term.name == name:
        return term
    return next((g for g in (find_group(t, name) for t in term.terms) if g is not None), None)


# ---------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Every size in GiB (2**30 bytes), the `*_gb` fields included."""

    components: dict[str, float]  # every term of the formula
    phases: dict[str, float]  # weights, lora_state, rollout, training, overhead
    total_gb: float
    gpu_memory_gb: float
    headroom: float
    fits: bool
    formula: Terms | None = None  # how the components add up to total_gb (see Terms)
    suggestions: list["Suggestion"] = field(default_factory=list)
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


def estimate_memory(recipe: Recipe, gpu_memory_gb: float | None = None, *, config: dict[str, Any] | None = None,
                    prompt_tokens: int | None = None, text_tokens: int = DEFAULT_TEXT_TOKENS,
                    headroom: float = DEFAULT_HEADROOM, config_source: str | None = None) -> MemoryEstimate:
    """Peak GPU memory of one training process of `recipe` (see the module docstring for the formula).

    `gpu_memory_gb`: the GPU's memory in GiB (default: the detected GPU, else 24).
    `config`: a thinker config dict (default: read for recipe.model.name_or_path without the network).
    `prompt_tokens`: a measured prompt length, instead of text_tokens + audio + image tokens.
    The changes that make a recipe fit are searched by `plan.estimate_memory` (memory_suggestions.py).
    """
    if config is None:
        config, source = load_thinker_config(recipe.model.name_or_path, recipe.model.revision)
        config_source = config_source or source
    d = Dims.from_config(config)
    notes: list[str] = []
    if config_source and config_source.startswith("note:"):
        notes.append(config_source[len("note: "):])
    if gpu_memory_gb is None:
        gpu_memory_gb = detected_gpu_memory_gib() or DEFAULT_GPU_GIB
    p = count_parameters(d)
    cb = bytes_per_element(recipe.model.dtype)
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

    # held in both phases
    prompts_local = derived["completions_per_process"] // recipe.grpo.group_size
    comp["prompt_embeddings"] = prompts_local * Tp * H * cb  # kept for the whole step (rollout, reference, policy)
    comp["dequant_buffer"] = I * H * cb if q.load_in_4bit else 0

    # rollout phase (rollout.py): a static KV cache for a decode batch, one prompt prefilled at a time
    kv_tok = 2 * L * KV * cb
    comp["rollout_kv_cache"] = Br * T * kv_tok
    comp["rollout_prefill"] = Tp * (H + NOGRAD_H * H + NOGRAD_I * I) * cb + Tp * kv_tok  # batch 1, one layer + its KV
    seconds = recipe.data.max_audio_seconds
    patches = int(recipe.data.max_pixels // (d.v_patch**2))
    comp["rollout_tower_activations"] = (  # towers run once per prompt, batch 1
        100 * seconds * 2 * d.a_dim  # conv1 output and its GELU (100 feature frames per second)
        + 50 * seconds * (6 * d.a_dim + 2 * d.a_ffn)  # one encoder layer (50 positions per second after conv2)
        + patches * (6 * d.v_dim + 3 * d.v_inter)  # one vision block
        + d.a_mel * 100 * seconds  # the Whisper features, cut to the clip (prompting.processor_call), 100 frames/s
    ) * cb
    comp["rollout_decode_logits"] = Br * V * 4 * DECODE_FP32_COPIES
    rollout = together("rollout", "prompt_embeddings", "rollout_kv_cache", "dequant_buffer",
                       largest_of("rollout_step", "rollout_prefill", "rollout_tower_activations", "rollout_decode_logits"))

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
        policy = together("policy", "train_layer_inputs", "train_prefix_kv",
                          largest_of("backward_step", "train_layer_recompute", "train_logprob_chunk"))
    else:
        comp["train_all_layers"] = L * (layer_saved + Tp * (saved_h * H + SAVED_KV * KV + saved_i * I) * cb) + Nt * H * cb
        comp["train_layer_grads"] = layer_grads
        policy = together("policy", "train_all_layers", "train_prefix_kv",
                          largest_of("backward_step", "train_layer_grads", "train_logprob_chunk"))
    kept, passes = (), ("train_reference_forward",)
    if recipe.grpo.num_iterations > 1:  # mu updates per rollout (loss_pass.py)
        # the rollout policy's log-probs (and the reference's, beta > 0) of every completion, fp32, kept for the
        # step's updates; computed by a no-grad policy pass per micro-batch, the size of a reference forward
        comp["train_kept_logps"] = per_step * C * 4 * (2 if recipe.grpo.beta > 0 else 1)
        comp["train_old_logps_forward"] = prefix_kv + Nc * (H + NOGRAD_H * H + NOGRAD_I * I) * cb + attention_kv
        kept, passes = ("train_kept_logps",), ("train_reference_forward", "train_old_logps_forward")
    training = together("training", "prompt_embeddings", "dequant_buffer", *kept,
                        largest_of("reference_or_policy", *passes, policy))

    # the peak: one phase at a time, then what torch's allocator and CUDA hold beyond it
    comp["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    weights = together("weights", *WEIGHT_KEYS)
    torch_peak = together("torch_peak", weights, "lora_state", largest_of("phase", rollout, training))
    comp["allocator_reserve"] = ALLOCATOR_RESERVE_FRACTION * term_size(torch_peak, comp)
    overhead = together("overhead", "cuda_context", "allocator_reserve")
    formula = together("peak", weights, "lora_state", largest_of("phase", rollout, training), overhead)

    phases = {name: term_size(group, comp) / GIB for name, group in (
        ("weights", weights), ("lora_state", "lora_state"), ("rollout", rollout), ("training", training), ("overhead", overhead))}
    total_gb = term_size(formula, comp) / GIB
    params = dict(p, lora=n_lora)
    tokens = {**{k: v for k, v in tok.items() if v is not None}, "completion": C, "sequence": T,
              "rollout_batch": Br, "micro_batch": Bm}
    est = MemoryEstimate(components={k: v / GIB for k, v in comp.items()}, phases=phases, total_gb=total_gb,
                         gpu_memory_gb=float(gpu_memory_gb), headroom=headroom,
                         fits=total_gb <= gpu_memory_gb * (1 - headroom), formula=formula, notes=notes, tokens=tokens,
                         params=params, config_source=config_source or "")
    return est
