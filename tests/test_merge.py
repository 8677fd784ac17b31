"""Tests for echoink_lite.merge, merge_verification and export: QLoRA adapter merge into unquantized
weights, its verification, refusals (wrong base, unsafe --out), export with a model card, Hub upload call.

Adapters are real PEFT adapters on the tiny thinker (LoRA B is zero at init, so it is perturbed before
saving: an untrained adapter would make every check vacuous). The merged folders are reloaded with the
standard transformers classes and compared here independently of the merge's own verification.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

from echoink_lite.adapter_tensors import read_adapter
from echoink_lite.adapters import AdapterError
from echoink_lite.cli import main as cli_main
from echoink_lite.export import export_adapter
from echoink_lite.merge import merge_adapter
from echoink_lite.merge_base import MergeError
from echoink_lite.recipe import LoraSection

QUIET = Console(quiet=True)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _perturb_and_save(peft_model, out: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # zero at init: give the adapter a real effect
            p.data = torch.randn(p.shape, generator=g) * 0.05
    peft_model.save_pretrained(out)
    return out


def make_adapter(base_dir: Path, out: Path, seed: int = 0) -> Path:
    from echoink_lite.modeling import add_lora, load_thinker

    model = load_thinker(str(base_dir), dtype="float32", quantization=None, device="cpu")
    peft_model = add_lora(model, LoraSection(r=4, alpha=8), gradient_checkpointing=False, seed=seed)
    return _perturb_and_save(peft_model, out, seed)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    from echoink_lite.prompting import to_device

    return model(**to_device(batch, "cpu", torch.float32)).logits


@pytest.fixture(scope="module")
def prompt_batch(tiny_model_dir):
    """One synthetic audio + image prompt through the kit's prompt path."""
    import numpy as np
    from PIL import Image

    from echoink_lite.modeling import load_processor
    from echoink_lite.prompting import collate, encode_text_prompt

    processor = load_processor(str(tiny_model_dir))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(56, 56, 3), dtype=np.uint8))
    audio = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    return collate([encode_text_prompt(processor, "Which colour? A. red B. blue", image, audio)])


@pytest.fixture(scope="module")
def thinker_adapter(tiny_model_dir, tmp_path_factory):
    """An adapter on the default tiny model (the Hub layout users load), merged by default to --format thinker."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter-thinker") / "adapter")


@pytest.fixture(scope="module")
def thinker_only_adapter(tiny_thinker_only_dir, tmp_path_factory):
    """An adapter whose base is a thinker-only checkpoint (e.g. an earlier `merge --format thinker`)."""
    return make_adapter(tiny_thinker_only_dir, tmp_path_factory.mktemp("adapter-thinker-only") / "adapter")


@pytest.fixture(scope="module")
def full_adapter(tiny_full_model_dir, tmp_path_factory):
    return make_adapter(tiny_full_model_dir, tmp_path_factory.mktemp("adapter-full") / "adapter", seed=1)


def reference_logits(base_dir: Path, adapter_dir: Path, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(base + adapter unmerged, base alone) logits in fp32."""
    from peft import PeftModel

    from echoink_lite.modeling import load_thinker, peft_reading_deprecated_property

    base = load_thinker(str(base_dir), dtype="float32", quantization=None, device="cpu")
    with peft_reading_deprecated_property():
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with_adapter = logits_of(model, batch)
    with model.disable_adapter():
        plain = logits_of(model, batch)
    return with_adapter, plain


def lora_saved_keys(adapter_dir: Path, prefix: str = "") -> set[str]:
    """Checkpoint keys the adapter targets, as transformers names them on disk."""
    from echoink_lite.merge_base import thinker_saved_name

    return {prefix + thinker_saved_name(m) + ".weight" for m in read_adapter(adapter_dir).modules}


# ------------------------------------------------------------------------------------------
# merges
# ------------------------------------------------------------------------------------------


