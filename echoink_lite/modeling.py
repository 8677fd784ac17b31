"""Processor, thinker loading (4-bit, towers frozen) and LoRA placement: the only module that knows which
transformers / bitsandbytes / peft classes and settings the kit uses.

- The thinker (`Qwen2_5OmniThinkerForConditionalGeneration`) loads from a full Qwen2.5-Omni checkpoint or a
  thinker-only one, Hub id or local folder, without anyone editing a config file.
- QLoRA: the language model in 4-bit NF4 with double quantization and bf16 compute; the audio and vision
  towers and `lm_head` stay unquantized and frozen (configurable). Weights come from safetensors only and
  `trust_remote_code` is never set.
- LoRA goes on the language model's attention and MLP projections only. The plain name list
  `q_proj,...,down_proj` would also hit the audio tower's attention and the vision tower's MLP, so the
  target is a regex anchored on `model.language_model.layers.N`.
- The processor works without torchvision: `Qwen2_5OmniProcessor` builds a video processor that needs it,
  so without torchvision we build the same processor minus the video part, with the PIL image processor.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5OmniProcessor
from transformers.processing_utils import ProcessorMixin

from .attention import refusal as attention_refusal

# Multimodal markers a rollout must never sample: a sampled one crashes the loss forward over that completion
# ("418 is not in list", index out of bounds), seen within a few GRPO steps on the tiny model.
MULTIMODAL_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>"]
LLM_LAYER_PREFIX = r"model\.language_model\.layers\.\d+"
# Module-name prefixes kept out of 4-bit. transformers matches `llm_int8_skip_modules` from the start of the
# module name or as its suffix (`quantizers_utils.should_convert_module`, transformers 5.23), so the full path
# is needed: "audio_tower" alone is silently ignored.
AUDIO_TOWER, VISION_TOWER, LM_HEAD = "model.audio_tower", "model.visual", "lm_head"

_TOKEN_ATTRS = [
    "image_token", "audio_token", "video_token", "image_token_id", "audio_token_id", "video_token_id",
    "vision_bos_token", "vision_eos_token", "audio_bos_token", "audio_eos_token",
]


class ModelLoadError(RuntimeError):
    """The base model or processor cannot be loaded; the message says why and what to do."""


def pil_image_processor_class():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401

        return True
    except Exception:  # the registry's CUDA build fails to import on CPU boxes with an OSError/RuntimeError
        return False


class OmniProcessorNoVideo(Qwen2_5OmniProcessor):
    """`Qwen2_5OmniProcessor` without its video processor (which needs torchvision). Same text, image and
    audio processing; the processor's attribute list comes from this `__init__` signature."""

    def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None):
        ProcessorMixin.__init__(self, image_processor, feature_extractor, tokenizer, chat_template=chat_template)
        for attr in _TOKEN_ATTRS:
            setattr(self, attr, getattr(self.tokenizer, attr))

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        # Record the real class so `Qwen2_5OmniProcessor.from_pretrained` works where torchvision exists.
        cfg = Path(save_directory) / "processor_config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            data["processor_class"] = "Qwen2_5OmniProcessor"
            cfg.write_text(json.dumps(data, indent=2) + "\n")
        return out


