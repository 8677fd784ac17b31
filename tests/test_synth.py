"""Tests for echoink_lite.synth: AVQA layout, determinism, balance, and that both modalities carry signal."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from rich.console import Console

from echoink_lite.answer_protocol import extract_answer
from echoink_lite.data import scan_split
from echoink_lite.media import load_audio, load_image
from echoink_lite.synth import (
    MAX_ITEMS,
    SYNTH_CLASSES,
    SYNTH_OPTIONS,
    SYNTH_QUESTION,
    synth_command,
    synth_target,
    write_synthetic_split,
)


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert synth_command(out, train=16, valid=8, seed=0, console=quiet_console()) == 0
    return out


def read_items(split_dir: Path) -> list[dict]:
    (list_file,) = split_dir.glob("omni_rl_format_*.json")
    return json.loads(list_file.read_text(encoding="utf-8"))


def test_layout_is_exactly_avqa(synth_root):
    assert sorted(p.name for p in synth_root.iterdir()) == ["train", "valid"]
    for split, n in (("train", 16), ("valid", 8)):
        split_dir = synth_root / split
        assert sorted(p.name for p in split_dir.iterdir()) == ["audios", "images", f"omni_rl_format_{split}.json"]
        items = read_items(split_dir)
        assert len(items) == n
        assert sorted(p.name for p in (split_dir / "images").iterdir()) == sorted(f"sample_{i}.png" for i in range(n))
        assert sorted(p.name for p in (split_dir / "audios").iterdir()) == sorted(f"sample_{i}.wav" for i in range(n))
        for i, entry in enumerate(items):
            assert list(entry) == [
                "problem_id",
                "problem",
                "data_type",
                "problem_type",
                "options",
                "solution",
                "path",
                "data_source",
                "task_type",
                "audio_type",
            ]
            assert entry["problem_id"] == i
            assert entry["problem"] == SYNTH_QUESTION == "What colour is the picture and is the sound low or high?"
            assert entry["data_type"] == "image_audio"
            assert entry["problem_type"] == "multiple choice"
            assert entry["options"] == ["A. red low", "B. red high", "C. blue low", "D. blue high"]
            assert entry["solution"] in {f"<answer>{x}</answer>" for x in "ABCD"}
            assert entry["path"] == {"image": f"images/sample_{i}.png", "audio": f"audios/sample_{i}.wav"}
            assert entry["data_source"] == "echoink-lite-synth"
            assert entry["task_type"] == "colour and pitch"
            assert entry["audio_type"] == f"{SYNTH_CLASSES[entry['solution'][8]][1]} tone"  # the tone's pitch


def test_media_formats(synth_root):
    info = sf.info(str(synth_root / "train/audios/sample_0.wav"))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 16000, "PCM_16")
    with Image.open(synth_root / "train/images/sample_0.png") as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (56, 56))


def test_scan_finds_no_rejects(synth_root):
    for split in ("train", "valid"):
        scan = scan_split(synth_root / split, open_media=True)
        assert scan.rejects == [] and len(scan.rows) == scan.total


def test_deterministic_for_a_seed(tmp_path):
    a = write_synthetic_split(tmp_path / "a", "train", 12, seed=7)
    b = write_synthetic_split(tmp_path / "b", "train", 12, seed=7)
    c = write_synthetic_split(tmp_path / "c", "train", 12, seed=8)
    name = "omni_rl_format_train.json"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    for i in range(12):
        for rel in (f"images/sample_{i}.png", f"audios/sample_{i}.wav"):
            assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert any((a / f"audios/sample_{i}.wav").read_bytes() != (c / f"audios/sample_{i}.wav").read_bytes() for i in range(12))


def test_train_and_valid_use_different_seeds(synth_root):
    train_wav = (synth_root / "train/audios/sample_0.wav").read_bytes()
    valid_wav = (synth_root / "valid/audios/sample_0.wav").read_bytes()
    assert train_wav != valid_wav


@pytest.mark.parametrize("n", [16, 10])
def test_labels_balanced_and_shuffled(tmp_path, n):
    items = read_items(write_synthetic_split(tmp_path, "train", n, seed=1))
    letters = [extract_answer(entry["solution"]) for entry in items]
    counts = Counter(letters)
    assert set(counts) == set("ABCD")
    assert max(counts.values()) - min(counts.values()) <= (0 if n % 4 == 0 else 1)
    assert letters != sorted(letters) and letters != [("ABCD")[i % 4] for i in range(n)]


def dominant_hz(samples: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / len(samples))


def test_both_modalities_carry_the_label(synth_root):
    split_dir = synth_root / "train"
    for entry in read_items(split_dir):
        colour, pitch = SYNTH_OPTIONS["ABCD".index(extract_answer(entry["solution"]))][3:].split()
        pixels = np.asarray(load_image(split_dir / entry["path"]["image"]), dtype=np.float64)
        mean_r, mean_b = pixels[..., 0].mean(), pixels[..., 2].mean()
        assert (mean_r > mean_b) == (colour == "red"), entry
        hz = dominant_hz(load_audio(split_dir / entry["path"]["audio"]))
        if pitch == "low":
            assert 250 < hz < 350, entry
        else:
            assert 1050 < hz < 1350, entry


def test_images_are_noisy_not_flat(synth_root):
    pixels = np.asarray(Image.open(synth_root / "train/images/sample_0.png"), dtype=np.float64)
    assert pixels.std(axis=(0, 1)).min() > 10


def test_synth_target():
    assert synth_target("A") == "<think>red low</think><answer>A</answer>"
    assert synth_target("B") == "<think>red high</think><answer>B</answer>"
    assert synth_target("C") == "<think>blue low</think><answer>C</answer>"
    assert synth_target("D") == "<think>blue high</think><answer>D</answer>"


def test_custom_sizes(tmp_path):
    split_dir = write_synthetic_split(tmp_path, "valid", 4, seed=0, image_size=28, audio_seconds=0.5, sampling_rate=8000)
    assert sf.info(str(split_dir / "audios/sample_0.wav")).frames == 4000
    with Image.open(split_dir / "images/sample_0.png") as img:
        assert img.size == (28, 28)


def test_synth_command_rejects_empty_splits(tmp_path):
    console = quiet_console()
    assert synth_command(tmp_path, train=0, valid=4, console=console) == 2
    assert "--train" in console.file.getvalue()
    with pytest.raises(ValueError):
        write_synthetic_split(tmp_path, "train", 0, seed=0)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(train=MAX_ITEMS + 1, valid=4), "--train and --valid must be from 1 to 100,000"),
    (dict(train=4, valid=10**9), "--train and --valid must be from 1 to 100,000"),
    (dict(train=4, valid=4, seed=-1), "--seed -1: schedule.seed=-1 is under its limit 0"),
    (dict(train=4, valid=4, seed=2**40), "--seed 1099511627776: schedule.seed=1,099,511,627,776 is over its limit 4,294,967,295"),
])
def test_synth_command_refuses_counts_and_seeds_out_of_range(kwargs, needle, tmp_path):
    """A negative seed ended in numpy's traceback, and --train 100000000 wrote media until the disk filled."""
    console = quiet_console()
    assert synth_command(tmp_path / "out", console=console, **kwargs) == 2
    (line,) = console.file.getvalue().splitlines()
    assert needle in line and "Fix:" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_demo_refuses_a_negative_seed_in_one_line(tmp_path, capsys):
    from echoink_lite.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--seed", "-5"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("echoink-lite demo: error: --seed -5: ") and "Fix:" in line
    assert not (tmp_path / "demo").exists()


def test_data_synth_errors_go_to_stderr(tmp_path, capsys):
    from echoink_lite.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    assert main(["data", "synth", str(blocker), "--train", "2", "--valid", "2"]) == 2
    out = capsys.readouterr()
    (line,) = out.err.splitlines()
    assert str(blocker) in line and not out.out and blocker.read_text() == "mine"


def test_sigterm_during_data_synth_leaves_nothing_behind(tmp_path):
    """A scheduler's SIGTERM killed Python at once and left the hidden .OUT.partial-* folder; now it runs the
    cleanup, as Ctrl-C does, and exits 143."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "set"
    proc = subprocess.Popen([sys.executable, "-m", "echoink_lite.cli", "data", "synth", str(out), "--train", "50000",
                             "--valid", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((p / "train" / "audios").is_dir() for p in tmp_path.glob(".set.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM): rerun the command" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
