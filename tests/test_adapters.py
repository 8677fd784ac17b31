"""Tests for echoink_lite.adapters: the one check that an adapter fits its base (used by eval, infer,
export, merge and resume), the base an adapter names, its training quantization and its content hash.

The adapters come from tiny thinkers of another depth or width (tests/conftest.py: mismatched_adapters);
PEFT itself loads the deeper one onto the 4-layer base without a word, which is what the check prevents.
"""

from __future__ import annotations

import json
import shutil

import pytest

from echoink_lite.adapters import (
    AdapterError,
    BaseLayout,
    adapter_base_model,
    adapter_content_hash,
    check_adapter_fits,
    training_quantization,
    training_recipe_file,
)
from echoink_lite.adapters import load_adapter
from echoink_lite.modeling import ModelLoadError, add_lora, load_thinker
from echoink_lite.recipe import LoraSection


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return load_thinker(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def fitting_adapter(tiny_model_dir, tmp_path_factory):
    model = load_thinker(str(tiny_model_dir), dtype="float32", device="cpu")
    out = tmp_path_factory.mktemp("fitting") / "run" / "adapter"
    add_lora(model, LoraSection(r=4, alpha=8), gradient_checkpointing=False, seed=0).save_pretrained(out)
    return out


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_peft_alone_drops_a_deeper_adapters_layers_silently(tiny_model_dir, mismatched_adapters):
    """Why the check exists: without it, loading succeeds and layers 4-5 of the adapter are simply gone."""
    from peft import PeftModel

    from echoink_lite.modeling import peft_reading_deprecated_property

    model = load_thinker(str(tiny_model_dir), dtype="float32", device="cpu")
    with peft_reading_deprecated_property():
        loaded = PeftModel.from_pretrained(model, str(mismatched_adapters["deeper"]))
    assert not any(".layers.4." in n for n, _ in loaded.named_parameters())


def test_deeper_adapter_is_refused_by_every_kind_of_base(tiny_model_dir, tiny_full_model_dir, base_model, mismatched_adapters):
    deeper = mismatched_adapters["deeper"]
    config = json.loads((tiny_model_dir / "config.json").read_text())
    full_config = json.loads((tiny_full_model_dir / "config.json").read_text())  # thinker_config inside
    for base in (base_model, config, base_model.config, BaseLayout.from_model(base_model), full_config):
        with pytest.raises(AdapterError) as err:
            check_adapter_fits(base, deeper)
        msg = one_line(err)
        assert str(deeper) in msg and "layers 4-5, which the base does not have (the base has 4 layers)" in msg
        assert "num_hidden_layers>=6" in msg and "Fix:" in msg and str(tiny_model_dir) in msg


def test_shallower_adapter_is_missing_keys(base_model, mismatched_adapters):
    with pytest.raises(AdapterError) as err:
        check_adapter_fits(base_model, mismatched_adapters["shallower"], base_name="tiny-4-layers")
    msg = one_line(err)
    assert "base 'tiny-4-layers'" in msg
    assert "no LoRA weights for 14 base modules its target_modules select (layers 2-3)" in msg


def test_narrower_adapter_names_the_sizes(base_model, mismatched_adapters):
    with pytest.raises(AdapterError) as err:
        check_adapter_fits(base_model, mismatched_adapters["narrower"], fix="pass --model the right base")
    msg = one_line(err)
    assert "28 LoRA modules have other sizes than the base" in msg
    assert "hidden_size=96" in msg and "hidden_size=128" in msg and "Fix: pass --model the right base" in msg


def test_a_fitting_adapter_passes_also_on_4bit_and_peft_wrapped_bases(tiny_model_dir, base_model, fitting_adapter):
    from echoink_lite.recipe import QuantizationSection

    check_adapter_fits(base_model, fitting_adapter)
    check_adapter_fits(json.loads((tiny_model_dir / "config.json").read_text()), fitting_adapter)
    nf4 = load_thinker(str(tiny_model_dir), dtype="float32", quantization=QuantizationSection(), device="cpu")
    check_adapter_fits(nf4, fitting_adapter)  # Linear4bit layers report their unpacked sizes
    # resume: the adapter is checked against the model that already carries the recipe's LoRA
    wrapped = add_lora(load_thinker(str(tiny_model_dir), dtype="float32", device="cpu"), LoraSection(r=4, alpha=8),
                       gradient_checkpointing=False)
    check_adapter_fits(wrapped, fitting_adapter)


def test_load_adapter_checks_before_peft(tiny_model_dir, mismatched_adapters):
    model = load_thinker(str(tiny_model_dir), dtype="float32", device="cpu")
    with pytest.raises(ModelLoadError, match="does not fit the base"):  # AdapterError is a ModelLoadError
        load_adapter(model, mismatched_adapters["narrower"])


def test_unreadable_adapter_folders_say_what_they_are(tiny_model_dir, fitting_adapter, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        adapter_base_model(tmp_path / "nope")
    with pytest.raises(AdapterError, match="It holds a model"):
        adapter_base_model(tiny_model_dir)
    broken = tmp_path / "broken"
    shutil.copytree(fitting_adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(AdapterError, match="cannot be read"):
        check_adapter_fits(json.loads((tiny_model_dir / "config.json").read_text()), broken)


def test_content_hash_follows_the_weights_not_the_path(fitting_adapter, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fitting_adapter, copy)
    assert adapter_content_hash(copy) == adapter_content_hash(fitting_adapter)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(copy / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = weights[key] + 1.0
    save_file(weights, str(copy / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert adapter_content_hash(copy) != adapter_content_hash(fitting_adapter)


def test_training_recipe_and_quantization_of_a_run(tmp_path):
    run = tmp_path / "run"
    for adapter in (run / "adapter", run / "checkpoints" / "step-000004" / "adapter"):
        adapter.mkdir(parents=True)
        assert training_recipe_file(adapter) is None and training_quantization(adapter) == (None, None)
    (run / "recipe.yaml").write_text("model:\n  name_or_path: base\nquantization:\n  load_in_4bit: true\n  quant_type: fp4\n")
    for adapter in (run / "adapter", run / "checkpoints" / "step-000004" / "adapter"):
        section, recipe_file = training_quantization(adapter)
        assert recipe_file == (run / "recipe.yaml").resolve()
        assert section.load_in_4bit and section.quant_type == "fp4"
    (run / "recipe.yaml").write_text("quantization:\n  load_in_4bit: maybe\n")
    with pytest.raises(AdapterError, match="recipe.yaml: cannot read its quantization section") as err:
        training_quantization(run / "adapter")
    assert "--quantization nf4 or none" in one_line(err)


def test_load_model_refuses_a_deeper_adapter_on_a_4bit_base(tiny_model_dir, mismatched_adapters):
    """eval and infer load through load_model; the check also guards the 4-bit base of a QLoRA adapter."""
    from echoink_lite.eval_model import load_model
    from echoink_lite.recipe import QuantizationSection

    with pytest.raises(AdapterError, match="pass --model"):
        load_model(str(tiny_model_dir), adapter=str(mismatched_adapters["deeper"]), quantization=QuantizationSection(),
                   device="cpu")


@pytest.fixture(scope="module")
def nan_adapter(fitting_adapter, tmp_path_factory):
    """The fitting adapter with one NaN in one LoRA B: what a diverged run saves."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("nan") / "adapter"
    shutil.copytree(fitting_adapter, out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    name = next(k for k in sorted(weights) if "lora_B" in k)
    weights[name][1, 2] = float("inf")
    save_file(weights, str(out / "adapter_model.safetensors"))
    return out


def test_an_adapter_with_nan_or_inf_is_refused_by_every_reader(tiny_model_dir, base_model, nan_adapter, synth_dir,
                                                                tmp_path, capsys):
    """merge, export, eval and infer each refuse it in one line naming the tensor (NaN logits, exit 0, before)."""
    from echoink_lite.adapter_tensors import read_adapter
    from echoink_lite.cli import main
    from echoink_lite.data import scan_split

    with pytest.raises(AdapterError) as err:
        read_adapter(nan_adapter)
    assert "lora_B" in one_line(err) and "1 NaN or infinite value(s)" in one_line(err) and "Fix:" in one_line(err)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        load_adapter(base_model, nan_adapter)
    row = scan_split(synth_dir / "valid").rows[0]
    commands = {
        "merge": ["merge", "--adapter", str(nan_adapter), "--out", str(tmp_path / "merged")],
        "export": ["export", "--adapter", str(nan_adapter), "--out", str(tmp_path / "exported")],
        "eval": ["eval", "--adapter", str(nan_adapter), "--data", str(synth_dir / "valid"), "--out",
                 str(tmp_path / "p.jsonl"), "--quantization", "none", "--limit", "2"],
        "infer": ["infer", "--adapter", str(nan_adapter), "--audio", str(row.audio_path), "--image",
                  str(row.image_path), "--question", "?", "--quantization", "none"],
    }
    for command, argv in commands.items():
        assert main(argv) != 0, command
        out = capsys.readouterr()
        text = (out.out + out.err).strip()
        assert "NaN or infinite value(s)" in text and "Traceback" not in text, (command, text)
        assert len(" ".join(text.split()).split("error:")) == 2, (command, text)  # one error, no second message
    assert sorted(p.name for p in tmp_path.iterdir()) == []