def load_processor(name_or_path: str, revision: str | None = None, max_pixels: int | None = None, min_pixels: int | None = None):
    """The Omni processor for a checkpoint, with or without torchvision; image pixel caps applied."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    kw: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        proc = None
        if torchvision_available():
            try:
                proc = Qwen2_5OmniProcessor.from_pretrained(name_or_path, **kw)
            except (OSError, ValueError, TypeError, AttributeError):
                proc = None  # a folder saved without the video part (e.g. the tiny model): build it as below
        if proc is None:
            folder = Path(name_or_path)
            if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
                # transformers 5 builds an empty tokenizer from a full Omni config.json alone instead of failing
                raise OSError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the folder")
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kw)
            _check_omni_token_attributes(tokenizer, name_or_path)
            image_processor = pil_image_processor_class().from_pretrained(name_or_path, **kw)
            feature_extractor = WhisperFeatureExtractor.from_pretrained(name_or_path, **kw)
            proc = OmniProcessorNoVideo(
                image_processor=image_processor, feature_extractor=feature_extractor, tokenizer=tokenizer,
                chat_template=tokenizer.chat_template or _read_chat_template(name_or_path),
            )
    except (OSError, ValueError) as err:  # ValueError: a folder without tokenizer files ("Couldn't instantiate ...")
        err = " ".join(str(err).split())
        raise ModelLoadError(
            f"cannot load the processor of '{name_or_path}': {err}\n"
            "Fix: pass a local folder that holds the tokenizer and processor files, or a Hub id while online."
        ) from None
    if max_pixels is not None:
        _set_pixel_caps(proc.image_processor, max_pixels, min_pixels)
    if proc.chat_template is None:
        proc.chat_template = _read_chat_template(name_or_path)
    return proc


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")

# The tokenizer attributes the Omni processor reads, as `tokenizer_config.json` names them.
OMNI_TOKEN_KEYS = ["image_token", "audio_token", "video_token", "vision_bos_token", "vision_eos_token",
                   "audio_bos_token", "audio_eos_token"]


def _check_omni_token_attributes(tokenizer, name_or_path: str) -> None:
    """Refuse, in one line, a tokenizer without the Omni token attributes. `Qwen2_5OmniProcessor` reads
    `tokenizer.image_token` etc., which a tokenizer_config.json sets as top-level keys (the Hub checkpoint's
    form) or under `extra_special_tokens`; without them it ends in "AttributeError: Qwen2Tokenizer has no
    attribute image_token"."""
    missing = [k for k in OMNI_TOKEN_KEYS if not isinstance(getattr(tokenizer, k, None), str)]
    if missing:
        where = Path(name_or_path) / "tokenizer_config.json" if Path(name_or_path).is_dir() else f"{name_or_path}: tokenizer_config.json"
        raise ModelLoadError(
            f"{where} does not name the Qwen2.5-Omni tokens {', '.join(missing)}; fix: add them as top-level keys, "
            'as Qwen/Qwen2.5-Omni-7B\'s has them (e.g. "image_token": "<|IMAGE|>"), or under "extra_special_tokens"'
        )


def _set_pixel_caps(image_processor, max_pixels: int, min_pixels: int | None) -> None:
    """Cap the pixels of each image the way transformers 5.x wants it: through `size`
    (`longest_edge` = max pixels, `shortest_edge` = min pixels), never the `max_pixels` / `min_pixels`
    attributes, which the Qwen2-VL image processor's `_standardize_kwargs` reads on every call and answers
    with a FutureWarning ("deprecated and will be removed in v5.23", transformers 5.23
    models/qwen2_vl/image_processing_qwen2_vl.py and image_processing_pil_qwen2_vl.py)."""
    size = dict(getattr(image_processor, "size", None) or {})
    size["longest_edge"] = max_pixels
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    image_processor.size = size
    for legacy in ("max_pixels", "min_pixels"):
        if getattr(image_processor, legacy, None) is not None:
            setattr(image_processor, legacy, None)


def _read_chat_template(name_or_path: str) -> str | None:
    p = Path(name_or_path) / "chat_template.jinja"
    if p.is_file():
        return p.read_text()
    p = Path(name_or_path) / "chat_template.json"
    if p.is_file():
        return json.loads(p.read_text()).get("chat_template")
    return None


def resolve_thinker_config(name_or_path: str, revision: str | None = None):
    """(thinker config, is_full_omni). Accepts a full Qwen2.5-Omni checkpoint or a thinker-only one."""
    from transformers import AutoConfig

    kw: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        cfg = AutoConfig.from_pretrained(name_or_path, **kw)
    except Exception as err:  # OSError, ValueError, and huggingface_hub's StrictDataclassError for bad field values
        err = " ".join(str(err).split()) or type(err).__name__
        raise ModelLoadError(
            f"cannot read the config of '{name_or_path}': {err}\n"
            "Fix: pass a folder with config.json (a Qwen2.5-Omni or thinker checkpoint) or a Hub id while online."
        ) from None
    if cfg.model_type == "qwen2_5_omni":
        return cfg.thinker_config, True
    if cfg.model_type == "qwen2_5_omni_thinker":
        return cfg, False
    raise ModelLoadError(
        f"'{name_or_path}' is a '{cfg.model_type}' model; echoink-lite trains Qwen2.5-Omni "
        "(model_type qwen2_5_omni or qwen2_5_omni_thinker). Fix: set model.name_or_path to such a checkpoint."
    )


# The kit's one map from a dtype name (recipes, `--dtype`) to torch's dtype.
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


THREADS_ENV = "ECHOINK_THREADS"


