"""The thinker's sizes without the network: its config, the dimensions the memory estimate reads, and
parameter counts.

The config comes from a local folder's config.json, from the local Hugging Face cache for a Hub id, or for
`Qwen/Qwen2.5-Omni-7B` from the bundled copy of the real thinker config in `echoink_lite/configs/`; nothing
is downloaded. `Dims` holds the sizes the estimate needs (every one a count of at least 1, or a one-line
error). `count_parameters` counts the thinker's parameters analytically, split the way memory is spent
(4-bit linear layers, compute-dtype rest, towers); memory_estimate.py turns them into bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-Omni-7B"
BUNDLED_CONFIG = Path(__file__).parent / "configs" / "qwen2_5_omni_7b_thinker.json"


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


# The sizes Dims.from_config reads, by config section.
_SIZE_KEYS = (
    ("text_config", ("hidden_size", "num_attention_heads", "head_dim", "intermediate_size", "num_hidden_layers",
                           "num_key_value_heads", "vocab_size")),
    ("audio_config", ("d_model", "encoder_layers", "num_hidden_layers", "encoder_ffn_dim", "num_mel_bins",
                            "output_dim", "max_source_positions")),
    ("vision_config", ("hidden_size", "embed_dim", "depth", "intermediate_size", "in_channels", "in_chans",
                             "patch_size", "temporal_patch_size", "spatial_merge_size", "out_hidden_size")),
)


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
        for section, keys in _SIZE_KEYS:  # every size read is a count: a 0 or -5 gave a ZeroDivisionError or a fit
            for key in keys:
                value = {"text_config": t, "audio_config": a, "vision_config": v}[section].get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise PlanError(f"the model config's {section}.{key} is {value!r}; sizes are whole numbers of at "
                                    "least 1. Fix: restore the model folder's config.json")
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

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer for one token, in bf16/fp16 (56 KiB for Qwen2.5-Omni-7B)."""
        return 2 * self.layers * self.kv_out * 2

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each LLM layer projection."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_out), "k_proj": (h, self.kv_out), "v_proj": (h, self.kv_out), "o_proj": (self.q_out, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def pixels_per_visual_token(self) -> int:
        return (self.v_patch * self.v_merge) ** 2


# ---------------------------------------------------------------------------------------------------
# Parameter counts (tests/test_plan.py checks them against a meta-device model built from the config)
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

