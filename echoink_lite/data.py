"""Read AVQA-R1-6K style splits and check every row: the rows training and evaluation use, and the rejects.

Why this module exists: training and evaluation both start from a split folder laid out like the
published AVQA-R1-6K data set (``audios/``, ``images/`` and a JSON list ``omni_rl_format_*.json``).
A single bad row (a missing wav, a truncated jpg, a solution that is not one of the options) must
not crash a multi-hour GRPO run at step 400, and must not be silently dropped either. So:

1. ``resolve_split`` finds the JSON file for a folder or file path.
2. ``scan_split`` reads every row and either turns it into a checked ``Row`` or records a
   ``Reject`` with a reason constant and a message that names the file/field and the fix. With
   ``open_media`` it also reads the media files' headers and applies the model's limits (``media``).
3. ``enforce_bad_fraction`` lets the caller refuse a split that is mostly broken.

The reason constants and the errors (``DataError``, ``RowEncodeError``, ``MediaError``) are defined here
for every stage that can reject a row. Decoding lives in ``media`` (files and samples) and
``row_media.load_example`` (a row's media, failures naming the row); ``prompting.encode_row`` adds the
prompt encoding and is what training and evaluation call; ``data_check`` is ``echoink-lite data check``.
The prompt text and the answer tags are the answer protocol's (``answer_protocol``); ``Row.prompt_text``
builds the text the model is asked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf
from PIL import Image

from .answer_protocol import build_prompt_text, extract_answer, option_letters
from .media import SAMPLING_RATE, audio_limit_problem, capped_image_size, image_limit_problem

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
    # Cheap header checks here; ``data check`` (``data_check``) additionally decodes everything.
    try:
        info = sf.info(str(audio))
    except Exception as err:  # soundfile raises several types for unreadable files
        return BAD_AUDIO, (
            f"{audio_rel} under {split_dir} cannot be read as audio ({err});"
            " replace the file or remove the row"
        )
    if info.frames <= 0:
        return EMPTY_AUDIO, f"{audio_rel} under {split_dir} holds no audio samples; replace the file or remove the row"
    # Samples after resampling to 16 kHz, as media.load_audio will give them (exact up to rounding;
    # row_media.load_example checks the decoded samples again).
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
    # With the paper's pixel caps; row_media.load_example checks the image at the caps in use.
    problem = image_limit_problem(*size) or image_limit_problem(*capped_image_size(*size))  # fetch_image's, the processor's
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