def usable_cpus() -> int:
    """CPUs this process may run on: `os.sched_getaffinity` honours taskset and container cpusets, which
    `os.cpu_count()` (every CPU of the host) does not."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def configure_torch_threads(environ: dict[str, str] | None = None) -> tuple[int, str]:
    """Set torch's CPU thread count on purpose; returns (threads, where the number came from).

    In this order: `ECHOINK_THREADS`; else `OMP_NUM_THREADS` (the variable torch itself reads, and the one
    torchrun sets to 1 per process); else the CPUs this process may run on. On a machine shared with other
    jobs, fewer threads than CPUs is faster: threads that wait for each other's CPU time make every step
    several times slower, so set `ECHOINK_THREADS=1` there. Raises ValueError on a value that is not a
    positive integer.
    """
    env = os.environ if environ is None else environ
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        raw = env.get(name, "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"{name}={raw!r} is not a positive whole number of threads; "
                                 f"set it to 1..{usable_cpus()} or unset it")
            threads, source = int(raw), name
            break
    else:
        threads, source = usable_cpus(), "usable CPUs"
    torch.set_num_threads(threads)
    return threads, source


def quantization_config(q, dtype: torch.dtype):
    """BitsAndBytesConfig for the recipe's quantization section (None when not quantizing)."""
    if not q.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    skip = [] if q.quantize_lm_head else [LM_HEAD]
    if not q.quantize_audio_tower:
        skip.append(AUDIO_TOWER)
    if not q.quantize_vision_tower:
        skip.append(VISION_TOWER)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip,
    )


def load_thinker(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str = "bfloat16",
    quantization=None,
    attn_implementation: str = "sdpa",
    device: torch.device | str | None = None,
):
    """Load only the thinker, frozen, optionally 4-bit. `quantization` is a recipe QuantizationSection."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    device = torch.device(device) if device is not None else default_device()
    cfg, _is_full = resolve_thinker_config(name_or_path, revision)
    problem = attention_refusal(attn_implementation)  # flash_attention_2 until a GPU test proves the engine exact
    if problem:
        raise ModelLoadError(problem)
    tdtype = torch_dtype(dtype)
    qcfg = quantization_config(quantization, tdtype) if quantization is not None else None
    kw: dict[str, Any] = dict(
        config=cfg, dtype=tdtype, attn_implementation=attn_implementation, use_safetensors=True,
        device_map={"": device.index if device.type == "cuda" and device.index is not None else str(device)},
    )
    if revision:
        kw["revision"] = revision
    if qcfg is not None:
        kw["quantization_config"] = qcfg
    try:
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(name_or_path, **kw)
    except OSError as err:
        raise ModelLoadError(
            f"cannot load thinker weights from '{name_or_path}': {err}\n"
            "echoink-lite reads safetensors only. Fix: use a checkpoint with *.safetensors files."
        ) from None
    model.requires_grad_(False)
    _fix_bnb_cpu(model)
    model.config.use_cache = True
    return model


def load_thinker_from_recipe(recipe, device=None):
    m = recipe.model
    return load_thinker(
        m.name_or_path, revision=m.revision, dtype=m.dtype, quantization=recipe.quantization,
        attn_implementation=m.attn_implementation, device=device,
    )


def _fix_bnb_cpu(model) -> None:
    # On CPUs with AVX512-BF16, a no-grad forward repacks 4-bit weights in place and breaks training later.
    try:
        import bitsandbytes as bnb
    except Exception:
        return
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit) and hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing on a transformers model or a PEFT model around one.

    Non-reentrant works with frozen inputs and DDP without `enable_input_require_grads`. transformers 5.23
    names the method `activation_checkpointing_enable` and keeps `gradient_checkpointing_enable` as a
    deprecated alias that raises a FutureWarning on every call; 5.17 has only the old name.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_target_regex(target_modules: list[str]) -> str:
    names = "|".join(re.escape(t) for t in target_modules)
    return rf"{LLM_LAYER_PREFIX}\.(self_attn|mlp)\.({names})"


def add_lora(model, lora, gradient_checkpointing: bool = True, seed: int | None = None):
    """Wrap a frozen thinker with LoRA adapters on the language model's projections only."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_target_regex(lora.target_modules),
        bias="none", task_type="CAUSAL_LM",
    )
    if seed is not None:
        torch.manual_seed(seed)
    with peft_reading_deprecated_property():
        peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # LoRA weights and their Adam state in fp32: stable with bf16 compute
    return peft_model


@contextmanager
def peft_reading_deprecated_property():
    """Wrap a PEFT model around a thinker without a warning the kit cannot act on.

    peft 0.21's `PeftModel.__init__` reads `model.is_gradient_checkpointing` (peft/peft_model.py), which
    transformers 5.23 deprecated in favour of `is_activation_checkpointing`: a FutureWarning on every
    `get_peft_model` / `PeftModel.from_pretrained`, whatever the caller does. Only that message is ignored,
    only inside this block.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def multimodal_token_ids(tokenizer) -> list[int]:
    ids = []
    for tok in MULTIMODAL_TOKENS:
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.append(i)
    return ids
