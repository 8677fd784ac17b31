"""The media a row is shown with: its own, decoded and checked (`load_example`), or another row's (`derange`).

Why this module exists: training, evaluation and `data check` turn a checked `data.Row` into decoded audio and
image the same way, and a file that cannot be decoded, or lies outside the model's limits, must stop only
that row: `load_example` raises `data.MediaError` naming the row, the file and the fix, with a reason
constant so that callers skip the row and count it. `prompting.encode_row` adds the prompt encoding on top.
`derange` gives every row another row's media for the modality check of the demo.

The decoding and the limits themselves are `media`'s; this module adds what a row knows (its index, its
problem_id, the reject reasons of `data`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .data import (AUDIO_TOO_SHORT, BAD_AUDIO, BAD_IMAGE, EMPTY_AUDIO, EMPTY_IMAGE, IMAGE_ASPECT_RATIO, NONFINITE_AUDIO,
                   DataError, MediaError, Row)
from .media import (DEFAULT_MAX_AUDIO_SECONDS, DEFAULT_MAX_PIXELS, EmptyImageError, ImageAspectRatioError,
                    audio_limit_problem, audio_sample_problem, image_limit_problem, load_audio, load_image)

# --------------------------------------------------------------------------------------------
# A row's own media, decoded with the caps and checked against the model's limits
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    row: Row
    audio: np.ndarray  # float32 mono, 16 kHz
    image: Image.Image  # RGB


def load_example(
    row: Row, max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Example:
    """Decode a row's media with the caps; ``MediaError`` (with a reason constant) if either cannot be
    decoded or is outside the processor's and model's limits (see ``audio_limit_problem``,
    ``image_limit_problem``)."""
    where = f"row {row.index} (problem_id {row.problem_id!r})"

    def fail(reason: str, detail: str) -> MediaError:
        return MediaError(reason, f"{where}: {detail}", problem_id=row.problem_id, index=row.index)

    try:
        audio = load_audio(row.audio_path, max_seconds=max_audio_seconds)
    except Exception as err:
        raise fail(BAD_AUDIO, f"{row.audio_path} cannot be decoded as audio ({err}); replace the file or remove the row") from err
    if audio.size == 0:
        raise fail(EMPTY_AUDIO, f"{row.audio_path} holds no audio samples; replace the file or remove the row")
    problem = audio_sample_problem(audio)
    if problem:
        raise fail(NONFINITE_AUDIO, f"{row.audio_path} {problem}; replace the file or remove the row")
    problem = audio_limit_problem(audio.size)
    if problem:
        raise fail(AUDIO_TOO_SHORT, f"{row.audio_path} {problem}; replace the file or remove the row")
    try:
        image = load_image(row.image_path, max_pixels=max_pixels)
    except EmptyImageError as err:
        raise fail(EMPTY_IMAGE, f"{row.image_path} {err}; replace the file or remove the row") from err
    except ImageAspectRatioError as err:
        raise fail(IMAGE_ASPECT_RATIO, f"{row.image_path} {err}; crop or pad the image, or remove the row") from err
    except Exception as err:
        raise fail(BAD_IMAGE, f"{row.image_path} cannot be decoded as an image ({err}); replace the file or remove the row") from err
    problem = image_limit_problem(*image.size)
    if problem:
        raise fail(IMAGE_ASPECT_RATIO, f"{row.image_path} {problem}; crop or pad the image, or remove the row")
    return Example(row=row, audio=audio, image=image)


# --------------------------------------------------------------------------------------------
# Modality check helper: give every row another row's media
# --------------------------------------------------------------------------------------------


def derange(rows: list[Row], which: Literal["audio", "image", "both"], seed: int) -> list[Row]:
    """Rows whose audio, image or both come from a different row (a seeded derangement).

    Question and answer stay unchanged, so accuracy falling towards chance shows the model
    really uses that modality. With "both" the media come from the same donor row.
    """
    if which not in ("audio", "image", "both"):
        raise ValueError(f"which must be 'audio', 'image' or 'both', not {which!r}")
    if len(rows) < 2:
        raise DataError(f"need at least 2 rows to swap media between rows, got {len(rows)}")
    # Sattolo's algorithm: a uniformly random single cycle, so no row keeps its own media.
    donors = list(range(len(rows)))
    rng = random.Random(seed)
    for i in range(len(donors) - 1, 0, -1):
        j = rng.randrange(i)
        donors[i], donors[j] = donors[j], donors[i]

    swapped = []
    for row, donor_index in zip(rows, donors):
        donor = rows[donor_index]
        changes: dict[str, Path] = {}
        if which in ("audio", "both"):
            changes["audio_path"] = donor.audio_path
        if which in ("image", "both"):
            changes["image_path"] = donor.image_path
        swapped.append(replace(row, **changes))
    return swapped
