"""Media that decode but would make a step non-finite, or decode to no pixels, are rejected by `data check`
and by the loader of training and evaluation (`load_example`, `encode_row`), naming the row and the file.

Before: a float WAV holding NaN passed `data check` ("all rows usable"), and every step that met it had a
non-finite loss; the run then advised a lower learning rate.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from rich.console import Console

from echoink_lite import data, row_media
from echoink_lite.data import EMPTY_IMAGE, NONFINITE_AUDIO, MediaError, scan_split
from echoink_lite.data_check import check_command
from echoink_lite.media import MAX_AUDIO_PEAK
from echoink_lite.row_media import load_example


def float_wav(path, samples):
    sf.write(path, np.asarray(samples, dtype=np.float32), 16000, subtype="FLOAT")


def tone(n=16000, amplitude=0.3):
    return amplitude * np.sin(np.arange(n) / 5)


@pytest.fixture
def split(synth_dir, tmp_path):
    """The synthetic valid split (8 rows) with row 1's audio holding a NaN, row 2's an inf, row 3's a peak of
    1e30 (finite, but the spectrogram overflows) and row 4's a peak just under the limit (fine)."""
    import shutil

    out = tmp_path / "valid"
    shutil.copytree(synth_dir / "valid", out)
    audios = out / "audios"
    nan, inf = tone(), tone()
    nan[8000] = np.nan
    inf[100:103] = np.inf
    float_wav(audios / "sample_1.wav", nan)
    float_wav(audios / "sample_2.wav", inf)
    float_wav(audios / "sample_3.wav", tone(amplitude=1e30))
    float_wav(audios / "sample_4.wav", tone(amplitude=MAX_AUDIO_PEAK / 2))
    return out


def test_data_check_rejects_nonfinite_audio_naming_row_and_file(split, tmp_path):
    console = Console(file=io.StringIO(), width=200)
    report = tmp_path / "bad.jsonl"
    assert check_command(split, report, console=console) == 1
    rejects = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in rejects] == [(1, NONFINITE_AUDIO), (2, NONFINITE_AUDIO), (3, NONFINITE_AUDIO)]
    assert "sample_1.wav holds 1 NaN or infinite samples (the first at 0.500 s)" in rejects[0]["detail"]
    assert "sample_2.wav holds 3 NaN or infinite samples (the first at 0.006 s)" in rejects[1]["detail"]
    assert "sample_3.wav peaks at 1e+30" in rejects[2]["detail"] and "row 3" in rejects[2]["detail"]
    assert "all rows usable" not in console.file.getvalue()


def test_the_loader_rejects_them_too(split):
    rows = {r.index: r for r in scan_split(split).rows}  # the header-only scan cannot see samples
    assert len(rows) == 8
    for i in (1, 2, 3):
        with pytest.raises(MediaError) as err:
            load_example(rows[i], max_audio_seconds=1.0)
        assert err.value.reason == NONFINITE_AUDIO and f"sample_{i}.wav" in str(err.value)
    load_example(rows[4], max_audio_seconds=1.0)


def test_the_peak_limit_is_where_the_processors_features_stop_being_finite(tiny_model_dir):
    """MAX_AUDIO_PEAK is derived from the feature extractor's window; pin it against the real extractor."""
    import torch

    from echoink_lite.modeling import load_processor

    extract = load_processor(str(tiny_model_dir)).feature_extractor
    for amplitude, finite in ((MAX_AUDIO_PEAK * 0.99, True), (MAX_AUDIO_PEAK * 1.01, False)):
        features = extract([np.full(16000, amplitude, np.float32)], sampling_rate=16000, return_tensors="pt")
        assert bool(torch.isfinite(features["input_features"]).all()) is finite


def test_encoding_refuses_nonfinite_features_whatever_their_cause(tiny_model_dir, split, monkeypatch):
    """The loader's sample check is the first line; `encode_row` checks the processor's output as well."""
    from echoink_lite.data import RowEncodeError
    from echoink_lite.modeling import load_processor
    from echoink_lite.prompting import encode_row

    processor = load_processor(str(tiny_model_dir))
    row = next(r for r in scan_split(split).rows if r.index == 3)
    monkeypatch.setattr(row_media, "audio_sample_problem", lambda samples: None)
    with pytest.raises(RowEncodeError) as err:
        encode_row(processor, row, max_audio_seconds=1.0, max_pixels=256 * 28 * 28)
    assert err.value.reason == NONFINITE_AUDIO and "audio features" in str(err.value) and "row 3" in str(err.value)


def test_an_image_that_decodes_to_no_pixels_is_rejected_by_name(synth_dir, monkeypatch):
    """Pillow's own readers refuse a 0-pixel image when opening it; a plugin that returns one anyway used to
    crash the scan with a ZeroDivisionError (the pixel caps divide by the pixel count)."""
    row = scan_split(synth_dir / "valid").rows[0]
    real_open = Image.open

    def open_empty(path, *a, **k):
        if str(path).endswith(row.image_path.name):
            img = Image.new("RGB", (0, 0))
            img.verify = lambda: None
            return img
        return real_open(path, *a, **k)

    monkeypatch.setattr(data.Image, "open", open_empty)
    with pytest.raises(MediaError) as err:
        load_example(row, max_audio_seconds=1.0)
    assert err.value.reason == EMPTY_IMAGE and "decodes to an empty image (0x0 pixels)" in str(err.value)
    scan = scan_split(synth_dir / "valid")
    assert [(r.index, r.reason) for r in scan.rejects] == [(row.index, EMPTY_IMAGE)]
    assert row.image_path.name in scan.rejects[0].detail


def test_infer_refuses_nonfinite_audio_in_one_line(split):
    from echoink_lite.data import DataError
    from echoink_lite.infer import _load_media

    with pytest.raises(DataError, match="sample_1.wav holds 1 NaN or infinite samples"):
        _load_media(split / "audios" / "sample_1.wav", split / "images" / "sample_1.png", 10.0, 256 * 28 * 28)