def test_merge_thinker_from_thinker_base_fp32(tiny_thinker_only_dir, thinker_only_adapter, prompt_batch, tmp_path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    out = tmp_path / "merged"
    report = merge_adapter(thinker_only_adapter, out, format="thinker", dtype="fp32", verify=True, console=QUIET)

    # base id came from adapter_config.json; the built-in verification passed and says what it measured
    assert report["base"] == str(tiny_thinker_only_dir)
    assert report["ok"] is True
    v = report["verification"]
    assert v["logits"]["max_abs_diff"] <= v["logits"]["tolerance"] <= 2e-4
    assert v["logits"]["adapter_effect_max_abs"] > 100 * v["logits"]["tolerance"]  # the check is not vacuous
    assert v["weights"]["lora_tensors_changed"] == 28 and v["weights"]["other_tensors_differ"] == 0
    assert v["size"]["ok"] and v["logits"]["reload"]["thinker"]["missing_keys"] == 0

    # independently: standard class reload, logits equal base + adapter (unmerged PEFT) in fp32
    merged = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    got = logits_of(merged, prompt_batch)
    want, plain = reference_logits(tiny_thinker_only_dir, thinker_only_adapter, prompt_batch)
    assert (got - want).abs().max().item() < 1e-4
    assert (plain - want).abs().max().item() > 1e-2  # the adapter does change the logits

    # weights: LoRA targets differ from the base, everything else bit-identical, same key names
    base_t, out_t = tensors(tiny_thinker_only_dir), tensors(out)
    assert set(out_t) == set(base_t)
    lora_keys = lora_saved_keys(thinker_only_adapter)
    assert len(lora_keys) == 28 and lora_keys <= set(out_t)
    for k, t in out_t.items():
        assert t.dtype == torch.float32
        if k in lora_keys:
            assert not torch.equal(t, base_t[k]), k
        else:
            assert torch.equal(t, base_t[k]), k

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_omni_thinker" and cfg["dtype"] == "float32" and cfg["use_cache"] is True
    assert json.loads((out / "generation_config.json").read_text())["use_cache"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not (out / "spk_dict.pt").exists()


def test_merge_thinker_and_full_from_full_base(tiny_full_model_dir, tiny_thinker_only_dir, full_adapter, prompt_batch, tmp_path):
    from transformers import AutoConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    base_t = tensors(tiny_full_model_dir)
    want, _ = reference_logits(tiny_full_model_dir, full_adapter, prompt_batch)
    lora_keys = lora_saved_keys(full_adapter)

    # --- thinker format: thinker.* taken, prefix dropped, named exactly as transformers saves a thinker
    out_t = tmp_path / "thinker"
    report = merge_adapter(full_adapter, out_t, format="thinker", dtype="fp32", verify=True, console=QUIET)
    assert report["ok"] is True and report["base_is_full"] is True
    merged_t = tensors(out_t)
    assert set(merged_t) == set(tensors(tiny_thinker_only_dir))  # key naming of Qwen2_5OmniThinker...save_pretrained
    assert not any(k.startswith(("thinker.", "talker.", "token2wav.")) for k in merged_t)
    cfg = AutoConfig.from_pretrained(str(out_t))
    assert cfg.model_type == "qwen2_5_omni_thinker" and cfg.architectures == ["Qwen2_5OmniThinkerForConditionalGeneration"]
    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out_t), dtype=torch.float32).eval()
    assert (logits_of(thinker, prompt_batch) - want).abs().max().item() < 1e-4
    for k, t in merged_t.items():
        assert torch.equal(t, base_t["thinker." + k]) == (k not in lora_keys), k

    # --- full format: thinker merged, talker / token2wav bit-identical, spk_dict.pt copied
    out_f = tmp_path / "full"
    report = merge_adapter(full_adapter, out_f, format="full", dtype="fp32", verify=True, console=QUIET)
    assert report["ok"] is True
    assert report["verification"]["logits"]["reload"]["full_model"]["mismatched_keys"] == 0
    merged_f = tensors(out_f)
    assert set(merged_f) == set(base_t)
    talker_keys = [k for k in base_t if k.startswith(("talker.", "token2wav."))]
    assert talker_keys
    for k in talker_keys:
        assert merged_f[k].dtype == base_t[k].dtype and torch.equal(merged_f[k], base_t[k]), k
    for k in lora_keys:
        assert not torch.equal(merged_f["thinker." + k], base_t["thinker." + k]), k
    assert (out_f / "spk_dict.pt").read_bytes() == (tiny_full_model_dir / "spk_dict.pt").read_bytes()

    full = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(out_f), dtype=torch.float32)
    assert type(full).__name__ == "Qwen2_5OmniForConditionalGeneration" and "Chelsie" in full.speaker_map
    del full
    cfg_f = AutoConfig.from_pretrained(str(out_f))
    thinker_f = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out_f), config=cfg_f.thinker_config, dtype=torch.float32).eval()
    assert (logits_of(thinker_f, prompt_batch) - want).abs().max().item() < 1e-4


