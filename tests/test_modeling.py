"""Thinker loading (4-bit, towers and lm_head unquantized, frozen), LoRA placement, processor round trip."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from echoink_lite import modeling
from echoink_lite.recipe import LoraSection, QuantizationSection


def test_4bit_loading_keeps_towers_and_lm_head_unquantized(tiny_model_dir):
    import bitsandbytes as bnb

    m = modeling.load_thinker(str(tiny_model_dir), dtype="float32", quantization=QuantizationSection(), device="cpu")
    kinds = {n: type(mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    llm = [n for n in kinds if n.startswith("model.language_model.layers.")]
    towers = [n for n in kinds if n.startswith(("model.audio_tower", "model.visual"))]
    assert llm and towers
    assert all(issubclass(kinds[n], bnb.nn.Linear4bit) for n in llm)
    assert not any(issubclass(kinds[n], bnb.nn.Linear4bit) for n in towers)
    assert not issubclass(kinds["lm_head"], bnb.nn.Linear4bit)
    q = m.model.language_model.layers[0].self_attn.q_proj
    assert q.weight.quant_state.quant_type == "nf4"
    assert all(not p.requires_grad for p in m.parameters())


def test_quantizing_towers_is_configurable(tiny_model_dir):
    import bitsandbytes as bnb

    m = modeling.load_thinker(str(tiny_model_dir), dtype="float32", device="cpu",
                              quantization=QuantizationSection(quantize_audio_tower=True))
    assert isinstance(m.model.audio_tower.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(m.model.visual.blocks[0].mlp.up_proj, bnb.nn.Linear4bit)


def test_lora_only_on_language_model_projections(tiny_model_dir):
    m = modeling.load_thinker(str(tiny_model_dir), dtype="float32", quantization=QuantizationSection(), device="cpu")
    pm = modeling.add_lora(m, LoraSection(r=4, alpha=8))
    lora_modules = {n.split(".lora_")[0] for n, _ in pm.named_parameters() if "lora_" in n}
    assert lora_modules, "no LoRA was added"
    assert not any("audio_tower" in n or "visual" in n or "lm_head" in n for n in lora_modules)
    # every projection of every LLM layer got one: 4 layers x 7 projections
    assert len(lora_modules) == 4 * 7
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "lora_" in n)


def test_plain_name_list_would_hit_the_towers(tiny_model_dir):
    """The trap the regex avoids: the bare names also match tower modules."""
    m = modeling.load_thinker(str(tiny_model_dir), dtype="float32", device="cpu")
    import re

    names = [n for n, _ in m.named_modules()]
    bare = [n for n in names if n.split(".")[-1] in ("q_proj", "up_proj") and ("audio_tower" in n or "visual" in n)]
    assert bare, "the tiny towers should contain q_proj/up_proj modules like the real ones"
    rx = re.compile(modeling.lora_target_regex(["q_proj", "up_proj"]))
    assert not any(rx.fullmatch(n) for n in bare)


def test_thinker_loads_from_a_thinker_only_checkpoint(tiny_thinker_only_dir):
    cfg, is_full = modeling.resolve_thinker_config(str(tiny_thinker_only_dir))
    assert not is_full and cfg.model_type == "qwen2_5_omni_thinker"
    m = modeling.load_thinker(str(tiny_thinker_only_dir), dtype="float32", device="cpu")
    from safetensors.torch import load_file

    sd = load_file(str(tiny_thinker_only_dir / "model.safetensors"))
    torch.testing.assert_close(m.lm_head.weight, sd["lm_head.weight"])


def test_non_omni_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(modeling.ModelLoadError, match="trains Qwen2.5-Omni"):
        modeling.resolve_thinker_config(str(tmp_path))


@pytest.mark.parametrize("layout", ["hub", "thinker-only"])
def test_processor_round_trip_with_audio_and_image(tiny_model_dir, tiny_thinker_only_dir, layout):
    folder = tiny_model_dir if layout == "hub" else tiny_thinker_only_dir
    proc = modeling.load_processor(str(folder), max_pixels=64 * 28 * 28)
    assert type(proc).__name__ in ("OmniProcessorNoVideo", "Qwen2_5OmniProcessor")
    saved = json.loads((folder / ("preprocessor_config.json" if layout == "hub" else "processor_config.json")).read_text())
    assert saved["processor_class"] == "Qwen2_5OmniProcessor"
    from echoink_lite.prompting import render_prompt

    text = render_prompt(proc, "What is it?")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>What is it?<|im_end|>")
    audio = np.sin(np.arange(16000 * 2) / 16000 * 2 * np.pi * 440).astype(np.float32)  # 2 s -> 50 audio tokens
    img = Image.new("RGB", (112, 56), (255, 0, 0))  # 8 x 4 patches -> 2 x 4 merged = 8 visual tokens
    out = proc(text=[text], images=[img], audio=[audio], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    tok = proc.tokenizer
    assert ids.count(tok.convert_tokens_to_ids("<|AUDIO|>")) == 50
    assert ids.count(tok.convert_tokens_to_ids("<|IMAGE|>")) == 8
    assert out["input_features"].shape[:2] == (1, 128)
    assert int(out["feature_attention_mask"].sum()) == 200  # 100 mel frames per second
    m = modeling.load_thinker(str(folder), dtype="float32", device="cpu")
    with torch.no_grad():
        logits = m(**out).logits
    assert logits.shape[:2] == out["input_ids"].shape and torch.isfinite(logits).all()


def test_multimodal_tokens_are_suppressed_ids(tiny_model_dir):
    proc = modeling.load_processor(str(tiny_model_dir))
    ids = modeling.multimodal_token_ids(proc.tokenizer)
    assert len(ids) == 7 and proc.tokenizer.convert_tokens_to_ids("<|im_end|>") not in ids
