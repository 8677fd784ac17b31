"""Tests for echoink_lite.infer: one question to the tiny model, streamed, and clear media errors."""

from __future__ import annotations

import argparse
import io

import pytest
from rich.console import Console

from echoink_lite.data import DataError
from echoink_lite.eval_model import load_model
from echoink_lite.cli_eval import add_infer_arguments
from echoink_lite.cli_eval import cmd_infer as infer_command
from echoink_lite.infer import infer
from echoink_lite.synth import SYNTH_OPTIONS, SYNTH_QUESTION


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def test_infer_streams_and_returns_the_parts(loaded, synth_dir, capsys):
    model, processor = loaded
    valid = synth_dir / "valid"
    result = infer(
        model, processor, valid / "audios" / "sample_0.wav", valid / "images" / "sample_0.png", SYNTH_QUESTION,
        options=list(SYNTH_OPTIONS), max_new_tokens=8,
    )
    assert set(result) == {"completion", "think", "answer", "prompt_tokens", "new_tokens"}
    assert result["prompt_tokens"] > 0 and 1 <= result["new_tokens"] <= 8
    assert result["answer"] in (None, "A", "B", "C", "D")
    streamed = capsys.readouterr().out
    assert result["completion"].strip() in streamed and streamed.strip()

    # Without options the question goes as written: a shorter prompt than the paper's instruction prompt.
    plain = infer(
        model, processor, valid / "audios" / "sample_0.wav", valid / "images" / "sample_0.png", "What is it?",
        max_new_tokens=4, stream=False,
    )
    assert plain["prompt_tokens"] < result["prompt_tokens"]
    assert capsys.readouterr().out == ""


def test_missing_or_broken_media_name_the_file(loaded, synth_dir, tmp_path):
    model, processor = loaded
    image = synth_dir / "valid" / "images" / "sample_0.png"
    missing = tmp_path / "nope.wav"
    with pytest.raises(DataError, match="nope.wav"):
        infer(model, processor, missing, image, "q", stream=False)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000garbage")
    with pytest.raises(DataError, match="broken.wav"):
        infer(model, processor, broken, image, "q", stream=False)


def test_infer_command_prints_a_panel(tiny_model_dir, synth_dir, capsys):
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    valid = synth_dir / "valid"
    args = parser.parse_args([
        "--model", str(tiny_model_dir), "--audio", str(valid / "audios" / "sample_1.wav"),
        "--image", str(valid / "images" / "sample_1.png"), "--question", SYNTH_QUESTION,
        "--options", "red low", "red high", "blue low", "blue high", "--max-new-tokens", "4", "--no-stream",
    ])
    console = Console(file=io.StringIO(), width=120, color_system=None)
    assert infer_command(args, console=console) == 0
    text = console.file.getvalue()
    assert "reasoning" in text and "answer" in text and "prompt tokens" in text

    args.audio = str(valid / "audios" / "missing.wav")
    assert infer_command(args, console=console) == 1
    assert "missing.wav" in console.file.getvalue()


def _infer_args(*argv: str):
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    return parser.parse_args(list(argv))


def wide() -> Console:
    return Console(file=io.StringIO(), width=4000, color_system=None)


def test_a_folder_given_as_media_says_it_is_a_folder(tiny_model_dir, synth_dir):
    valid = synth_dir / "valid"
    for kind, audio, image in (("image", valid / "audios" / "sample_0.wav", valid / "images"),
                               ("audio", valid / "audios", valid / "images" / "sample_0.png")):
        console = wide()
        args = _infer_args("--model", str(tiny_model_dir), "--audio", str(audio), "--image", str(image), "--question", "q")
        assert infer_command(args, console=console) == 1
        (line,) = console.file.getvalue().splitlines()
        folder = image if kind == "image" else audio
        assert f"--{kind} {folder} is a folder, not a file" in line and "does not exist" not in line


def test_a_single_option_draws_a_warning(tiny_model_dir, synth_dir):
    valid = synth_dir / "valid"
    console = wide()
    args = _infer_args("--model", str(tiny_model_dir), "--audio", str(valid / "audios" / "sample_0.wav"),
                       "--image", str(valid / "images" / "sample_0.png"), "--question", "q",
                       "--options", "A. red low B. red high", "--max-new-tokens", "2", "--no-stream")
    assert infer_command(args, console=console) == 0
    text = console.file.getvalue()
    assert "warning: --options got a single option ('A. red low B. red high')" in text and "only answer A" in text
    console = wide()
    args.options = ["red low", "red high"]
    assert infer_command(args, console=console) == 0
    assert "warning" not in console.file.getvalue()


def test_adapters_base_is_read_from_its_config_and_a_wrong_base_refused(tiny_model_dir, synth_dir, mismatched_adapters, tmp_path):
    from echoink_lite.modeling import add_lora, load_thinker
    from echoink_lite.recipe import LoraSection

    adapter = tmp_path / "adapter"
    add_lora(load_thinker(str(tiny_model_dir), dtype="float32", device="cpu"), LoraSection(r=4, alpha=8),
             gradient_checkpointing=False).save_pretrained(adapter)
    valid = synth_dir / "valid"
    media = ["--audio", str(valid / "audios" / "sample_0.wav"), "--image", str(valid / "images" / "sample_0.png"),
             "--question", "q", "--max-new-tokens", "2", "--no-stream"]
    console = wide()
    assert infer_command(_infer_args("--adapter", str(adapter), *media), console=console) == 0
    text = console.file.getvalue()
    assert f"base model: {tiny_model_dir} (from {adapter / 'adapter_config.json'}" in text
    assert "base quantization: none (default: no recipe.yaml beside" in text

    console = wide()
    assert infer_command(_infer_args("--adapter", str(mismatched_adapters["deeper"]), *media), console=console) == 1
    base_line, quantization_line, error = console.file.getvalue().splitlines()
    assert base_line.startswith("base model:") and quantization_line.startswith("base quantization:")
    assert error.startswith("error: adapter ") and "does not fit the base" in error and "layers 4-5" in error
    assert "Fix: pass --model" in error
