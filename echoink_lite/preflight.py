"""Checks before step 1: the longest prompts fit the cap, and the recipe fits the GPU (or, on a CPU, the
memory the process may still allocate).

A crash or an out-of-memory error late in a run costs hours; both checks cost seconds. Rows that cannot be
read or encoded are not judged here: the training loop skips, counts and replaces them when it meets them.

On a CPU, torch's allocator does not raise an out-of-memory error the run can report: a decode batch too
large for the machine (or for `ulimit -v`, or a container's limit) ends in a traceback from
`DefaultCPUAllocator` at step 1. `host_memory_problem` compares the planner's estimate (memory_estimate.py,
without the GPU-only CUDA context and allocator reserve) with what the process may still allocate, first.
"""

from __future__ import annotations

import resource
from pathlib import Path

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


def available_host_memory() -> tuple[float, str] | None:
    """(bytes this process may still allocate, what sets that limit), or None where it cannot be read.
    The least of: the system's MemAvailable, the address-space limit (`ulimit -v`) less what the process
    maps now, and a cgroup v2 limit (a container's) less what the cgroup uses."""
    limits: list[tuple[float, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append((int(line.split()[1]) * 1024, "the memory the system has available"))
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = 0
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmSize:"):
                    mapped = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        limits.append((max(0, soft - mapped), f"the address-space limit (ulimit -v {soft // 1024}) less the "
                                              f"{mapped / 2**30:.1f} GiB this process maps"))
    try:
        cgroup = Path("/sys/fs/cgroup")
        high = (cgroup / "memory.max").read_text().strip()
        if high != "max":
            used = int((cgroup / "memory.current").read_text())
            limits.append((max(0, int(high) - used), f"the container's memory limit ({int(high) / 2**30:.1f} GiB)"))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def host_memory_problem(recipe: Recipe, device, prompt_tokens: int | None = None) -> str | None:
    """On a CPU, why the recipe's estimated memory (weights, LoRA state and the larger of the rollout and
    loss phases) exceeds what the process may allocate, naming the knobs; None when it fits, on a GPU (the
    planner checks those: `check_memory_fits`), or when either number cannot be had."""
    if device.type != "cpu":
        return None
    available = available_host_memory()
    if available is None:
        return None
    from .memory_estimate import GIB, estimate_memory

    try:
        est = estimate_memory(recipe, 1.0, prompt_tokens=prompt_tokens)
    except Exception:  # the estimate must never stop a run it cannot judge
        return None
    ph = est.phases
    need = (ph["weights"] + ph["lora_state"] + max(ph["rollout"], ph["training"])) * GIB
    if need <= available[0]:
        return None
    g, tk = recipe.grpo, est.tokens
    knobs = [f"grpo.rollout_batch_size={g.rollout_batch_size}", f"grpo.micro_batch_size={g.micro_batch_size}"]
    if ph["training"] > ph["rollout"]:
        knobs.reverse()
    return (f"this recipe needs ~{need / GIB:.1f} GiB of host memory (estimate: weights and LoRA "
            f"{(ph['weights'] + ph['lora_state']):.1f} GiB, rollout {ph['rollout']:.1f} GiB for a decode batch of "
            f"{tk['rollout_batch']} rows x {tk['sequence']:,} tokens, loss pass {ph['training']:.1f} GiB), but only "
            f"{available[0] / GIB:.1f} GiB can be allocated ({available[1]}). Fix: lower {knobs[0]} (or {knobs[1]}; "
            "`echoink-lite plan RECIPE` shows every term), or free memory")
