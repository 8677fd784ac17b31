"""What the model is shown of an image and a clip, pinned against the original's media code.

EchoInk-R1 loads media for training and for its evaluation through its bundled qwen-omni-utils
(HarryHsing/EchoInk, commit 3f6d16a): ``fetch_image`` in src/qwen-omni-utils/src/qwen_omni_utils/v2_5/
vision_process.py (``to_rgb``, ``smart_resize`` with MIN_PIXELS 4*28*28 and MAX_PIXELS 256*28*28, then
``image.resize``), and ``librosa.load(path, sr=16000, duration=10)`` in audio_process.py. Their code is quoted
below verbatim; the kit's ``media.load_image`` / ``media.load_audio`` must give the same sizes and samples.

librosa itself is not called here: its first ``load`` compiles numba code for ~15 s. Its steps are quoted
from librosa 0.11 (librosa/core/audio.py: ``__soundfile_load``, ``to_mono``, ``resample``; librosa/util/utils.py:
``fix_length``); a direct comparison with ``librosa.load`` on the same files gave identical arrays.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import soxr
from PIL import Image

from echoink_lite.media import ImageAspectRatioError, capped_image_size, load_audio, load_image

# ---- vision_process.py (HarryHsing/EchoInk 3f6d16a), verbatim ------------------------------------------------
IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 256 * 28 * 28
MAX_RATIO = 200


def round_by_factor(number: int, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: int, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: int, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def to_rgb(pil_image):
    if pil_image.mode == 'RGBA':
        white_background = Image.new("RGB", pil_image.size, (255, 255, 255))
        white_background.paste(pil_image, mask=pil_image.split()[3])  # Use alpha channel as mask
        return white_background
    else:
        return pil_image.convert("RGB")


def original_fetch_image(path) -> Image.Image:
    """fetch_image for a local path without resized_* / min_pixels / max_pixels keys (the original's case)."""
    image = to_rgb(Image.open(path))
    width, height = image.size
    resized_height, resized_width = smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=MIN_PIXELS,
                                                 max_pixels=MAX_PIXELS)
    return image.resize((resized_width, resized_height))
# ---------------------------------------------------------------------------------------------------------------


def test_image_sizes_are_the_originals_smart_resize():
    sizes = [(640, 480), (1280, 720), (1920, 1080), (480, 360), (1000, 500), (700, 400), (60, 60), (8, 4), (56, 56),
             (1, 1), (300, 299), (5799, 29), (400, 2), (224, 224), (449, 449), (3000, 17)]
    sizes += [(w, h) for w in range(14, 1500, 37) for h in range(14, 1100, 53)]
    for width, height in sizes:
        for max_pixels in (MAX_PIXELS, 512 * 28 * 28, 64 * 28 * 28):
            h, w = smart_resize(height, width, max_pixels=max_pixels)
            ours = capped_image_size(width, height, max_pixels, MIN_PIXELS)
            if 0 in (h, w):  # the original's resize to a zero side fails; the kit keeps one row of 28
                assert ours == (max(w, 28), max(h, 28)), (width, height, max_pixels)
                continue
            assert ours == (w, h), (width, height, max_pixels)
    # The case that differed: capping the pixel count first and letting the processor round to 28 afterwards
    # gave 504x392 (14 rows of 28) for a 640x480 frame; the original shows the model 504x364 (13 rows).
    assert capped_image_size(640, 480) == (504, 364)


@pytest.mark.parametrize("size", [(640, 480), (1280, 720), (333, 517), (60, 60), (8, 4)])
def test_load_image_gives_the_originals_pixels(tmp_path, size):
    rng = np.random.default_rng(size[0])
    path = tmp_path / "frame.png"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    ours, theirs = load_image(path), original_fetch_image(path)
    assert ours.size == theirs.size and ours.mode == theirs.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_an_image_the_original_refuses_is_refused(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (600, 2)).save(path)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(2, 600)
    with pytest.raises(ImageAspectRatioError, match="aspect ratio"):
        load_image(path)


# ---- librosa 0.11's load(path, sr=16000, duration=10) on a soundfile-readable file, step by step --------------
def librosa_load(path, sr=16000, duration=10.0):
    with sf.SoundFile(path) as sf_desc:  # __soundfile_load
        sr_native = sf_desc.samplerate
        frame_duration = int(duration * sr_native)
        y = sf_desc.read(frames=frame_duration, dtype=np.float32, always_2d=False).T
    if y.ndim > 1:  # to_mono
        y = np.mean(y, axis=tuple(range(y.ndim - 1)))
    if sr_native == sr:  # resample(y, orig_sr=sr_native, target_sr=sr, res_type="soxr_hq", fix=True)
        return y
    ratio = float(sr) / sr_native
    n_samples = int(np.ceil(y.shape[-1] * ratio))
    y_hat = np.apply_along_axis(soxr.resample, axis=-1, arr=y, in_rate=sr_native, out_rate=sr, quality="soxr_hq")
    n = y_hat.shape[-1]  # util.fix_length(y_hat, size=n_samples)
    if n > n_samples:
        y_hat = y_hat[:n_samples]
    elif n < n_samples:
        y_hat = np.pad(y_hat, [(0, n_samples - n)])
    return np.asarray(y_hat, dtype=y.dtype)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate,frames,channels", [
    (11025, 7777, 1),  # soxr gives 11286 samples, librosa pads to ceil(7777 * 16000 / 11025) = 11287
    (44100, 12345, 1), (22050, 500001, 2), (48000, 1001, 2), (16000, 300000, 1), (8000, 3333, 1), (24000, 20011, 1),
])
def test_load_audio_gives_librosas_samples(tmp_path, rate, frames, channels):
    rng = np.random.default_rng(frames)
    path = tmp_path / "clip.wav"
    sf.write(path, (0.3 * rng.standard_normal((frames, channels))).astype(np.float32), rate, subtype="PCM_16")
    ours, theirs = load_audio(path), librosa_load(path)
    assert ours.dtype == theirs.dtype == np.float32
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
