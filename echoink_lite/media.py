"""Decode a row's audio and image with the original's caps, and check them against the model's limits.

Why this module exists: what the model is shown of a clip or a picture is fixed here, once, for training,
evaluation, inference and `data check`: audio as 16 kHz mono cut to the first 10 s, images brought within a
pixel range with the aspect ratio kept, as EchoInk-R1 did. Beside the decoders sit the limits of the processor
and the model that a decoded file can still break (an image over aspect ratio 200, audio too short for one
audio token, samples that overflow the feature extractor's spectrogram), each as a function that says why a
size or a clip cannot go to the model, or None.

It knows files and samples, not rows: `data` applies the limits when a split is scanned, and
`row_media.load_example` decodes a row with them and names the row when something fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from PIL import Image

# --------------------------------------------------------------------------------------------
# Media caps (the original's) and the limits of the processor and model
# --------------------------------------------------------------------------------------------

# EchoInk-R1 feeds audio as 16 kHz mono cut to the first 10 s, and images brought within 4*28*28 and
# 256*28*28 pixels (at most 256 visual tokens): its bundled qwen-omni-utils, src/qwen-omni-utils/src/
# qwen_omni_utils/v2_5/audio_process.py and vision_process.py (MIN_PIXELS, MAX_PIXELS). A recipe's
# data.max_audio_seconds / data.max_pixels can change the caps.
SAMPLING_RATE = 16000
DEFAULT_MAX_AUDIO_SECONDS = 10.0
DEFAULT_MAX_PIXELS = 256 * 28 * 28
DEFAULT_MIN_PIXELS = 4 * 28 * 28

# A row outside the limits below decodes fine, then crashes the processor or the model at the training step
# (or evaluation batch) that meets it, with a traceback that does not name the row. They are checked
# explicitly, with the libraries' own numbers, when a split is scanned and again when a row is loaded,
# rather than by running the processor over every row in `data check`: the audio limit is only hit inside
# the model's forward pass (the processor encodes such audio without complaint), and an explicit check
# needs no model download and costs nothing. Any other failure of the processor is caught when the row is
# encoded (``prompting.encode_row`` raises ``RowEncodeError`` with reason ``encode_failed``).

# transformers' smart_resize for Qwen2-VL-style image processors (models/qwen2_vl/image_processing_qwen2_vl.py,
# used by Qwen2.5-Omni) raises "absolute aspect ratio must be smaller than 200" above this (so does the
# original's vision_process.py, MAX_RATIO = 200).
MAX_IMAGE_ASPECT_RATIO = 200

# Qwen2.5-Omni's WhisperFeatureExtractor makes one mel frame per 160 samples (hop_length; 10 ms at 16 kHz).
AUDIO_HOP_SAMPLES = 160


def audio_token_count(samples: int) -> int:
    """Audio tokens the thinker makes of ``samples`` 16 kHz samples.

    Mel frames (one per started hop, as the feature extractor's attention mask counts them), then the audio
    encoder's two stride-2 stages: ``_get_feat_extract_output_lengths`` in transformers'
    models/qwen2_5_omni/modeling_qwen2_5_omni.py. With 0 tokens the thinker's ``get_rope_index`` fails
    with "max(): ... numel() == 0".
    """
    frames = -(-samples // AUDIO_HOP_SAMPLES)
    after_first_stage = (frames - 1) // 2 + 1
    return (after_first_stage - 2) // 2 + 1


MIN_AUDIO_SAMPLES = 2 * AUDIO_HOP_SAMPLES + 1  # 321 samples, about 20 ms: the fewest that give one audio token


def audio_limit_problem(samples: int) -> str | None:
    """Why audio of ``samples`` samples at 16 kHz cannot go to the model, or None if it can."""
    if audio_token_count(samples) >= 1:
        return None
    return (
        f"holds {samples} samples at 16 kHz ({1000 * samples / SAMPLING_RATE:.0f} ms), too short for one audio "
        f"token (Qwen2.5-Omni needs at least {MIN_AUDIO_SAMPLES} samples, about 20 ms)"
    )


# The feature extractor's power spectrum is float32: a 400-sample Hann window (n_fft of Qwen2.5-Omni's
# WhisperFeatureExtractor) sums to 200, so a window of samples at amplitude A has power up to (200 A)^2, which
# overflows float32 (3.4e38) above A = 9.2e16 and turns the row's features into inf/NaN (measured: 9.22e16
# on a constant signal). Decoded PCM lies in [-1, 1]; only a float file can hold such values.
WHISPER_N_FFT = 400
MAX_AUDIO_PEAK = math.sqrt(float(np.finfo(np.float32).max)) / (WHISPER_N_FFT / 2)


def audio_sample_problem(samples: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> str | None:
    """Why these decoded samples would give the model non-finite features, or None: NaN or inf samples (a
    float WAV can hold them), or a peak so large that the feature extractor's spectrum overflows."""
    finite = np.isfinite(samples)
    if not finite.all():
        bad = int((~finite).sum())
        first = int(np.argmin(finite))
        return (f"holds {bad} NaN or infinite samples (the first at {first / sampling_rate:.3f} s), which make every "
                "loss and gradient of its step non-finite")
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak > MAX_AUDIO_PEAK:
        return (f"peaks at {peak:.3g}, over {MAX_AUDIO_PEAK:.3g} where the processor's spectrogram overflows to "
                "inf/NaN (decoded audio normally lies in [-1, 1])")
    return None


def image_limit_problem(width: int, height: int) -> str | None:
    """Why an image of this size (as the processor receives it) cannot go to the model, or None if it can."""
    ratio = max(width, height) / min(width, height)
    if ratio <= MAX_IMAGE_ASPECT_RATIO:
        return None
    return (
        f"is {width}x{height} pixels after the pixel caps, an aspect ratio of {ratio:.1f}, over the image "
        f"processor's limit of {MAX_IMAGE_ASPECT_RATIO}"
    )


IMAGE_FACTOR = 28  # the vision tower's patch (14) times its 2x2 merge: image sides are multiples of 28


def capped_image_size(
    width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS, min_pixels: int = DEFAULT_MIN_PIXELS
) -> tuple[int, int]:
    """(width, height) ``load_image`` gives an image: the original's ``smart_resize`` (HarryHsing/EchoInk,
    commit 3f6d16a, src/qwen-omni-utils/src/qwen_omni_utils/v2_5/vision_process.py, called by ``fetch_image``
    for training and evaluation alike): each side rounded to a multiple of 28 (Python's ``round``), then, if
    the area is over ``max_pixels``, both sides scaled down and floored to multiples of 28, or if under
    ``min_pixels``, scaled up and ceiled. The processor then finds nothing to resize. (Capping the pixel count
    first and letting the processor round afterwards, as the kit once did, can give another size: 640x480
    became 504x392 instead of the original's 504x364.) One departure: where the original's floor gives a side
    of 0 (a strip near aspect ratio 200 under a max_pixels below the default; its resize then fails), the side
    is 28, and ``image_limit_problem`` judges the result.
    """
    factor = IMAGE_FACTOR
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return w_bar, h_bar


# --------------------------------------------------------------------------------------------
# Media loading (the caps above: 16 kHz mono, first 10 s; at most 256*28*28 pixels)
# --------------------------------------------------------------------------------------------


def load_audio(
    path: str | Path, max_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS, sampling_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """Float32 mono samples at ``sampling_rate``, cut to the first ``max_seconds`` (None: whole file).

    soundfile + soxr rather than librosa, with librosa.load's steps (first ``int(max_seconds * native rate)``
    frames, channel mean, soxr HQ, length fixed to ceil): the original's samples (tests/test_original_media.py),
    in milliseconds instead of librosa's ~15 s numba warm-up.
    """
    native_rate = sf.info(str(path)).samplerate
    # Read only what survives the cut: a 10-minute file costs the same as a 10-second one.
    frames = -1 if max_seconds is None else int(max_seconds * native_rate)
    samples, native_rate = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1, dtype=np.float32)
    if native_rate != sampling_rate:
        # As librosa.resample (librosa/core/audio.py, res_type "soxr_hq", fix=True), which the original's
        # librosa.load(path, sr=16000, duration=10) calls: soxr's HQ resampler, then the length fixed to
        # ceil(n * ratio) samples, zero-padded where soxr gives one fewer (as it does for 7777 samples at 11025 Hz).
        length = math.ceil(mono.size * float(sampling_rate) / native_rate)
        mono = soxr.resample(mono, native_rate, sampling_rate, quality="soxr_hq")
        mono = np.pad(mono, (0, length - mono.size)) if mono.size < length else mono[:length]
    return np.ascontiguousarray(mono, dtype=np.float32)


class EmptyImageError(ValueError):
    """An image file that decodes to no pixels."""


def _to_rgb(img: Image.Image) -> Image.Image:
    # Transparent pixels go on white, as the Qwen image processor's convert_rgb does.
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ImageAspectRatioError(ValueError):
    """An image the original's ``fetch_image`` refuses: aspect ratio over 200 before any resize."""


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_pixels: int = DEFAULT_MIN_PIXELS) -> Image.Image:
    """RGB image resized as the original's ``fetch_image`` resizes it (``capped_image_size``): sides multiples
    of 28, pixel count within [min_pixels, max_pixels] (256*28*28 pixels -> at most 256 visual tokens), one
    bicubic resize (PIL's default filter for RGB, which ``fetch_image``'s ``image.resize`` uses).

    Raises ImageAspectRatioError for an image over aspect ratio 200, which ``fetch_image`` refuses too.
    """
    with Image.open(path) as img:
        img.load()
        if 0 in img.size:  # Pillow's own readers refuse such files; a plugin's may not
            raise EmptyImageError(f"decodes to an empty image ({img.size[0]}x{img.size[1]} pixels)")
        rgb = _to_rgb(img)
    problem = image_limit_problem(rgb.width, rgb.height)
    if problem:
        raise ImageAspectRatioError(problem)
    size = capped_image_size(rgb.width, rgb.height, max_pixels, min_pixels)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.BICUBIC)
    return rgb
