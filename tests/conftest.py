"""Shared offline fixtures: a tiny Qwen2.5-Omni thinker and a small synthetic AVQA-layout data set.

Both are built once per test session with the real classes, so every test goes through the same loading
code as the real model. Nothing here touches the network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Qwen2.5-Omni in the layout of the Qwen/Qwen2.5-Omni-7B Hub repository (what users load):
    full Omni config, sharded `thinker.`/`talker.`/`token2wav.` weights, spk_dict.pt, Hub tokenizer and
    processor files."""
    from echoink_lite.tiny import build_tiny_omni

    return build_tiny_omni(tmp_path_factory.mktemp("tiny-omni"))


@pytest.fixture(scope="session")
def tiny_full_model_dir(tiny_model_dir):
    """The complete Omni checkpoint: the default tiny model is one (kept as a name for the tests that need
    the talker and token2wav)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def tiny_thinker_only_dir(tmp_path_factory):
    """The thinker-only layout (`tiny --thinker-only`: what `merge --format thinker` writes), with the same
    thinker weights as `tiny_model_dir`."""
    from echoink_lite.tiny import build_tiny_thinker

    return build_tiny_thinker(tmp_path_factory.mktemp("tiny-thinker"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """OUT with train/ (16 rows) and valid/ (8 rows) in the AVQA-R1-6K layout."""
    from echoink_lite.synth import synth_command

    out = tmp_path_factory.mktemp("synth")
    assert synth_command(out, train=16, valid=8, seed=0) == 0
    return out


def _engine_parts(tiny_model_dir, synth_dir, attn_implementation):
    from echoink_lite.data import scan_split
    from echoink_lite.modeling import add_lora, load_processor, load_thinker
    from echoink_lite.prompting import encode_example
    from echoink_lite.recipe import LoraSection, QuantizationSection
    from echoink_lite.row_media import load_example
    from echoink_lite.thinker_forward import encode_prompts

    proc = load_processor(str(tiny_model_dir))
    model = load_thinker(str(tiny_model_dir), dtype="float32", quantization=QuantizationSection(),
                         attn_implementation=attn_implementation, device="cpu")
    model = add_lora(model, LoraSection(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False, seed=0)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_" in name:  # adapters that change the outputs, so the test covers the LoRA path too
            torch.nn.init.normal_(param, std=0.1)
    rows = scan_split(synth_dir / "train").rows[:3]
    # different prompt lengths: the same media with questions of different lengths
    questions = ["Which one? Options:\nA. a\nB. b\n", "x " * 40 + "Options:\nA. a\nB. b\n", rows[2].prompt_text]
    encoded = [encode_example(proc, load_example(r, 1.0), question_text=q) for r, q in zip(rows, questions)]
    assert len({e.length for e in encoded}) == 3
    prompts = encode_prompts(model, encoded, "cpu", torch.float32)
    return proc, model, encoded, prompts


@pytest.fixture(scope="module")
def engine_setup(tiny_model_dir, synth_dir):
    """(processor, tiny 4-bit thinker with non-zero LoRA, 3 encoded prompts of different lengths, their PromptInputs)."""
    return _engine_parts(tiny_model_dir, synth_dir, "sdpa")


def accepted_attention_backends():
    """Every `model.attn_implementation` the recipe accepts (its schema's values that validation does not refuse)."""
    from typing import get_args

    from echoink_lite.recipe import ModelSection, RecipeError, load_recipe

    accepted = []
    for name in get_args(ModelSection.model_fields["attn_implementation"].annotation):
        try:
            load_recipe(None, [f"model.attn_implementation={name}"])
        except RecipeError:
            continue
        accepted.append(name)
    return accepted


@pytest.fixture(scope="module", params=accepted_attention_backends())
def backend_setup(request, tiny_model_dir, synth_dir):
    """`engine_setup` with the model loaded under each attention backend the recipe accepts."""
    return _engine_parts(tiny_model_dir, synth_dir, request.param)


@pytest.fixture(scope="session")
def eos_biased_model_dir(tiny_model_dir, synth_dir, tmp_path_factory):
    """`tiny_model_dir` with lm_head rows that make sampled completions end at different lengths and that make
    a multimodal marker likely. The random tiny model's logits are nearly flat (std ~0.2 over ~600 tokens), so
    EOS (<|im_end|>) is drawn about once in 600 tokens and every completion hits the length cap. Here the
    rows of <|im_end|> and <|IMAGE|> point along the mean of the final hidden states at the prompts' last
    positions: at temperature 0.7 with top-k 50, EOS ends most completions within 8 tokens at varied
    positions, and <|IMAGE|> would be drawn often if it were not suppressed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from echoink_lite.thinker_forward import CaptureKV, language_model, rope, run_layers

    out = tmp_path_factory.mktemp("tiny-eos-biased") / "model"
    shutil.copytree(tiny_model_dir, out)
    proc, model, _, prompts = _engine_parts(tiny_model_dir, synth_dir, "sdpa")
    lm = language_model(model)
    with torch.no_grad(), model.disable_adapter():
        last = [run_layers(lm, pr.embeds[None], rope(lm, pr.embeds[None], pr.positions[:, None, :]), None, CaptureKV())[0, -8:]
                for pr in prompts]
    mean = torch.cat(last).mean(0)
    direction = mean / mean.norm() ** 2  # logit = bias x (h . mean) / |mean|^2, about `bias` for typical h
    rows = {proc.tokenizer.convert_tokens_to_ids("<|im_end|>"): 1.8, proc.tokenizer.convert_tokens_to_ids("<|IMAGE|>"): 3.5}
    changed = 0
    for f in out.glob("*.safetensors"):  # thinker-only (lm_head.weight) or full Omni (thinker.lm_head.weight)
        tensors = load_file(str(f))
        keys = [k for k in tensors if k.endswith("lm_head.weight")]
        for key in keys:
            for token, bias in rows.items():
                tensors[key][token] = (bias * direction).to(tensors[key].dtype)
        if keys:
            save_file(tensors, str(f), metadata={"format": "pt"})
            changed += len(keys)
    assert changed == 1, f"expected one lm_head.weight in {tiny_model_dir}, changed {changed}"
    return out


def tiny_thinker_variant(tiny_model_dir, layers: int | None = None, hidden: int | None = None):
    """A tiny thinker in memory that differs from `tiny_model_dir` in depth (`layers`) or width (`hidden`)."""
    from transformers import AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration

    from echoink_lite.tiny import tiny_thinker_config

    cfg = tiny_thinker_config(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    text = cfg.text_config
    if layers is not None:
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = [text.layer_types[0]] * layers
    if hidden is not None:  # 4 heads -> head_dim hidden/4: mrope_section must sum to head_dim/2
        text.hidden_size = hidden
        rope = dict(getattr(text, "rope_parameters", None) or text.rope_scaling)
        third = hidden // 4 // 2 // 3
        rope["mrope_section"] = [third, third, hidden // 8 - 2 * third]
        if getattr(text, "rope_parameters", None) is not None:
            text.rope_parameters = rope
        else:
            text.rope_scaling = rope
        cfg.audio_config.output_dim = hidden
        cfg.vision_config.out_hidden_size = hidden
    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration(cfg).float()


@pytest.fixture(scope="session")
def mismatched_adapters(tiny_model_dir, tmp_path_factory):
    """LoRA adapters (r=4, B perturbed) trained on tiny thinkers other than `tiny_model_dir`: "deeper" (6
    layers, the base has 4), "shallower" (2 layers) and "narrower" (hidden size 96, the base has 128). Each
    records `tiny_model_dir` as its base in adapter_config.json, as an adapter moved between bases would."""
    import json

    from echoink_lite.modeling import add_lora
    from echoink_lite.recipe import LoraSection

    root = tmp_path_factory.mktemp("mismatched-adapters")
    variants = {"deeper": dict(layers=6), "shallower": dict(layers=2), "narrower": dict(hidden=96)}
    out = {}
    for name, kw in variants.items():
        model = add_lora(tiny_thinker_variant(tiny_model_dir, **kw), LoraSection(r=4, alpha=8), gradient_checkpointing=False)
        g = torch.Generator().manual_seed(0)
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.data = torch.randn(p.shape, generator=g) * 0.05
        model.save_pretrained(root / name)
        cfg_file = root / name / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = str(tiny_model_dir)
        cfg_file.write_text(json.dumps(cfg, indent=2))
        out[name] = root / name
    return out
