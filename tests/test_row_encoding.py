"""Rows that decode but that the processor or the model cannot take, and `prompting.encode_row`, the one
load+encode path of training and evaluation, which turns every such failure into a `RowEncodeError`.

The two crashes of issue 9 are reproduced on the tiny model (the real Qwen2.5-Omni classes) first, then the
kit's limits are pinned against the libraries' own numbers at the exact boundary.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from echoink_lite import prompting
from echoink_lite.data import (
    AUDIO_TOO_SHORT,
    ENCODE_FAILED,
    IMAGE_ASPECT_RATIO,
    PROMPT_TOO_LONG,
    REASONS,
    DataError,
    MediaError,
    RowEncodeError,
    scan_split,
)
from echoink_lite.infer import _load_media
from echoink_lite.media import (
    MAX_IMAGE_ASPECT_RATIO,
    MIN_AUDIO_SAMPLES,
    audio_token_count,
    capped_image_size,
    image_limit_problem,
    load_image,
)
from echoink_lite.modeling import load_processor, load_thinker
from echoink_lite.prompting import PromptTooLongError, collate, encode_example, encode_row, render_prompt
from echoink_lite.row_media import load_example

CAPS = dict(max_audio_seconds=10.0, max_pixels=256 * 28 * 28)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    processor = load_processor(str(tiny_model_dir), max_pixels=CAPS["max_pixels"])
    model = load_thinker(str(tiny_model_dir), dtype="float32")
    model.eval()
    return model, processor


def run_model(model, processor, image: Image.Image, audio: np.ndarray) -> None:
    """Processor, then one generated token: everything a rollout does with a prompt."""
    text = render_prompt(processor, "q")
    out = processor(text=[text], images=[image], audio=[audio], return_tensors="pt", padding=False)
    enc = prompting.Encoded(out["input_ids"][0], out["pixel_values"], out["image_grid_thw"], out["input_features"][0],
                            out["feature_attention_mask"][0])
    with torch.no_grad():
        model.generate(**collate([enc]), max_new_tokens=1, do_sample=False)


def tone(samples: int) -> np.ndarray:
    return (0.3 * np.sin(np.arange(samples) / 5)).astype(np.float32)


@pytest.fixture
def bad_split(synth_dir, tmp_path):
    """The synthetic valid split with row 0's image 600x2 pixels and row 1's audio 160 samples (10 ms)."""
    split = tmp_path / "valid"
    shutil.copytree(synth_dir / "valid", split)
    Image.new("RGB", (600, 2), (200, 10, 10)).save(split / "images" / "sample_0.png")
    sf.write(split / "audios" / "sample_1.wav", np.zeros(160, dtype=np.float32), 16000, subtype="PCM_16")
    return split


# ------------------------------------------------------------------------------------------
# The crashes, and the limits at their exact boundary
# ------------------------------------------------------------------------------------------


def test_the_two_crashes_of_rows_that_decode(tiny, tmp_path):
    model, processor = tiny
    # 5799x29 (ratio 199.97, which the original's fetch_image accepts) becomes 5796x28 when its sides are
    # rounded to multiples of 28: ratio 207, which the processor refuses.
    Image.new("RGB", (5799, 29), (200, 10, 10)).save(tmp_path / "wide.png")
    wide = load_image(tmp_path / "wide.png")
    assert wide.size == (5796, 28)
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200"):
        run_model(model, processor, wide, tone(16000))
    # 160 samples: the processor encodes it, the model's forward pass fails (so encoding alone cannot catch it).
    with pytest.raises(RuntimeError, match="numel\\(\\) == 0"):
        run_model(model, processor, Image.new("RGB", (56, 56)), np.zeros(160, dtype=np.float32))


def test_audio_limit_is_the_models_exact_boundary(tiny):
    model, processor = tiny
    image = Image.new("RGB", (56, 56))
    run_model(model, processor, image, tone(MIN_AUDIO_SAMPLES))
    with pytest.raises(RuntimeError):
        run_model(model, processor, image, tone(MIN_AUDIO_SAMPLES - 1))
    # The formula is the model's own: one mel frame per started 160 samples -> _get_feat_extract_output_lengths.
    _, tokens = model.model.audio_tower._get_feat_extract_output_lengths(torch.arange(0, 1001))
    for frames in range(1, 1001):
        for samples in (160 * (frames - 1) + 1, 160 * frames):  # the fewest and the most samples for `frames`
            assert audio_token_count(samples) == int(tokens[frames]), samples
    assert audio_token_count(0) == 0 and audio_token_count(160000) == 250  # 10 s: 25 tokens per second
    assert audio_token_count(MIN_AUDIO_SAMPLES - 1) == 0 and audio_token_count(MIN_AUDIO_SAMPLES) == 1


def test_image_limit_is_the_processors_exact_boundary(tiny):
    _, processor = tiny
    smart_resize = sys.modules[type(processor.image_processor).__module__].smart_resize
    smart_resize(28, 28 * MAX_IMAGE_ASPECT_RATIO)  # at the limit: accepted
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(28, 28 * MAX_IMAGE_ASPECT_RATIO + 1)
    assert image_limit_problem(28, 28 * MAX_IMAGE_ASPECT_RATIO) is None
    assert "aspect ratio" in image_limit_problem(28 * MAX_IMAGE_ASPECT_RATIO + 1, 28)
    # A thin image that stays within the limit after the caps goes through end to end.
    assert capped_image_size(400, 2) == (392, 28) and image_limit_problem(392, 28) is None
    run_model(*tiny, Image.new("RGB", (392, 28)), tone(16000))


# ------------------------------------------------------------------------------------------
# The scan and the loader reject such rows, with a reason of their own
# ------------------------------------------------------------------------------------------


def test_scan_and_load_reject_rows_outside_the_limits(bad_split):
    assert {IMAGE_ASPECT_RATIO, AUDIO_TOO_SHORT} <= set(REASONS)
    scan = scan_split(bad_split)
    assert [(r.index, r.problem_id, r.reason) for r in scan.rejects] == [(0, 0, IMAGE_ASPECT_RATIO), (1, 1, AUDIO_TOO_SHORT)]
    image_reject, audio_reject = scan.rejects
    assert "images/sample_0.png" in image_reject.detail and "600x2" in image_reject.detail and "200" in image_reject.detail
    assert "crop or pad" in image_reject.detail
    assert "audios/sample_1.wav" in audio_reject.detail and "160 samples" in audio_reject.detail
    assert f"{MIN_AUDIO_SAMPLES} samples" in audio_reject.detail and "replace the file" in audio_reject.detail

    # The loader checks the decoded media again (a header can disagree; scans may skip media checks).
    rows = scan_split(bad_split, open_media=False).rows
    for row, reason, name in ((rows[0], IMAGE_ASPECT_RATIO, "sample_0.png"), (rows[1], AUDIO_TOO_SHORT, "sample_1.wav")):
        with pytest.raises(MediaError) as err:
            load_example(row)
        assert isinstance(err.value, RowEncodeError) and isinstance(err.value, DataError)
        assert (err.value.reason, err.value.problem_id, err.value.index) == (reason, row.problem_id, row.index)
        assert name in str(err.value) and f"row {row.index}" in str(err.value)
    load_example(rows[2])  # the others are untouched


def test_infer_refuses_such_media_in_one_line(bad_split):
    with pytest.raises(DataError, match="aspect ratio") as err:
        _load_media(bad_split / "audios/sample_2.wav", bad_split / "images/sample_0.png", 10.0, 256 * 28 * 28)
    assert "sample_0.png" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="too short") as err:
        _load_media(bad_split / "audios/sample_1.wav", bad_split / "images/sample_2.png", 10.0, 256 * 28 * 28)
    assert "sample_1.wav" in str(err.value)


# ------------------------------------------------------------------------------------------
# encode_row: the one load+encode path, one error type
# ------------------------------------------------------------------------------------------


def test_encode_row_is_load_example_then_encode_example(tiny, synth_dir):
    _, processor = tiny
    row = scan_split(synth_dir / "valid").rows[0]
    got = encode_row(processor, row, **CAPS, max_prompt_tokens=4096)
    want = encode_example(processor, load_example(row, **CAPS), max_prompt_tokens=4096)
    assert got.problem_id == row.problem_id
    for name in ("input_ids", "pixel_values", "image_grid_thw", "input_features", "feature_attention_mask"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_encode_row_raises_row_encode_error_for_every_failure(tiny, bad_split, monkeypatch):
    _, processor = tiny
    rows = scan_split(bad_split, open_media=False).rows
    with pytest.raises(MediaError) as err:
        encode_row(processor, rows[0], **CAPS)
    assert err.value.reason == IMAGE_ASPECT_RATIO and err.value.problem_id == 0

    with pytest.raises(PromptTooLongError) as err:
        encode_row(processor, rows[2], **CAPS, max_prompt_tokens=50)
    assert isinstance(err.value, RowEncodeError)
    assert (err.value.reason, err.value.problem_id, err.value.index) == (PROMPT_TOO_LONG, 2, 2)
    assert "generation.max_prompt_tokens=50" in str(err.value)

    # Any other processor failure (the real one raises ValueError, RuntimeError, IndexError, ...).
    def broken_processor(*args, **kwargs):
        raise IndexError("index 7 is out of bounds for dimension 0 with size 3\nsecond line")

    monkeypatch.setattr(type(processor), "__call__", broken_processor)
    with pytest.raises(RowEncodeError) as err:
        encode_row(processor, rows[3], **CAPS)
    assert (err.value.reason, err.value.problem_id, err.value.index) == (ENCODE_FAILED, 3, 3)
    message = str(err.value)
    assert "row 3" in message and "sample_3.wav" in message and "sample_3.png" in message
    assert "IndexError: index 7 is out of bounds" in message and "\n" not in message
    assert isinstance(err.value.__cause__, IndexError)
