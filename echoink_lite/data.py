"""Read AVQA-R1-6K style splits, check every row, load media, and build the prompt text.

Why this module exists: training and evaluation both start from a split folder laid out like the
published AVQA-R1-6K data set (``audios/``, ``images/`` and a JSON list ``omni_rl_format_*.json``).
A single bad row (a missing wav, a truncated jpg, a solution that is not one of the options) must
not crash a multi-hour GRPO run at step 400, and must not be silently dropped either. So:

1. ``resolve_split`` finds the JSON file for a folder or file path.
2. ``scan_split`` reads every row and either turns it into a checked ``Row`` or records a
   ``Reject`` with a reason constant and a message that names the file/field and the fix.
3. ``enforce_bad_fraction`` lets the caller refuse a split that is mostly broken.
4. ``load_example`` decodes audio (16 kHz mono, first 10 s) and image (pixel-capped RGB) with the
   same caps the original EchoInk-R1 used, and checks them against the processor's and model's limits
   (an image over aspect ratio 200, audio too short for one audio token); failures raise ``MediaError``,
   a ``RowEncodeError``, so callers can skip and count them. ``prompting.encode_row`` adds the prompt
   encoding and is what training and evaluation call.
5. ``check_command`` is ``echoink-lite data check PATH [--report FILE]``: the same checks plus a
   full decode of every row, a summary table and a JSON Lines report. Exit 0: every row usable;
   1: bad rows; 2: the check could not run (unreadable path, unwritable report).

The prompt text and the answer tags are the answer protocol's (``answer_protocol``); ``Row.prompt_text``
builds the text the model is asked.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import soundfile as sf
import soxr
from PIL import Image

from .answer_protocol import build_prompt_text, extract_answer, option_letters

# --------------------------------------------------------------------------------------------
# Reject reasons: stable strings, they appear in reports that users grep.
# --------------------------------------------------------------------------------------------

MISSING_FIELD = "missing_field"
MISSING_FILE = "missing_file"
BAD_AUDIO = "unreadable_audio"
EMPTY_AUDIO = "empty_audio"
NONFINITE_AUDIO = "nonfinite_audio"
BAD_IMAGE = "unreadable_image"
EMPTY_IMAGE = "empty_image"
PATH_ESCAPE = "path_outside_split"
BAD_SOLUTION = "solution_not_an_option"
BAD_OPTIONS = "malformed_options"
DUPLICATE_ID = "duplicate_id"
BAD_JSON = "malformed_row"
IMAGE_ASPECT_RATIO = "image_aspect_ratio"
AUDIO_TOO_SHORT = "audio_too_short"

REASONS = (
    MISSING_FIELD,
    MISSING_FILE,
    BAD_AUDIO,
    EMPTY_AUDIO,
    NONFINITE_AUDIO,
    AUDIO_TOO_SHORT,
    BAD_IMAGE,
    EMPTY_IMAGE,
    IMAGE_ASPECT_RATIO,
    PATH_ESCAPE,
    BAD_SOLUTION,
    BAD_OPTIONS,
    DUPLICATE_ID,
    BAD_JSON,
)

# Reasons only met when a row is encoded for the model (training, evaluation), never by a scan.
PROMPT_TOO_LONG = "prompt_too_long"
ENCODE_FAILED = "encode_failed"


class DataError(ValueError):
    """A split cannot be used as given; the message says what to fix."""


class SplitReadError(DataError):
    """The split's path does not exist or cannot be read (an I/O problem, not bad rows)."""