def test_merge_bf16_is_half_the_size_and_shards(tiny_thinker_only_dir, thinker_adapter, tmp_path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    # a sharded base, as transformers writes it (index + model-0000i-of-0000N.safetensors)
    sharded_base = tmp_path / "sharded-base"
    Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(tiny_thinker_only_dir), dtype=torch.float32).save_pretrained(
        sharded_base, max_shard_size="1MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        shutil.copy(tiny_thinker_only_dir / name, sharded_base / name)
    assert (sharded_base / "model.safetensors.index.json").is_file()

    # sharded output (small shard limit), fp32, from the single-file base
    out32, out16 = tmp_path / "fp32", tmp_path / "bf16"
    report32 = merge_adapter(thinker_adapter, out32, dtype="fp32", verify=False, console=QUIET, max_shard_size=1_000_000)
    assert report32["ok"] is None and len(report32["shards"]) > 1
    index = json.loads((out32 / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == report32["shards"]
    assert all(name.startswith("model-0000") and f"-of-{len(report32['shards']):05d}" in name for name in report32["shards"])

    # bf16 from the sharded base, single output file, verified
    report = merge_adapter(thinker_adapter, out16, base=str(sharded_base), dtype="bf16", verify=True, console=QUIET)
    assert report["ok"] is True and report["shards"] == ["model.safetensors"]
    v = report["verification"]
    assert v["size"]["ok"] and abs(v["size"]["ratio"] - 1) < 0.05
    assert v["logits"]["dtype"] == "bfloat16" and v["logits"]["max_abs_diff"] <= v["logits"]["tolerance"]

    ratio = weight_bytes(out16) / weight_bytes(out32)
    assert 0.45 < ratio < 0.55, ratio
    assert abs(weight_bytes(out32) / weight_bytes(tiny_thinker_only_dir) - 1) < 0.02  # fp32 base: an fp32 merge is the same size
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    t16, t32 = tensors(out16), tensors(out32)
    assert set(t16) == set(t32) == set(tensors(tiny_thinker_only_dir))
    assert all(t.dtype == torch.bfloat16 for t in t16.values())
    # cast once from the fp32 merge: bf16 output == bf16(fp32 output), bit for bit
    assert all(torch.equal(t16[k], t32[k].to(torch.bfloat16)) for k in t32)

    # the sharded fp32 output reloads with the standard class
    model, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out32), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


# ------------------------------------------------------------------------------------------
# refusals: nothing is written
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, telling", [
    ("narrower", ["hidden_size=96", "hidden_size=128", "other sizes than the base (e.g. model.language_model.layers.0."]),
    ("deeper", ["layers 4-5, which the base does not have (the base has 4 layers)"]),  # depth: 6 layers vs 4
])
def test_mismatched_base_refused_before_writing(tiny_model_dir, mismatched_adapters, variant, telling, tmp_path, capsys):
    adapter = mismatched_adapters[variant]
    out = tmp_path / "merged"
    with pytest.raises(AdapterError) as err:
        merge_adapter(adapter, out, base=str(tiny_model_dir), console=QUIET)
    msg = str(err.value)
    assert "does not fit the base" in msg and str(adapter) in msg
    assert all(t in msg for t in telling), msg
    assert "Fix:" in msg and "--base" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder

    # and through the CLI: exit 2, one line on stderr, nothing written
    capsys.readouterr()
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(out), "--base", str(tiny_model_dir)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("echoink-lite merge: error: adapter ") and err_text.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_out_inside_the_adapter_folder_is_refused(thinker_adapter, tmp_path):
    adapter = tmp_path / "run" / "adapter"
    shutil.copytree(thinker_adapter, adapter)
    before = sorted(p.name for p in adapter.iterdir())
    for out in (adapter / "merged", adapter / "a" / "b", adapter / ".." / "adapter" / "merged"):
        with pytest.raises(MergeError, match="inside the adapter folder") as err:
            merge_adapter(adapter, out, console=QUIET)
        assert "Fix: pass a folder outside it" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_a_stranger_partial_folder_is_kept_and_a_failed_write_leaves_nothing(thinker_adapter, tmp_path, monkeypatch):
    import errno

    from echoink_lite import merge

    stranger = tmp_path / "merged.partial"  # someone else's folder that happens to have that name
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    merge_adapter(thinker_adapter, tmp_path / "merged", dtype="fp32", verify=False, console=QUIET)
    assert (stranger / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.partial"]

    def disk_full(base, plan, adapter, out, max_shard_bytes, progress=None):
        (out / "model.safetensors").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))

    monkeypatch.setattr(merge, "_write_weights", disk_full)
    with pytest.raises(MergeError) as err:
        merge_adapter(thinker_adapter, tmp_path / "merged2", dtype="fp32", verify=False, console=QUIET)
    msg = str(err.value)
    assert msg.startswith("no space left on device while writing ") and "model.safetensors" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.partial"]  # no temporary folder left


