"""Checks before step 1: the longest prompts fit the cap, and the recipe fits the GPU.

A crash or an out-of-memory error late in a run costs hours; both checks cost seconds. Rows that cannot be
read or encoded are not judged here: the training loop skips, counts and replaces them when it meets them.
"""

from __future__ import annotations

from .data import Row, RowEncodeError
from .prompting import PromptTooLongError, encode_row
from .recipe import Recipe


def preflight_longest_prompts(rows: list[Row], processor, recipe: Recipe, k: int = 8) -> int:
    """Encode the rows likely to give the longest prompts (longest audio, largest image, longest text) and
    raise PromptTooLongError, naming the row, if one exceeds `generation.max_prompt_tokens`."""
    import soundfile as sf
    from PIL import Image

    def audio_seconds(r: Row) -> float:
        try:
            info = sf.info(str(r.audio_path))
            return min(info.frames / info.samplerate, recipe.data.max_audio_seconds)
        except Exception:
            return 0.0

    def pixels(r: Row) -> int:
        try:
            with Image.open(r.image_path) as im:
                return min(im.size[0] * im.size[1], recipe.data.max_pixels)
        except Exception:
            return 0

    picks: dict[int, Row] = {}
    for key in (audio_seconds, pixels, lambda r: len(r.prompt_text)):
        for r in sorted(rows, key=key, reverse=True)[:k]:
            picks[r.index] = r
    longest = 0
    for r in picks.values():
        try:
            enc = encode_row(processor, r, max_audio_seconds=recipe.data.max_audio_seconds,
                             max_pixels=recipe.data.max_pixels, max_prompt_tokens=recipe.generation.max_prompt_tokens)
        except PromptTooLongError:
            raise
        except RowEncodeError:
            continue  # skipped, counted and replaced when the training loop reaches the row
        longest = max(longest, enc.length)
    return longest


def check_memory_fits(recipe: Recipe, device, force: bool, console, error_type: type[Exception]) -> None:
    """Refuse a recipe that the planner says cannot fit the detected GPU, unless forced."""
    if device.type != "cuda":
        return
    from .plan import check_recipe_fits_gpu

    ok, message = check_recipe_fits_gpu(recipe, device)
    if not ok:
        if force:
            console.print(f"[yellow]planner: {message} (continuing because --force)[/]")
        else:
            raise error_type(f"{message}\nPass --force to try anyway.")