class RowEncodeError(DataError):
    """One row cannot be turned into model inputs: its media fail to load, lie outside the model's limits,
    or the processor cannot encode it. Training and evaluation skip such a row and count it by ``reason``.

    ``detail`` (also ``str(err)``) is one line naming the row, the file and the fix; ``problem_id`` and
    ``index`` (0-based position in the split's list file) say which row, when known.
    """

    def __init__(self, reason: str, detail: str, problem_id: str | int | None = None, index: int | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.problem_id = problem_id
        self.index = index


class MediaError(RowEncodeError):
    """One row's audio or image cannot be decoded, or is outside what the processor and model accept."""


# --------------------------------------------------------------------------------------------
# Rows, rejects and the result of a scan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One checked item. Media paths are absolute and known to lie inside the split folder."""

    problem_id: str | int
    problem: str
    options: tuple[str, ...]
    answer: str  # the option letter, e.g. "C"
    solution: str  # the original solution string, e.g. "<answer>C</answer>"
    image_path: Path
    audio_path: Path
    data_source: str | None
    index: int  # 0-based position in the source file
    # AVQA-R1-6K's question and sound categories, kept for the evaluation's breakdowns (the original's
    # omniInstruct-v1_cal_metrics_valid.py reports accuracy by each); None where a row has none.
    task_type: str | None = None
    audio_type: str | None = None

    @property
    def prompt_text(self) -> str:
        return build_prompt_text(self.problem, self.options)

    @property
    def letters(self) -> tuple[str, ...]:
        return option_letters(self.options)


@dataclass
class Reject:
    """One row that cannot be used, why, and how to fix it."""

    index: int
    problem_id: str | int | None
    reason: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"problem_id": self.problem_id, "reason": self.reason, "detail": self.detail, "index": self.index}


@dataclass
class SplitScan:
    split_dir: Path
    source_file: Path
    rows: list[Row] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    total: int = 0

    @property
    def bad_fraction(self) -> float:
        return len(self.rejects) / self.total if self.total else 0.0

    def counts_by_reason(self) -> dict[str, int]:
        """Reject counts per reason, only reasons that occur, in ``REASONS`` order."""
        counts = {reason: 0 for reason in REASONS}
        for reject in self.rejects:
            counts[reject.reason] = counts.get(reject.reason, 0) + 1
        return {reason: n for reason, n in counts.items() if n > 0}


# --------------------------------------------------------------------------------------------
# Finding the split file
# --------------------------------------------------------------------------------------------