def test_unwritable_out_is_one_line_naming_the_path(thinker_adapter, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "merged"
    assert cli_main(["merge", "--adapter", str(thinker_adapter), "--out", str(out), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write --out {out}" in err and f"{blocker} is a file" in err and "Fix:" in err
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("flags,needle", [
    (["--max-shard-size-gb", "nan"], "--max-shard-size-gb nan: expected a size from 0.01 to 1024 GB"),
    (["--max-shard-size-gb", "inf"], "--max-shard-size-gb inf: expected"),
    (["--max-shard-size-gb", "0"], "--max-shard-size-gb 0.0: expected"),
    (["--verify-device", "gpu0"], "--verify-device 'gpu0' is not a torch device"),
    (["--verify-device", "meta"], "--verify-device meta: the verification runs on cpu or cuda only"),
    (["--verify-device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s)"),
])
def test_merge_options_refused_before_writing(thinker_adapter, flags, needle, tmp_path, capsys):
    """A NaN shard size was a traceback, and an unusable --verify-device failed after the whole merge was written."""
    out = tmp_path / "merged"
    assert cli_main(["merge", "--adapter", str(thinker_adapter), "--out", str(out), *flags]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert needle in line and "Fix:" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_full_format_from_thinker_only_base_refused(thinker_only_adapter, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="--format full needs a full Qwen2.5-Omni base") as err:
        merge_adapter(thinker_only_adapter, out, format="full", console=QUIET)
    assert "thinker-only" in str(err.value) and "--format thinker" in str(err.value)
    assert not out.exists()


def test_other_refusals(tiny_model_dir, thinker_adapter, tmp_path):
    # no base anywhere
    no_base = tmp_path / "no-base"
    shutil.copytree(thinker_adapter, no_base)
    cfg = json.loads((no_base / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (no_base / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="--base"):
        merge_adapter(no_base, tmp_path / "o1", console=QUIET)

    # a target module that the base does not have
    bad_target = tmp_path / "bad-target"
    shutil.copytree(thinker_adapter, bad_target)
    cfg = json.loads((bad_target / "adapter_config.json").read_text())
    cfg["target_modules"] = r"model\.language_model\.layers\.\d+\.self_attn\.qkv_proj"
    (bad_target / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="select no module of the base"):
        merge_adapter(bad_target, tmp_path / "o2", console=QUIET)

    # pickle-only base
    bin_base = tmp_path / "bin-base"
    bin_base.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bin_base / "config.json")
    (bin_base / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(MergeError, match="safetensors"):
        merge_adapter(thinker_adapter, tmp_path / "o3", base=str(bin_base), console=QUIET)

    # an existing, non-empty --out is never overwritten
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge_adapter(thinker_adapter, busy, console=QUIET)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_rslora_scale(thinker_adapter, tmp_path):
    assert {m.scale for m in read_adapter(thinker_adapter).modules.values()} == {8 / 4}
    rs = tmp_path / "rs"
    shutil.copytree(thinker_adapter, rs)
    cfg = json.loads((rs / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (rs / "adapter_config.json").write_text(json.dumps(cfg))
    assert {m.scale for m in read_adapter(rs).modules.values()} == {8 / 2}  # alpha / sqrt(r)


# ------------------------------------------------------------------------------------------
# export and the Hub call
# ------------------------------------------------------------------------------------------


class FakeHfApi:
    calls: list[tuple[str, dict]] = []

    def create_repo(self, **kw):
        FakeHfApi.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        FakeHfApi.calls.append(("upload_folder", kw))


def test_export_adapter_clean_folder_with_model_card(tiny_model_dir, thinker_adapter, tmp_path, monkeypatch):
    messy = tmp_path / "run-adapter"  # a training folder holds more than the adapter
    shutil.copytree(thinker_adapter, messy)
    (messy / "optimizer.pt").write_bytes(b"not exported")
    (messy / "trainer_state.json").write_text("{}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora:\n  r: 4\n  alpha: 8\ngrpo:\n  group_size: 8\n")
    local_split = tmp_path / "home" / "me" / "secret-data" / "valid"  # the eval summary records the local path
    summary = {"data": str(local_split / "omni_rl_format_valid.json"), "rows_evaluated": 8, "parse_rule": "strict",
               "results": [{"label": "base", "n_rows": 8, "accuracy": 0.25, "format_failure_rate": 0.5},
                           {"label": "adapter", "n_rows": 8, "accuracy": 0.875, "format_failure_rate": 0.0}],
               "difference_pp": 62.5}
    summary_file = tmp_path / "preds.summary.json"
    summary_file.write_text(json.dumps(summary))

    out = export_adapter(messy, tmp_path / "export", recipe_path=recipe, eval_summary=summary_file)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() == (thinker_adapter / "adapter_model.safetensors").read_bytes()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir) and cfg["inference_mode"] is True
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "library_name: peft" in card
    assert "87.50%" in card and "25.00%" in card and "+62.50" in card
    assert "group_size: 8" in card and "r=4" in card
    assert "split: `valid`" in card and "secret-data" not in card  # the split's name, not the local data path
    assert "From `recipe.yaml`" in card and str(recipe) not in card

    # the exported folder is a loadable PEFT adapter
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out)).r == 4

    # no summary / recipe: the card says so; --base overrides the recorded base id (the adapter must fit it)
    renamed_base = tmp_path / "Qwen2.5-Omni-tiny"
    shutil.copytree(tiny_model_dir, renamed_base)
    out2 = export_adapter(thinker_adapter, tmp_path / "export2", base=str(renamed_base))
    card2 = (out2 / "README.md").read_text()
    assert f"base_model: {renamed_base}" in card2 and "No evaluation results" in card2
    with pytest.raises(MergeError, match="accuracy"):
        export_adapter(thinker_adapter, tmp_path / "export3", eval_summary={"rows": 3})

    # --push-to-hub: a thin create_repo + upload_folder call (faked here: no network in tests)
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    assert cli_main(["export", "--adapter", str(thinker_adapter), "--out", str(tmp_path / "export4"),
                     "--push-to-hub", "me/echoink-lora", "--base", str(tiny_model_dir)]) == 0
    assert FakeHfApi.calls[0] == ("create_repo", {"repo_id": "me/echoink-lora", "repo_type": "model", "private": False, "exist_ok": True})
    name, kw = FakeHfApi.calls[1]
    assert name == "upload_folder" and kw["repo_id"] == "me/echoink-lora" and kw["folder_path"] == str(tmp_path / "export4")


@pytest.mark.parametrize("flag,content", [
    ("--recipe", b"\xff\xfe not utf-8 \x80"),
    ("--eval-summary", b"[1, 2, 3]"),
    ("--eval-summary", b'{"results": ["not a row"]}'),
    ("--eval-summary", b'{"accuracy": "high"}'),
])
def test_export_unreadable_recipe_or_summary_is_one_line(thinker_adapter, flag, content, tmp_path, capsys):
    """A recipe that is not UTF-8, or a summary of another JSON shape, ended in a traceback."""
    given = tmp_path / "given"
    given.write_bytes(content)
    out = tmp_path / "export"
    assert cli_main(["export", "--adapter", str(thinker_adapter), "--out", str(out), flag, str(given)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert str(given) in line and "Fix:" in line
    assert not out.exists() and given.read_bytes() == content


def test_export_checks_the_adapter_against_the_base(tiny_model_dir, thinker_adapter, mismatched_adapters, tmp_path):
    for variant in ("narrower", "deeper"):
        with pytest.raises(AdapterError) as err:
            export_adapter(mismatched_adapters[variant], tmp_path / "export")
        msg = str(err.value)
        assert "does not fit the base" in msg and str(tiny_model_dir) in msg and "--base" in msg and "\n" not in msg
    # a Hub base that cannot be reached (the tests are offline): one line, nothing written
    with pytest.raises(MergeError) as err:
        export_adapter(thinker_adapter, tmp_path / "export", base="someone/not-cached")
    assert "cannot download config.json of 'someone/not-cached'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MergeError, match="inside the adapter folder"):
        export_adapter(thinker_adapter, thinker_adapter / "export")
    assert not (tmp_path / "export").exists() and not (thinker_adapter / "export").exists()


def test_an_unreachable_hub_is_one_line_without_retry_noise(thinker_adapter, tmp_path, monkeypatch, caplog, capsys):
    import logging

    import huggingface_hub

    def unreachable(repo_id, filename, **kw):  # what huggingface_hub does offline: warn per retry, then raise
        for attempt in range(1, 6):
            logging.getLogger("huggingface_hub.utils._http").warning(f"Retrying in 1s [Retry {attempt}/5].")
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    caplog.set_level(logging.INFO)
    out = tmp_path / "merged"
    assert cli_main(["merge", "--adapter", str(thinker_adapter), "--out", str(out), "--base", "Qwen/Qwen2.5-Omni-7B"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot download config.json of 'Qwen/Qwen2.5-Omni-7B'" in err and "Fix:" in err
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert not out.exists()


def test_merge_command_push_to_hub(thinker_adapter, tmp_path, monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    out = tmp_path / "merged"
    report = tmp_path / "report.json"
    assert cli_main(["merge", "--adapter", str(thinker_adapter), "--out", str(out), "--no-verify", "--dtype", "bf16",
                     "--report", str(report), "--push-to-hub", "me/echoink-merged", "--private"]) == 0
    assert (out / "model.safetensors").is_file() and json.loads(report.read_text())["dtype"] == "bfloat16"
    assert [c[0] for c in FakeHfApi.calls] == ["create_repo", "upload_folder"]
    assert FakeHfApi.calls[0][1]["private"] is True and FakeHfApi.calls[1][1]["folder_path"] == str(out)


def test_verification_catches_a_wrong_merge(thinker_adapter, tmp_path, monkeypatch):
    """A merge that forgets the alpha/r scale must fail the weight and logit checks (they are not vacuous)."""
    from echoink_lite import merge

    monkeypatch.setattr(merge, "merged_weight", lambda w, lm, dtype: (w.float() + lm.B.float() @ lm.A.float()).to(dtype))
    report = merge_adapter(thinker_adapter, tmp_path / "wrong", dtype="fp32", verify=True, console=QUIET)
    v = report["verification"]
    assert report["ok"] is False
    assert v["weights"]["lora_tensors_wrong"] == 28 and not v["weights"]["ok"]
    assert not v["logits"]["ok"] and v["logits"]["max_abs_diff"] > v["logits"]["tolerance"]
    assert v["size"]["ok"] and v["logits"]["reload_ok"]  # the files themselves are well-formed


@pytest.mark.parametrize("command", ["merge", "export"])
def test_an_out_under_a_file_is_one_line_naming_the_file(thinker_adapter, tmp_path, command):
    """merge and export make their hidden partial folder with safe_output.new_partial_folder: an --out whose
    parent is a file is refused in one line that names that file, and nothing is written."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    out = a_file / "sub" / "merged"
    with pytest.raises(MergeError) as err:
        if command == "merge":
            merge_adapter(thinker_adapter, out, dtype="fp32", verify=False, console=QUIET)
        else:
            export_adapter(thinker_adapter, out)
    msg = str(err.value)
    assert f"{a_file} is a file, not a folder" in msg and "Fix:" in msg and "\n" not in msg
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
