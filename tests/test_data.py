"""Tests for echoink_lite.data: prompt text, row checks, split discovery, media loading, `data check`."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from rich.console import Console

from echoink_lite import data
from echoink_lite.answer_protocol import build_prompt_text
from echoink_lite.data import (
    BAD_AUDIO,
    BAD_IMAGE,
    BAD_JSON,
    BAD_OPTIONS,
    BAD_SOLUTION,
    DUPLICATE_ID,
    EMPTY_AUDIO,
    MISSING_FIELD,
    MISSING_FILE,
    PATH_ESCAPE,
    REASONS,
    DataError,
    MediaError,
    Reject,
    enforce_bad_fraction,
    resolve_split,
    scan_split,
)
from echoink_lite.data_check import check_command, write_reject_report
from echoink_lite.media import load_audio, load_image
from echoink_lite.row_media import derange, load_example

OPTIONS = ["A. Playing the violin", "B. Singing", "C. Playing the piano", "D. Drumming"]


# ------------------------------------------------------------------------------------------
# helpers: build an AVQA-layout split by hand
# ------------------------------------------------------------------------------------------


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    samples = tone if channels == 1 else np.stack([tone] * channels, axis=1)
    sf.write(path, samples, rate, subtype="PCM_16")
    return path


def write_png(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=(200, 10, 10) if mode == "RGB" else 0).save(path)
    return path


def item(pid, image: str | None = None, audio: str | None = None, **overrides) -> dict:
    row = {
        "problem_id": pid,
        "problem": "What is the man in the picture doing?",
        "data_type": "image_audio",
        "problem_type": "multiple choice",
        "options": list(OPTIONS),
        "solution": "<answer>C</answer>",
        "path": {"image": image or f"images/sample_{pid}.png", "audio": audio or f"audios/sample_{pid}.wav"},
        "data_source": "OmniInstruct_v1-AVQA",
    }
    row.update(overrides)
    return row


def good_split(root: Path, n: int = 3, name: str = "omni_rl_format_train.json") -> Path:
    """A split folder with n valid rows (ids 0..n-1)."""
    items = []
    for pid in range(n):
        write_png(root / f"images/sample_{pid}.png")
        write_wav(root / f"audios/sample_{pid}.wav")
        items.append(item(pid))
    (root / name).write_text(json.dumps(items), encoding="utf-8")
    return root


def write_items(root: Path, items: list, name: str = "omni_rl_format_train.json") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(items), encoding="utf-8")
    return root


def only_reject(scan: data.SplitScan) -> Reject:
    assert len(scan.rejects) == 1, scan.rejects
    return scan.rejects[0]


# ------------------------------------------------------------------------------------------
# rows carry the protocol's prompt text (the text itself is pinned in test_answer_protocol.py)
# ------------------------------------------------------------------------------------------


def test_row_prompt_text_and_letters(tmp_path):
    scan = scan_split(good_split(tmp_path, n=1))
    row = scan.rows[0]
    assert row.prompt_text == build_prompt_text(row.problem, OPTIONS)
    assert row.letters == ("A", "B", "C", "D")
    assert row.answer == "C"
    assert row.solution == "<answer>C</answer>"
    assert row.problem_id == 0 and row.index == 0
    assert row.data_source == "OmniInstruct_v1-AVQA"
    assert row.image_path.is_absolute() and row.audio_path.is_absolute()


# ------------------------------------------------------------------------------------------
# row checks: good rows pass, each reason produced by a crafted row
# ------------------------------------------------------------------------------------------


def test_good_rows_pass(tmp_path):
    scan = scan_split(good_split(tmp_path, n=4))
    assert [r.problem_id for r in scan.rows] == [0, 1, 2, 3]
    assert scan.rejects == [] and scan.total == 4 and scan.bad_fraction == 0.0
    assert scan.counts_by_reason() == {}


def test_bare_letter_solution_and_string_ids_are_accepted(tmp_path):
    write_png(tmp_path / "images/a.png")
    write_wav(tmp_path / "audios/a.wav")
    write_items(tmp_path, [item("abc", "images/a.png", "audios/a.wav", solution=" B ")])
    row = scan_split(tmp_path).rows[0]
    assert row.problem_id == "abc" and row.answer == "B"


def test_reason_constants():
    assert len(set(REASONS)) == len(REASONS) == 14
    assert (BAD_AUDIO, EMPTY_AUDIO, BAD_IMAGE, PATH_ESCAPE) == (
        "unreadable_audio",
        "empty_audio",
        "unreadable_image",
        "path_outside_split",
    )


def test_missing_file(tmp_path):
    good_split(tmp_path, n=1)
    (tmp_path / "audios/sample_0.wav").unlink()
    reject = only_reject(scan_split(tmp_path))
    assert reject.reason == MISSING_FILE and reject.problem_id == 0
    assert "audios/sample_0.wav" in reject.detail and "does not exist" in reject.detail
    assert str(tmp_path.resolve()) in reject.detail and "fix the path" in reject.detail


def test_unreadable_audio(tmp_path):
    good_split(tmp_path, n=1)
    (tmp_path / "audios/sample_0.wav").write_bytes(b"this is not a wav file at all" * 10)
    reject = only_reject(scan_split(tmp_path))
    assert reject.reason == BAD_AUDIO and reject.problem_id == 0
    assert "audios/sample_0.wav" in reject.detail


def test_empty_audio(tmp_path):
    good_split(tmp_path, n=1)
    sf.write(tmp_path / "audios/sample_0.wav", np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    reject = only_reject(scan_split(tmp_path))
    assert reject.reason == EMPTY_AUDIO and reject.problem_id == 0
    assert "audios/sample_0.wav" in reject.detail


def test_unreadable_image(tmp_path):
    good_split(tmp_path, n=1)
    (tmp_path / "images/sample_0.png").write_bytes(b"\x89PNG garbage" * 20)
    reject = only_reject(scan_split(tmp_path))
    assert reject.reason == BAD_IMAGE and reject.problem_id == 0
    assert "images/sample_0.png" in reject.detail


def test_open_media_false_skips_decoding(tmp_path):
    good_split(tmp_path, n=1)
    (tmp_path / "images/sample_0.png").write_bytes(b"garbage")
    assert scan_split(tmp_path, open_media=False).rejects == []


def test_relative_path_escaping_the_split(tmp_path):
    split = tmp_path / "train"
    write_wav(tmp_path / "outside.wav")  # exists, but must never be opened
    write_png(split / "images/x.png")
    write_items(split, [item(5, "images/x.png", "../outside.wav")])
    reject = only_reject(scan_split(split))
    assert reject.reason == PATH_ESCAPE and reject.problem_id == 5
    assert "path.audio" in reject.detail and "../outside.wav" in reject.detail


def test_absolute_path(tmp_path):
    split = tmp_path / "train"
    outside = write_png(tmp_path / "elsewhere.png")
    write_wav(split / "audios/x.wav")
    write_items(split, [item(6, str(outside), "audios/x.wav")])
    reject = only_reject(scan_split(split))
    assert reject.reason == PATH_ESCAPE and reject.problem_id == 6
    assert "path.image" in reject.detail and "absolute" in reject.detail


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_escaping_the_split(tmp_path):
    split = tmp_path / "train"
    write_png(split / "images/x.png")
    target = write_wav(tmp_path / "secret.wav")
    (split / "audios").mkdir(parents=True)
    (split / "audios/link.wav").symlink_to(target)
    write_items(split, [item(7, "images/x.png", "audios/link.wav")])
    reject = only_reject(scan_split(split))
    assert reject.reason == PATH_ESCAPE and "audios/link.wav" in reject.detail


def test_solution_not_an_option(tmp_path):
    good_split(tmp_path, n=1)
    write_items(tmp_path, [item(0, solution="<answer>E</answer>")])
    reject = only_reject(scan_split(tmp_path))
    assert reject.reason == BAD_SOLUTION and reject.problem_id == 0
    assert "solution" in reject.detail and "'E'" in reject.detail


@pytest.mark.parametrize(
    "options",
    [
        [],
        "A. one",
        ["A. one", "C. two"],  # not consecutive
        ["A. one", "A. two"],  # not distinct
        ["A) one", "B) two"],  # wrong separator
        ["A. one", 2],
        ["B. one", "C. two"],  # not starting at A
    ],
)
def test_malformed_options(tmp_path, options):
    good_split(tmp_path, n=1)
    write_items(tmp_path, [item(0, options=options, solution="<answer>A</answer>")])
    reject = only_reject(scan_split(tmp_path))
    assert reject.reason == BAD_OPTIONS and reject.problem_id == 0
    assert "options" in reject.detail


def test_duplicate_ids_reject_second_and_later(tmp_path):
    good_split(tmp_path, n=2)
    write_items(tmp_path, [item(0), item(1), item(0), item("1")])
    scan = scan_split(tmp_path)
    assert [r.index for r in scan.rows] == [0, 1]
    assert [(r.index, r.problem_id, r.reason) for r in scan.rejects] == [(2, 0, DUPLICATE_ID), (3, "1", DUPLICATE_ID)]
    assert "problem_id" in scan.rejects[0].detail and "row 0" in scan.rejects[0].detail


@pytest.mark.parametrize("field", ["problem_id", "problem", "options", "solution", "path"])
def test_missing_top_level_field(tmp_path, field):
    good_split(tmp_path, n=1)
    row = item(0)
    del row[field]
    write_items(tmp_path, [row])
    reject = only_reject(scan_split(tmp_path))
    assert reject.reason == MISSING_FIELD
    assert reject.problem_id == (None if field == "problem_id" else 0)
    assert f"'{field}'" in reject.detail


def test_missing_media_field(tmp_path):
    good_split(tmp_path, n=1)
    write_items(tmp_path, [item(0, path={"image": "images/sample_0.png"})])
    reject = only_reject(scan_split(tmp_path))
    assert reject.reason == MISSING_FIELD and "path.audio" in reject.detail


@pytest.mark.parametrize(
    "bad",
    [
        "just a string",
        ["a", "list"],
        item(0, problem=3),
        item(0, problem_id=1.5),
        item(0, path="images/sample_0.png"),
        item(0, path={"image": 1, "audio": "audios/sample_0.wav"}),
    ],
)
def test_malformed_row(tmp_path, bad):
    good_split(tmp_path, n=1)
    write_items(tmp_path, [bad])
    reject = only_reject(scan_split(tmp_path))
    assert reject.reason == BAD_JSON


def test_jsonl_line_that_is_not_json(tmp_path):
    good_split(tmp_path, n=2, name="ignored.txt")
    lines = [json.dumps(item(0)), "{not json", "", json.dumps(item(1))]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    scan = scan_split(tmp_path / "rows.jsonl")
    assert [r.problem_id for r in scan.rows] == [0, 1]
    reject = only_reject(scan)
    assert reject.reason == BAD_JSON and reject.index == 1 and reject.problem_id is None
    assert "line 2" in reject.detail and "rows.jsonl" in reject.detail


def test_malformed_json_file_raises_with_location(tmp_path):
    (tmp_path / "omni_rl_format_train.json").write_text('[{"problem_id": 1,\n  "problem": }]', encoding="utf-8")
    with pytest.raises(DataError) as err:
        scan_split(tmp_path)
    message = str(err.value)
    assert "omni_rl_format_train.json" in message and "line 2" in message and "column" in message


def test_json_file_that_is_not_a_list(tmp_path):
    (tmp_path / "omni_rl_format_train.json").write_text('{"problem_id": 1}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a list"):
        scan_split(tmp_path)


def test_reject_to_json():
    reject = Reject(index=3, problem_id=17, reason=MISSING_FILE, detail="x")
    assert reject.to_json() == {"problem_id": 17, "reason": MISSING_FILE, "detail": "x", "index": 3}


# ------------------------------------------------------------------------------------------
# finding the split file
# ------------------------------------------------------------------------------------------


def test_split_folder_json_path_and_jsonl_path_are_accepted(tmp_path):
    split = good_split(tmp_path / "train", n=2)
    folder_dir, folder_file = resolve_split(split)
    assert folder_dir == split.resolve() and folder_file.name == "omni_rl_format_train.json"
    assert resolve_split(split / "omni_rl_format_train.json") == (folder_dir, folder_file)

    jsonl = split / "extra.jsonl"
    jsonl.write_text("\n".join(json.dumps(item(i)) for i in range(2)) + "\n", encoding="utf-8")
    assert resolve_split(jsonl) == (folder_dir, jsonl.resolve())
    assert [r.problem_id for r in scan_split(jsonl).rows] == [0, 1]
    assert [r.problem_id for r in scan_split(split / "omni_rl_format_train.json").rows] == [0, 1]


def test_folder_with_a_single_other_json_or_jsonl(tmp_path):
    good_split(tmp_path, n=1, name="mine.jsonl")
    (tmp_path / "mine.jsonl").write_text(json.dumps(item(0)) + "\n", encoding="utf-8")
    assert resolve_split(tmp_path)[1].name == "mine.jsonl"
    assert len(scan_split(tmp_path).rows) == 1


def test_ambiguous_folder(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataError) as err:
        resolve_split(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "a.json" in message and "b.jsonl" in message and "pass the JSON file" in message


def test_folder_without_list_file_hints_at_splits(tmp_path):
    good_split(tmp_path / "train", n=1)
    with pytest.raises(DataError) as err:
        resolve_split(tmp_path)
    assert "train" in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_split(tmp_path / "nope")


# ------------------------------------------------------------------------------------------
# bad-fraction gate
# ------------------------------------------------------------------------------------------


def test_enforce_bad_fraction(tmp_path):
    good_split(tmp_path, n=4)
    (tmp_path / "audios/sample_3.wav").unlink()
    scan = scan_split(tmp_path)
    assert scan.bad_fraction == 0.25 and scan.counts_by_reason() == {MISSING_FILE: 1}

    enforce_bad_fraction(scan, 0.25, "train split")  # at the threshold: fine
    with pytest.raises(DataError) as err:
        enforce_bad_fraction(scan, 0.1, "train split")
    message = str(err.value)
    assert "train split" in message and "1 of 4" in message and "missing_file: 1" in message
    assert "echoink-lite data check" in message and "--report bad.jsonl" in message
    assert "data.max_bad_fraction" in message


def test_enforce_bad_fraction_refuses_zero_usable_rows(tmp_path):
    write_items(tmp_path, [])
    with pytest.raises(DataError, match="no usable rows"):
        enforce_bad_fraction(scan_split(tmp_path), 1.0, "valid split")


# ------------------------------------------------------------------------------------------
# media loading
# ------------------------------------------------------------------------------------------


def test_load_audio_resamples_mixes_and_cuts(tmp_path):
    path = write_wav(tmp_path / "long.wav", seconds=15.0, rate=44100, channels=2)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.shape == (160000,)
    # Still a 440 Hz tone after resampling.
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 2


def test_load_audio_mono_mean_of_channels(tmp_path):
    path = tmp_path / "lr.wav"
    stereo = np.stack([np.full(1600, 0.5), np.full(1600, -0.25)], axis=1)
    sf.write(path, stereo, 16000, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.shape == (1600,) and np.allclose(audio, 0.125)


def test_load_audio_short_file_is_not_padded(tmp_path):
    audio = load_audio(write_wav(tmp_path / "short.wav", seconds=0.5, rate=8000), max_seconds=10.0)
    assert audio.shape == (8000,)


def test_load_image_caps_pixels_keeping_aspect(tmp_path):
    path = write_png(tmp_path / "big.png", size=(1000, 500))
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.width * img.height <= 256 * 28 * 28
    # The original's smart_resize (tests/test_original_media.py): sides floored to multiples of 28 under the cap.
    assert img.size == (616, 308) and img.width * img.height > 0.94 * 256 * 28 * 28  # not shrunk needlessly


def test_load_image_upscales_tiny_images(tmp_path):
    img = load_image(write_png(tmp_path / "tiny.png", size=(8, 4)))
    assert img.width * img.height >= 4 * 28 * 28 and img.size == (84, 56)  # sides ceiled to multiples of 28


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_load_image_converts_to_rgb(tmp_path, mode):
    img = load_image(write_png(tmp_path / f"{mode}.png", size=(60, 60), mode=mode))
    assert img.mode == "RGB" and img.size == (56, 56)  # sides rounded to multiples of 28


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (60, 60), (0, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_load_example_and_media_error(tmp_path):
    scan = scan_split(good_split(tmp_path, n=2))
    example = load_example(scan.rows[0])
    assert example.row is scan.rows[0] and example.audio.shape == (8000,) and example.image.mode == "RGB"

    # Valid header, truncated body: passes the scan's cheap check, fails a full decode.
    img_path = scan.rows[1].image_path
    img_path.write_bytes(img_path.read_bytes()[:60])
    with pytest.raises(MediaError) as err:
        load_example(scan.rows[1])
    assert err.value.reason == BAD_IMAGE and str(img_path) in err.value.detail
    assert isinstance(err.value, DataError)


# ------------------------------------------------------------------------------------------
# `data check`
# ------------------------------------------------------------------------------------------


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None)


def test_check_command_clean_split(tmp_path):
    good_split(tmp_path / "train", n=3)
    console = quiet_console()
    report = tmp_path / "out" / "bad.jsonl"
    assert check_command(tmp_path / "train", str(report), console=console) == 0
    assert report.exists() and report.read_text() == ""  # written even when empty
    output = console.file.getvalue()
    assert "usable" in output and "3" in output


def test_check_command_reports_rejects(tmp_path):
    split = good_split(tmp_path / "train", n=5)
    (split / "audios/sample_1.wav").unlink()
    # A truncated JPEG passes the scan's header check (verify()); only the full decode catches it.
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    truncated = split / "images/sample_3.jpg"
    Image.fromarray(noise).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    items = json.loads((split / "omni_rl_format_train.json").read_text())
    items[3]["path"]["image"] = "images/sample_3.jpg"
    items[4]["solution"] = "<answer>Z</answer>"
    write_items(split, items)
    assert [r.index for r in scan_split(split).rejects] == [1, 4]

    console = quiet_console()
    report = tmp_path / "bad.jsonl"
    assert check_command(split, report, console=console) == 1
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["index"], r["problem_id"], r["reason"]) for r in lines] == [
        (1, 1, MISSING_FILE),
        (3, 3, BAD_IMAGE),
        (4, 4, BAD_SOLUTION),
    ]
    assert all(set(r) == {"problem_id", "reason", "detail", "index"} and r["detail"] for r in lines)
    output = console.file.getvalue()
    for reason in (MISSING_FILE, BAD_IMAGE, BAD_SOLUTION):
        assert reason in output
    assert BAD_AUDIO not in output  # only reasons that occurred


def test_check_command_unparseable_file(tmp_path):
    (tmp_path / "omni_rl_format_valid.json").write_text("[", encoding="utf-8")
    console = quiet_console()
    assert check_command(tmp_path, None, console=console) == 1
    assert "not valid JSON" in console.file.getvalue()


def test_check_command_rejects_rows_the_model_cannot_take(tmp_path):
    # Both rows decode, so they passed `data check` before; then crashed the processor (aspect ratio over 200
    # after the pixel caps) or the model (too short for one audio token) at the training step that met them.
    split = good_split(tmp_path / "train", n=4)
    write_png(split / "images/sample_1.png", size=(600, 2))
    sf.write(split / "audios/sample_2.wav", np.zeros(160, dtype=np.float32), 16000, subtype="PCM_16")
    write_png(split / "images/sample_3.png", size=(400, 2))  # thin, but within the limit after the caps
    console = quiet_console()
    report = tmp_path / "bad.jsonl"
    assert check_command(split, report, console=console) == 1
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in lines] == [(1, "image_aspect_ratio"), (2, "audio_too_short")]
    assert "sample_1.png" in lines[0]["detail"] and "sample_2.wav" in lines[1]["detail"]
    output = console.file.getvalue()
    assert "image_aspect_ratio" in output and "audio_too_short" in output


def test_check_command_io_errors_exit_2_in_one_line(tmp_path):
    split = good_split(tmp_path / "train", n=2)
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("x")
    for report, expected in (
        (not_a_folder / "bad.jsonl", "notes.txt is a file, not a folder"),
        (tmp_path, "it is a folder"),
    ):
        console = quiet_console()
        assert check_command(split, report, console=console) == 2
        output = console.file.getvalue()
        assert output.count("\n") == 1 and "error:" in output and str(report) in output and expected in output
        assert "decoding" not in output and "usable" not in output  # refused before the long decode

    console = quiet_console()
    assert check_command(tmp_path / "missing", None, console=console) == 2
    assert "does not exist" in console.file.getvalue() and console.file.getvalue().count("\n") == 1

    # Bad rows still exit 1, also when they come with a report in a folder that does not exist yet.
    (split / "audios/sample_1.wav").unlink()
    assert check_command(split, tmp_path / "new" / "dir" / "bad.jsonl", console=quiet_console()) == 1
    assert (tmp_path / "new" / "dir" / "bad.jsonl").read_text().count("\n") == 1


def test_check_command_help_documents_the_exit_codes(capsys):
    from echoink_lite.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "check", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exit codes: 0 every row usable; 1 rejected rows found" in text
    assert "2 the check could not run" in text and "--report cannot be written" in text


def test_write_reject_report_round_trip(tmp_path):
    rejects = [Reject(0, "a", MISSING_FIELD, "field 'problem' is missing"), Reject(2, None, BAD_JSON, "line 3")]
    path = write_reject_report(rejects, tmp_path / "r.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [r.to_json() for r in rejects]


# ------------------------------------------------------------------------------------------
# modality swap
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["audio", "image", "both"])
def test_derange_gives_every_row_other_media(tmp_path, which):
    rows = scan_split(good_split(tmp_path, n=7)).rows
    swapped = derange(rows, which, seed=3)
    assert len(swapped) == len(rows)
    for original, new in zip(rows, swapped):
        assert (new.problem_id, new.answer, new.problem, new.options) == (
            original.problem_id,
            original.answer,
            original.problem,
            original.options,
        )
        audio_changed = new.audio_path != original.audio_path
        image_changed = new.image_path != original.image_path
        assert audio_changed == (which in ("audio", "both"))
        assert image_changed == (which in ("image", "both"))
    moved = sorted(str(r.audio_path if which != "image" else r.image_path) for r in swapped)
    before = sorted(str(r.audio_path if which != "image" else r.image_path) for r in rows)
    assert moved == before  # a permutation: every file used exactly once
    assert derange(rows, which, seed=3) == swapped  # seeded


def test_derange_needs_two_rows_and_a_valid_modality(tmp_path):
    rows = scan_split(good_split(tmp_path, n=2)).rows
    assert derange(rows, "audio", seed=0)[0].audio_path == rows[1].audio_path
    with pytest.raises(DataError):
        derange(rows[:1], "audio", seed=0)
    with pytest.raises(ValueError):
        derange(rows, "video", seed=0)