def resolve_split(path: str | Path) -> tuple[Path, Path]:
    """Return (split_dir, list_file) for a split folder, a JSON list file, or a JSON Lines file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SplitReadError(
            f"{path} does not exist; pass a split folder (with audios/, images/ and a JSON list) or its JSON file"
        )
    if path.is_file():
        return path.parent.resolve(), path.resolve()

    # A folder: prefer the published name, else accept exactly one list file.
    try:
        candidates = sorted(path.glob("omni_rl_format_*.json"))
        if not candidates:
            candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl"))
    except OSError as err:
        raise SplitReadError(f"cannot list {path} ({err.strerror or err}); check the path and its permissions") from err
    if len(candidates) == 1:
        return path.resolve(), candidates[0].resolve()
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DataError(
            f"{path} holds several list files ({names}); pass the JSON file itself, e.g. {candidates[0]}"
        )
    # Nothing here; a common slip is pointing at the data set root instead of train/ or valid/.
    nested = sorted(path.glob("*/omni_rl_format_*.json"))
    hint = f" (found {', '.join(str(p.parent) for p in nested)}: pass one of those)" if nested else ""
    raise DataError(
        f"{path} holds no omni_rl_format_*.json and no single .json/.jsonl file{hint}; "
        "pass a split folder such as AVQA-R1-6K/train or the JSON file itself"
    )


def _read_items(source: Path) -> list[tuple[Any, str | None]]:
    """Parsed items of the list file, each with a parse error message (JSON Lines only) or None."""
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{source} is not UTF-8 text ({err}); re-save it as UTF-8 JSON") from err
    except OSError as err:
        raise SplitReadError(f"cannot read {source} ({err.strerror or err}); check the path and its permissions") from err

    if source.suffix == ".jsonl":
        # One object per line; a bad line is one bad row, not a reason to drop the whole file.
        items: list[tuple[Any, str | None]] = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((json.loads(line), None))
            except json.JSONDecodeError as err:
                detail = f"line {line_no} of {source} is not valid JSON ({err.msg} at column {err.colno})"
                items.append((None, detail + "; fix or remove the line"))
            except RecursionError:
                items.append((None, f"line {line_no} of {source} is nested too deeply to read (deeper than Python's "
                                    "recursion limit); fix or remove the line"))
            except ValueError as err:  # json's own limits, e.g. an integer of more than 4300 digits
                items.append((None, f"line {line_no} of {source} cannot be read ({' '.join(str(err).split())[:200]}); "
                                    "fix or remove the line"))
        return items

    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError(f"{source} is nested too deeply to read (deeper than Python's recursion limit); an AVQA list is "
                        "a list of flat objects: fix the file or re-download it") from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"{source} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
            "fix the file (an unfinished download is a common cause) or re-download it"
        ) from err
    except ValueError as err:  # json's own limits, e.g. an integer of more than 4300 digits
        raise DataError(f"{source} cannot be read as JSON ({' '.join(str(err).split())[:200]}); fix the file") from None
    if not isinstance(data, list):
        raise DataError(
            f"{source} holds a JSON {type(data).__name__}, expected a list of items; pass the AVQA-style list file"
        )
    return [(item, None) for item in data]


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


def capped_image_size(
    width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS, min_pixels: int = DEFAULT_MIN_PIXELS
) -> tuple[int, int]:
    """The size ``load_image`` gives an image: pixel count brought within [min_pixels, max_pixels], aspect kept."""
    pixels = width * height
    if pixels > max_pixels:
        scale = math.sqrt(max_pixels / pixels)
        return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    if pixels < min_pixels:
        scale = math.sqrt(min_pixels / pixels)
        return math.ceil(width * scale), math.ceil(height * scale)
    return width, height


# --------------------------------------------------------------------------------------------
# Checking rows
# --------------------------------------------------------------------------------------------

_OPTION_RE = re.compile(r"([A-Z])\. ")


def _check_structure(item: Any) -> tuple[str, str] | None:
    """(reason, detail) if required fields are absent or of the wrong type, else None."""
    if not isinstance(item, dict):
        return BAD_JSON, (
            f"row is a JSON {type(item).__name__}, expected an object with "
            "problem_id, problem, options, solution, path; fix or remove the row"
        )
    for name in ("problem_id", "problem", "options", "solution", "path"):
        if item.get(name) is None:
            return MISSING_FIELD, f"field '{name}' is missing; add it or remove the row"
    pid = item["problem_id"]
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        return BAD_JSON, f"field 'problem_id' is a {type(pid).__name__}, expected an integer or string; fix the row"
    for name in ("problem", "solution"):
        if not isinstance(item[name], str):
            return BAD_JSON, f"field '{name}' is a {type(item[name]).__name__}, expected a string; fix the row"
    if not isinstance(item["path"], dict):
        return BAD_JSON, (
            f"field 'path' is a {type(item['path']).__name__}, expected an object with 'image' and 'audio';"
            " fix the row"
        )
    for name in ("image", "audio"):
        value = item["path"].get(name)
        if value is None:
            return MISSING_FIELD, f"field 'path.{name}' is missing; add the relative {name} path or remove the row"
        if not isinstance(value, str):
            return BAD_JSON, (
                f"field 'path.{name}' is a {type(value).__name__}, expected a relative path string;"
                " fix the row"
            )
    for name in ("data_source", "task_type", "audio_type"):
        value = item.get(name)
        if value is not None and not isinstance(value, str):
            return BAD_JSON, f"field '{name}' is a {type(value).__name__}, expected a string or null; fix the row"
    return None


def _check_options(options: Any) -> tuple[tuple[str, ...] | None, str]:
    """(options, "") if well formed, else (None, detail). Options are "A. ...", "B. ..." in order."""
    if not isinstance(options, list) or not options:
        return None, "field 'options' must be a non-empty list like [\"A. ...\", \"B. ...\"]; fix the row"
    for position, option in enumerate(options):
        expected = chr(ord("A") + position)
        if not isinstance(option, str):
            return None, (
                f"field 'options'[{position}] is a {type(option).__name__}, expected a string \"{expected}. ...\";"
                " fix the row"
            )
        match = _OPTION_RE.match(option)
        if not match:
            return None, (
                f"field 'options'[{position}] is {option!r}, expected it to start with \"{expected}. \";"
                " fix the row"
            )
        if match.group(1) != expected:
            return None, (
                f"field 'options'[{position}] starts with {match.group(1)!r}, expected letters A, B, C, ... in order;"
                " fix the row"
            )
    return tuple(options), ""


def _answer_letter(solution: str) -> str:
    """The letter a solution names: the <answer> content, or a bare single letter."""
    extracted = extract_answer(solution)
    return extracted if extracted is not None else solution.strip()


def _resolve_media(split_dir: Path, rel: str, name: str) -> tuple[Path | None, str, str]:
    """(absolute path, "", "") if ``rel`` stays inside the split folder, else (None, reason, detail).

    A safety rule: a data file must never make us open /etc/passwd or ../../secret.wav, so absolute
    paths and anything that resolves (symlinks included) outside the split folder are refused unopened.
    """
    rel_path = Path(rel)
    if rel_path.is_absolute():
        return None, PATH_ESCAPE, (
            f"field 'path.{name}' is the absolute path {rel!r};"
            f" make it relative to {split_dir} and keep the file inside it"
        )
    try:
        resolved = (split_dir / rel_path).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a NUL byte, a name too long
        return None, MISSING_FILE, (f"field 'path.{name}' {rel!r} cannot be resolved under {split_dir} "
                                    f"({' '.join(str(err).split())}); fix the path or remove the row")
    if not resolved.is_relative_to(split_dir):
        return None, PATH_ESCAPE, (
            f"field 'path.{name}' {rel!r} points outside {split_dir};"
            " move the file into the split folder and fix the path"
        )
    if resolved == split_dir:
        return None, MISSING_FILE, f"field 'path.{name}' {rel!r} names the split folder itself; fix the path or remove the row"
    return resolved, "", ""


def _check_media_files(
    split_dir: Path, image_rel: str, image: Path, audio_rel: str, audio: Path, open_media: bool
) -> tuple[str, str] | None:
    for rel, path in ((image_rel, image), (audio_rel, audio)):
        try:
            is_file = path.is_file()
        except OSError as err:  # a name too long for the file system
            return MISSING_FILE, f"{rel[:80]!r} cannot be opened under {split_dir} ({err.strerror}); fix the path or remove the row"
        if not is_file:
            return MISSING_FILE, f"{rel} does not exist under {split_dir}; fix the path or remove the row"
    if not open_media:
        return None
    # Cheap header checks here; ``check_command`` additionally decodes everything.
    try:
        info = sf.info(str(audio))
    except Exception as err:  # soundfile raises several types for unreadable files
        return BAD_AUDIO, (
            f"{audio_rel} under {split_dir} cannot be read as audio ({err});"
            " replace the file or remove the row"
        )
    if info.frames <= 0:
        return EMPTY_AUDIO, f"{audio_rel} under {split_dir} holds no audio samples; replace the file or remove the row"
    # Samples after resampling to 16 kHz, as load_audio will give them (exact up to rounding; load_example
    # checks the decoded samples again).
    problem = audio_limit_problem(int(info.frames * SAMPLING_RATE / info.samplerate))
    if problem:
        return AUDIO_TOO_SHORT, f"{audio_rel} under {split_dir} {problem}; replace the file or remove the row"
    try:
        with Image.open(image) as img:
            size = img.size
            img.verify()
    except Exception as err:  # PIL raises UnidentifiedImageError, SyntaxError, OSError, ...
        return BAD_IMAGE, (
            f"{image_rel} under {split_dir} cannot be read as an image ({err});"
            " replace the file or remove the row"
        )
    if 0 in size:
        return EMPTY_IMAGE, (f"{image_rel} under {split_dir} is {size[0]}x{size[1]} pixels, an empty image;"
                             " replace the file or remove the row")
    # With the paper's pixel caps; load_example checks the image at the caps in use.
    problem = image_limit_problem(*capped_image_size(*size))
    if problem:
        return IMAGE_ASPECT_RATIO, (
            f"{image_rel} under {split_dir} ({size[0]}x{size[1]}) {problem}; crop or pad the image, or remove the row"
        )
    return None


def scan_split(path: str | Path, open_media: bool = True) -> SplitScan:
    """Read every row of a split, returning the usable rows and one ``Reject`` per unusable row."""
    split_dir, source = resolve_split(path)
    items = _read_items(source)
    scan = SplitScan(split_dir=split_dir, source_file=source, total=len(items))
    seen_ids: dict[str, int] = {}

    for index, (item, parse_error) in enumerate(items):
        pid = item.get("problem_id") if isinstance(item, dict) else None
        if isinstance(pid, (dict, list)):  # keep reports JSON-friendly and hashable
            pid = None

        def reject(reason: str, detail: str) -> None:
            scan.rejects.append(Reject(index=index, problem_id=pid, reason=reason, detail=f"row {index}: {detail}"))

        if parse_error is not None:
            reject(BAD_JSON, parse_error)
            continue
        problem = _check_structure(item)
        if problem:
            reject(*problem)
            continue
        options, detail = _check_options(item["options"])
        if options is None:
            reject(BAD_OPTIONS, detail)
            continue
        letters = option_letters(options)
        answer = _answer_letter(item["solution"])
        if answer not in letters:
            reject(
                BAD_SOLUTION,
                f"field 'solution' {item['solution']!r} names {answer!r}, not one of the option letters "
                f"{', '.join(letters)}; fix the solution or the options",
            )
            continue
        # 17 and "17" are the same item to anyone reading a report or an eval file.
        key = str(pid)
        if key in seen_ids:
            reject(
                DUPLICATE_ID,
                f"field 'problem_id' {pid!r} already used by row {seen_ids[key]}; give the row a unique id or remove it",
            )
            continue
        seen_ids[key] = index

        image_rel, audio_rel = item["path"]["image"], item["path"]["audio"]
        image_path, reason, detail = _resolve_media(split_dir, image_rel, "image")
        if image_path is None:
            reject(reason, detail)
            continue
        audio_path, reason, detail = _resolve_media(split_dir, audio_rel, "audio")
        if audio_path is None:
            reject(reason, detail)
            continue
        problem = _check_media_files(split_dir, image_rel, image_path, audio_rel, audio_path, open_media)
        if problem:
            reject(*problem)
            continue

        scan.rows.append(
            Row(
                problem_id=pid,
                problem=item["problem"],
                options=options,
                answer=answer,
                solution=item["solution"],
                image_path=image_path,
                audio_path=audio_path,
                data_source=item.get("data_source"),
                index=index,
                task_type=item.get("task_type"),
                audio_type=item.get("audio_type"),
            )
        )
    return scan


def enforce_bad_fraction(scan: SplitScan, max_bad_fraction: float, what: str) -> None:
    """Refuse a split with no usable row, or with more rejected rows than the recipe allows."""
    counts = ", ".join(f"{reason}: {n}" for reason, n in scan.counts_by_reason().items()) or "none"
    fix = f"run `echoink-lite data check {scan.split_dir} --report bad.jsonl` to list them"
    if not scan.rows:
        raise DataError(
            f"{what} ({scan.source_file}) has no usable rows out of {scan.total} "
            f"(rejected by reason: {counts}); {fix} and fix the data"
        )
    if scan.bad_fraction > max_bad_fraction:
        raise DataError(
            f"{what} ({scan.source_file}): {len(scan.rejects)} of {scan.total} rows rejected "
            f"({scan.bad_fraction:.1%} > data.max_bad_fraction {max_bad_fraction:.1%}; by reason: {counts}); "
            f"{fix}, then fix the rows or raise data.max_bad_fraction"
        )


# --------------------------------------------------------------------------------------------
# Media loading (the caps above: 16 kHz mono, first 10 s; at most 256*28*28 pixels)
# --------------------------------------------------------------------------------------------


def load_audio(
    path: str | Path, max_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS, sampling_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """Float32 mono samples at ``sampling_rate``, cut to the first ``max_seconds`` (None: whole file).

    soundfile + soxr rather than librosa: same samples, milliseconds instead of a ~18 s numba warm-up.
    """
    native_rate = sf.info(str(path)).samplerate
    # Read only what survives the cut: a 10-minute file costs the same as a 10-second one.
    frames = -1 if max_seconds is None else int(max_seconds * native_rate)
    samples, native_rate = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1, dtype=np.float32)
    if native_rate != sampling_rate:
        mono = soxr.resample(mono, native_rate, sampling_rate)
    if max_seconds is not None:
        mono = mono[: int(max_seconds * sampling_rate)]  # resampling may add a sample
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


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_pixels: int = DEFAULT_MIN_PIXELS) -> Image.Image:
    """RGB image whose pixel count is brought within [min_pixels, max_pixels], aspect ratio kept.

    The Qwen processor also snaps sizes to multiples of 28; capping here first bounds memory and
    the number of visual tokens (256*28*28 pixels -> at most 256 tokens).
    """
    with Image.open(path) as img:
        img.load()
        if 0 in img.size:  # Pillow's own readers refuse such files; a plugin's may not
            raise EmptyImageError(f"decodes to an empty image ({img.size[0]}x{img.size[1]} pixels)")
        rgb = _to_rgb(img)
    size = capped_image_size(rgb.width, rgb.height, max_pixels, min_pixels)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.BICUBIC)
    return rgb


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


# --------------------------------------------------------------------------------------------
# `echoink-lite data check PATH [--report FILE]`
# --------------------------------------------------------------------------------------------


def write_reject_report(rejects: Iterable[Reject], path: str | Path) -> Path:
    """JSON Lines, one reject per line: problem_id, reason, detail, index. Written whole (a temporary file and a
    rename), and only over a report of its own (`safe_output`): never over a dataset file."""
    from .safe_output import REJECT_REPORT, write_output

    text = "".join(json.dumps(reject.to_json(), ensure_ascii=False) + "\n" for reject in rejects)
    return write_output(path, text, REJECT_REPORT, "--report")


# Exit codes of `data check` (also in its --help).
CHECK_OK, CHECK_BAD_ROWS, CHECK_IO_ERROR = 0, 1, 2


def _report_write_problem(report: Path) -> str | None:
    """Why the report file cannot be written, or None. Checked before the (long) decode of every row,
    without creating anything yet: a folder, an unwritable place, or a file that is not an earlier report."""
    from .safe_output import REJECT_REPORT, OutputError, check_output_file

    try:
        check_output_file(report, REJECT_REPORT, "--report")
    except OutputError as err:
        return str(err)
    return None


def check_command(path: str | Path, report: str | Path | None = None, console=None) -> int:
    """Check a split end to end: every row, then a full decode of its media with the limits of the
    processor and model. Returns 0 if every row is usable, 1 if some rows (or the whole list file) are
    unusable, 2 if the check itself could not run: the path does not exist or cannot be read, or the
    report cannot be written. Errors are one line naming the path.

    A list file that cannot be parsed at all returns 1 (no report is written then: there are no rows to list).
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    console = console or Console()

    def error(message: str) -> None:
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)

    report = Path(report).expanduser() if report is not None else None
    problem = _report_write_problem(report) if report is not None else None
    if report is not None and report.resolve() == Path(path).expanduser().resolve():
        problem = f"--report {report} is the data being checked; pass another path, e.g. bad_rows.jsonl"
    if problem:
        error(problem)
        return CHECK_IO_ERROR
    try:
        scan = scan_split(path, open_media=True)
    except SplitReadError as err:
        error(str(err))
        return CHECK_IO_ERROR
    except DataError as err:
        error(str(err))
        return CHECK_BAD_ROWS

    # Headers can look fine while the data is truncated: decode everything once, with the limits.
    usable: list[Row] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("decoding media", total=len(scan.rows))
        for row in scan.rows:
            try:
                load_example(row)
                usable.append(row)
            except MediaError as err:
                scan.rejects.append(Reject(row.index, row.problem_id, err.reason, err.detail))
            progress.advance(task)
    scan.rows = usable
    scan.rejects.sort(key=lambda r: r.index)

    console.print(f"data check: {escape(str(scan.source_file))}", highlight=False)
    table = Table()
    table.add_column("")
    table.add_column("rows", justify="right")
    table.add_row("read", str(scan.total))
    table.add_row("usable", str(len(scan.rows)))
    table.add_row("rejected", str(len(scan.rejects)))
    for reason, n in scan.counts_by_reason().items():
        table.add_row(f"  {reason}", str(n))
    console.print(table)

    if report is not None:
        from .safe_output import OutputError

        try:
            written = write_reject_report(scan.rejects, report)
        except OutputError as err:
            error(str(err))
            return CHECK_IO_ERROR
        console.print(f"reject report: {written} ({len(scan.rejects)} lines)")

    shown = 5
    for reject in scan.rejects[:shown]:
        # escape(): details quote user data, which may contain [brackets] rich would read as markup.
        pid = escape(repr(reject.problem_id))
        console.print(f"[red]{reject.reason}[/] problem_id={pid}: {escape(reject.detail)}", highlight=False)
    if len(scan.rejects) > shown:
        more = f"; see {report}" if report is not None else "; pass --report FILE to list them all"
        console.print(f"... and {len(scan.rejects) - shown} more{more}")
    if not scan.rejects:
        console.print("[green]all rows usable[/]")
    return CHECK_OK if not scan.rejects else CHECK_BAD_ROWS
