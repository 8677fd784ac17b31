"""Tests for echoink_lite.infer: one question to the tiny model, streamed, and clear media errors."""

from __future__ import annotations

import argparse
import io

import pytest
from rich.console import Console

from echoink_lite.data import DataError
from echoink_lite.evaluate import load_model
from echoink_lite.infer import add_infer_arguments, infer, infer_command
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
