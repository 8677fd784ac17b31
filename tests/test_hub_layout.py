"""The tiny checkpoint every test loads has the layout of the real Qwen/Qwen2.5-Omni-7B Hub repository, and
the kit loads all of it: every thinker tensor, the Hub's tokenizer and processor files, multi-token tags.

Also: a tokenizer_config.json without the Omni token attributes is refused in one line, and
`echoink-lite tiny` writes the Hub layout by default and the thinker-only one on request.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from echoink_lite import modeling
from echoink_lite.tiny import HUB_PREPROCESSOR_CONFIG, OMNI_TOKEN_ATTRIBUTES, SPECIAL_TOKENS, TAGS

PROCESSOR_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "chat_template.json")


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_the_default_tiny_checkpoint_has_the_hub_layout(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_omni"
    assert {"thinker_config", "talker_config", "token2wav_config"} <= set(cfg)
    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(f"-of-{len(shards):05d}.safetensors" in s for s in shards)
    assert sorted(p.name for p in tiny_model_dir.glob("*.safetensors")) == shards
    prefixes = {k.split(".")[0] for k in index["weight_map"]}
    assert prefixes == {"thinker", "talker", "token2wav"}
    # the speaker embeddings load without unpickling code
    assert "Chelsie" in torch.load(tiny_model_dir / "spk_dict.pt", weights_only=True)
    # the Hub's processor files, not the ones transformers 5 writes when it saves a processor
    for name in PROCESSOR_FILES:
        assert (tiny_model_dir / name).is_file(), name
    assert not (tiny_model_dir / "processor_config.json").exists() and not (tiny_model_dir / "chat_template.jinja").exists()
    assert json.loads((tiny_model_dir / "preprocessor_config.json").read_text()) == HUB_PREPROCESSOR_CONFIG
    assert "<|audio_bos|><|AUDIO|><|audio_eos|>" in json.loads((tiny_model_dir / "chat_template.json").read_text())["chat_template"]
    tok_cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert {k: tok_cfg[k] for k in OMNI_TOKEN_ATTRIBUTES} == OMNI_TOKEN_ATTRIBUTES  # top-level keys, as the Hub's
    assert "extra_special_tokens" not in tok_cfg and tok_cfg["tokenizer_class"] == "Qwen2Tokenizer"


def test_every_thinker_tensor_loads_from_the_hub_layout(tiny_model_dir):
    """All thinker tensors of the sharded `thinker.*` checkpoint reach the loaded thinker, none left at its
    random init, none of the talker's or token2wav's."""
    from echoink_lite.merge_base import thinker_module_name

    model = modeling.load_thinker(str(tiny_model_dir), dtype="float32", device="cpu")
    state = model.state_dict()
    stored = {k[len("thinker."):]: t for k, t in checkpoint_tensors(tiny_model_dir).items() if k.startswith("thinker.")}
    assert len(stored) == len(state) == 128
    for key, tensor in stored.items():
        assert torch.equal(state[thinker_module_name(key)], tensor), key


def test_the_thinker_only_layout_holds_the_same_thinker(tiny_model_dir, tiny_thinker_only_dir):
    cfg = json.loads((tiny_thinker_only_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_omni_thinker"
    assert (tiny_thinker_only_dir / "processor_config.json").is_file() and (tiny_thinker_only_dir / "chat_template.jinja").is_file()
    full = {k[len("thinker."):]: t for k, t in checkpoint_tensors(tiny_model_dir).items() if k.startswith("thinker.")}
    alone = checkpoint_tensors(tiny_thinker_only_dir)
    assert set(alone) == set(full)
    assert all(torch.equal(alone[k], full[k]) for k in alone)


@pytest.mark.parametrize("layout", ["hub", "thinker-only"])
def test_the_tags_are_several_tokens_and_the_specials_follow_the_vocabulary(tiny_model_dir, tiny_thinker_only_dir, layout):
    folder = tiny_model_dir if layout == "hub" else tiny_thinker_only_dir
    tok = modeling.load_processor(str(folder)).tokenizer
    vocab = tok.get_vocab()
    for tag in TAGS:
        assert tag not in vocab and len(tok(tag, add_special_tokens=False).input_ids) >= 3, tag
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS))) and ids[-1] == len(tok) - 1
    assert ids[0] > 256  # after the byte alphabet and the merges, as in Qwen2 (151643)
    if layout == "thinker-only":
        return
    thinker_vocab = json.loads((tiny_model_dir / "config.json").read_text())["thinker_config"]["text_config"]["vocab_size"]
    assert thinker_vocab > len(tok)  # unused rows past the tokenizer, as in the real 152,064-row vocabulary
    # the reply format still reads back from decoded text
    reply = "<think>red low</think><answer>A</answer>"
    assert tok.decode(tok(reply, add_special_tokens=False).input_ids) == reply


def test_the_hub_processor_pads_to_300_seconds_and_the_kit_cuts_to_the_clip(tiny_model_dir):
    import numpy as np
    from PIL import Image

    from echoink_lite.prompting import encode_text_prompt, render_prompt

    processor = modeling.load_processor(str(tiny_model_dir), max_pixels=64 * 28 * 28)
    assert processor.feature_extractor.n_samples == 300 * 16000 and processor.chat_template
    audio = np.zeros(16000, dtype=np.float32)
    image = Image.new("RGB", (56, 56), (200, 40, 40))
    raw = processor(text=[render_prompt(processor, "q")], images=[image], audio=[audio], return_tensors="pt")
    assert raw["input_features"].shape[-1] == 30000 and int(raw["feature_attention_mask"].sum()) == 100
    enc = encode_text_prompt(processor, "q", image, audio)
    assert enc.input_features.shape == (128, 100) and enc.feature_attention_mask.tolist() == [1] * 100


@pytest.mark.parametrize("form", ["top-level", "extra_special_tokens", "none"])
def test_tokenizer_config_without_the_omni_token_attributes_is_refused_in_one_line(tiny_model_dir, tmp_path, form):
    for name in PROCESSOR_FILES:
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    attrs = {k: cfg.pop(k) for k in OMNI_TOKEN_ATTRIBUTES}
    if form == "top-level":
        cfg.update(attrs)
    elif form == "extra_special_tokens":
        cfg["extra_special_tokens"] = attrs
    path.write_text(json.dumps(cfg))
    if form != "none":
        assert modeling.load_processor(str(tmp_path)).audio_token == "<|AUDIO|>"
        return
    with pytest.raises(modeling.ModelLoadError) as err:
        modeling.load_processor(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "extra_special_tokens" in msg
    assert all(k in msg for k in OMNI_TOKEN_ATTRIBUTES)


def test_tiny_command_writes_the_hub_layout_by_default_and_the_thinker_alone_on_request(tmp_path, capsys):
    from echoink_lite.cli import main

    assert main(["tiny", str(tmp_path / "hub")]) == 0
    assert main(["tiny", str(tmp_path / "thinker"), "--thinker-only"]) == 0
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    assert (tmp_path / "hub" / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "thinker" / "config.json").read_text())["model_type"] == "qwen2_5_omni_thinker"
    assert (tmp_path / "thinker" / "model.safetensors").is_file()
