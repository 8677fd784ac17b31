"""A tiny synthetic audio-visual data set in the exact AVQA-R1-6K layout.

Why: the real data set lives on the Hugging Face Hub, which tests and offline machines cannot reach,
and a tiny model needs a task it can learn in minutes on a CPU. Each item needs BOTH modalities:
the image is a noisy, mostly red or mostly blue patch, the audio a low (~300 Hz) or high (~1200 Hz)
tone, and the answer is one of four fixed options ("A. red low" ... "D. blue high"). Swapping one
item's audio or image for another's then shows whether a model really uses that modality.

The options are always in the same order: with per-item shuffled options a tiny model learned the
perception but not to find the matching option (22-32% validation accuracy after up to 12 minutes of
training; measured on this project's 2-core CPU machine with the tiny thinker of ``echoink_lite.tiny``
while the kit was designed).

``echoink-lite data synth OUT [--train N --valid M --seed S]`` writes ``OUT/train`` and ``OUT/valid``.
Output is deterministic for a seed: same seed, byte-identical JSON and media.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

SYNTH_QUESTION = "What colour is the picture and is the sound low or high?"
SYNTH_OPTIONS = ("A. red low", "B. red high", "C. blue low", "D. blue high")
SYNTH_DATA_SOURCE = "echoink-lite-synth"
# AVQA-R1-6K rows carry a question category (task_type) and a sound category (audio_type), which the
# evaluation breaks accuracy down by; the synthetic rows carry both so that path is exercised: one kind of
# question, and the sound's pitch as its category.
SYNTH_TASK_TYPE = "colour and pitch"

# letter -> (colour, pitch), read off the option text so the two cannot disagree.
SYNTH_CLASSES = {option[0]: tuple(option[3:].split()) for option in SYNTH_OPTIONS}

_TONE_HZ = {"low": 300.0, "high": 1200.0}
_COLOUR_RGB = {"red": (200.0, 40.0, 40.0), "blue": (40.0, 40.0, 200.0)}


def synth_target(answer_letter: str) -> str:
    """The ideal completion for a letter, e.g. "<think>red low</think><answer>A</answer>"."""
    colour, pitch = SYNTH_CLASSES[answer_letter]
    return f"<think>{colour} {pitch}</think><answer>{answer_letter}</answer>"


# The most items per split: far above AVQA-R1-6K (4,490 train, 1,911 valid), and a bound on what a typo such as
# --train 100000000 would write (two media files per item) before anyone notices.
MAX_ITEMS = 100_000


def _split_rng(seed: int, split: str) -> np.random.Generator:
    # Mix the split name into the seed so train and valid never share media for the same --seed.
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])


def _make_image(rng: np.random.Generator, colour: str, size: int) -> Image.Image:
    base = np.array(_COLOUR_RGB[colour]) * rng.uniform(0.7, 1.2)  # brightness varies per item
    pixels = base + rng.normal(0.0, 40.0, size=(size, size, 3))
    # A fifth of the pixels are random colours, so the colour is a majority, not every pixel.
    speckle = rng.random((size, size)) < 0.2
    pixels[speckle] = rng.uniform(0.0, 255.0, size=(int(speckle.sum()), 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _make_audio(rng: np.random.Generator, pitch: str, seconds: float, sampling_rate: int) -> np.ndarray:
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    frequency = _TONE_HZ[pitch] * rng.uniform(0.9, 1.1)
    amplitude = rng.uniform(0.2, 0.8)
    tone = amplitude * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
    noisy = tone + rng.normal(0.0, 0.02, size=t.shape)
    return np.clip(noisy, -1.0, 1.0).astype(np.float32)


def write_synthetic_split(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int,
    image_size: int = 56,
    audio_seconds: float = 1.0,
    sampling_rate: int = 16000,
) -> Path:
    """Write ``out_dir/split/{audios,images,omni_rl_format_<split>.json}``; return the split folder."""
    if n < 1:
        raise ValueError(f"a synthetic split needs at least 1 item, got n={n}")
    split_dir = Path(out_dir) / split
    (split_dir / "audios").mkdir(parents=True, exist_ok=True)
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = _split_rng(seed, split)

    # Balanced: each letter n//4 times (the first n%4 letters once more), in a seeded order.
    letters = [SYNTH_OPTIONS[i % len(SYNTH_OPTIONS)][0] for i in range(n)]
    letters = [letters[i] for i in rng.permutation(n)]

    items = []
    for i, letter in enumerate(letters):
        colour, pitch = SYNTH_CLASSES[letter]
        image_rel, audio_rel = f"images/sample_{i}.png", f"audios/sample_{i}.wav"
        _make_image(rng, colour, image_size).save(split_dir / image_rel, format="PNG")
        audio = _make_audio(rng, pitch, audio_seconds, sampling_rate)
        sf.write(split_dir / audio_rel, audio, sampling_rate, subtype="PCM_16")
        items.append(
            {
                "problem_id": i,
                "problem": SYNTH_QUESTION,
                "data_type": "image_audio",
                "problem_type": "multiple choice",
                "options": list(SYNTH_OPTIONS),
                "solution": f"<answer>{letter}</answer>",
                "path": {"image": image_rel, "audio": audio_rel},
                "data_source": SYNTH_DATA_SOURCE,
                "task_type": SYNTH_TASK_TYPE,
                "audio_type": f"{pitch} tone",
            }
        )
    # The list file goes last: an interrupted run never leaves a JSON pointing at missing media.
    list_file = split_dir / f"omni_rl_format_{split}.json"
    list_file.write_text(json.dumps(items, indent=2) + "\n", encoding="utf-8")
    return split_dir


def synth_foreign_files(out: Path) -> list[str]:
    """Files under `out` that `data synth` did not write. Its own output is recognised by its content: a
    `train` or `valid` split whose list file holds only this generator's items, and the media named after
    them, so a set written by any version of the kit may be replaced and nothing else is."""
    own_lists: dict[str, bool] = {}

    def split_is_synth(split: str) -> bool:
        if split not in own_lists:
            try:
                items = json.loads((out / split / f"omni_rl_format_{split}.json").read_text(encoding="utf-8"))
                own_lists[split] = isinstance(items, list) and all(
                    isinstance(i, dict) and i.get("data_source") == SYNTH_DATA_SOURCE for i in items)
            except (OSError, ValueError, UnicodeDecodeError, RecursionError):
                own_lists[split] = False
        return own_lists[split]

    media = re.compile(r"^(audios/sample_\d+\.wav|images/sample_\d+\.png)$")
    foreign = []
    for path in sorted(out.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(out).as_posix()
        split, _, rest = rel.partition("/")
        ours = (split in ("train", "valid") and not path.is_symlink() and split_is_synth(split)
                and (rest == f"omni_rl_format_{split}.json" or media.match(rest)))
        if not ours:
            foreign.append(rel)
    return foreign


def write_synth_set(out: str | Path, train: int, valid: int, seed: int) -> list[Path]:
    """Write OUT/train and OUT/valid whole: into a hidden sibling folder swapped in at the end, over nothing
    but an earlier synthetic set (`synth_foreign_files`). OutputError (one line) otherwise, or on a failed write."""
    from .safe_output import OutputError, replacing_folder

    out = Path(out)
    try:
        with replacing_folder(out, "data synth", "data synth OUT", foreign=synth_foreign_files, mark=False) as tmp:
            for split, n in (("train", train), ("valid", valid)):
                write_synthetic_split(tmp, split, n, seed)
    except OSError as err:
        raise OutputError(f"cannot write data synth OUT {out}: {err.strerror or err} ({err.filename or out}); an earlier "
                          "set there is unchanged. Fix: free space or pass a folder you can write to.") from None
    return [out / "train", out / "valid"]


def synth_command(out: str | Path, train: int = 256, valid: int = 128, seed: int = 0, console=None) -> int:
    """``echoink-lite data synth OUT``: write the train and valid splits and say where they are (0), or say in one
    line why not (2): OUT is a file or holds files the command did not write, or the write failed."""
    from rich.console import Console
    from rich.markup import escape

    from .flag_ranges import FlagRangeError, check_flag
    from .safe_output import OutputError

    errors = console or Console(stderr=True)  # an error goes to stderr, what was written to stdout
    console = console or Console()
    if not (1 <= train <= MAX_ITEMS and 1 <= valid <= MAX_ITEMS):
        errors.print(f"[bold red]error:[/] --train and --valid must be from 1 to {MAX_ITEMS:,} (got {train:,} and "
                      f"{valid:,}); AVQA-R1-6K has 4,490 and 1,911. Fix: pass counts in that range.", highlight=False)
        return 2
    try:
        check_flag("data_seed", seed)
    except FlagRangeError as err:
        errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    try:
        split_dirs = write_synth_set(out, train, valid, seed)
    except OutputError as err:
        errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    for split_dir, n in zip(split_dirs, (train, valid)):
        console.print(f"wrote {n} {split_dir.name} items to {escape(str(split_dir))}", highlight=False)
    return 0
