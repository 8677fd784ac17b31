"""GRPO on audio + image prompts with QLoRA: the training recipe, read top to bottom.

`train` = setup (data, resume checks, model, optimizer, rollout engine) -> a loop of `grpo_step` -> save.
One optimizer step (the paper's algorithm: EchoInk-R1, built on R1-V's GRPO trainer):
  1. prompts: `prompts_per_step` rows in the saved data order (each process takes every world_size-th one);
     the frozen audio and vision towers run once per prompt (`thinker_forward.encode_prompts`);
  2. rollout: `group_size` completions per prompt, sampled by the rollout engine (rollout.py: one prefill
     per prompt, static KV cache, sampling on the device, CUDA graph where it works);
  3. rewards (accuracy + format by default) and group advantages (r - mean) / (std + eps);
  4. loss pass (loss.py, loss_pass.py): per micro-batch of one group's completions, the prompt runs once and
     the completions attend to its keys/values; policy log-probs with LoRA on, reference log-probs with the
     adapters disabled (beta > 0 only); loss = -(exp(logp - logp.detach()) * A) + beta * k3-KL, averaged per
     sequence then over the step; backward;
  5. gradients all-reduced over processes, clipped, AdamW + scheduler step. One update per rollout, so no
     ratio clipping is needed (the ratio is exactly 1 in value; its gradient is the policy gradient).

Beyond the paper, with TRL 1.16's names (grpo_options.py, loss_variants.py): other loss types and
sequence-level ratios (GSPO); advantages scaled by the batch's std or not at all; truncated completions
masked; `num_iterations` (mu) > 1 updates per step over the same completions, clipped against the rollout
policy's log-probs. A step is then one rollout and its mu updates: the data order and the number of steps are
those of mu = 1, the optimizer makes steps x mu updates and the learning-rate schedule runs over the updates
(TRL counts each update as a step: its max_steps and warmup_steps are ours x mu). Micro-batches whose
advantages are all 0 skip the loss pass when that leaves the update the same (beta = 0; loss_pass.py).

Why not TRL's GRPOTrainer: stock TRL 1.16 drops the audio from the loss forward (its loss pass re-processes
the prompts with images only), and the kit also needs atomic checkpoints on a timer, a resume that refuses
changed recipes, non-finite step skipping, OOM reports that name the rows, prefix sharing in the loss and its
own rollout engine. Those touch most of GRPOTrainer's internals, which change between minor releases, so the
kit owns this loop and tests it directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoints as ckpt
from . import run_folder
from .console import make_console, print_plan, print_step, warn_on_metrics
from .data import Row, RowEncodeError, enforce_bad_fraction, scan_split
from .distributed import Dist, setup_dist
from .grpo_options import skips_zero_advantage
from .loss_pass import backward_pass, pass_metrics, pass_sums, plan_micro_batches, rollout_logps
from .loss_variants import LossSpec, advantages, step_normaliser, truncated
from .metrics import MetricsWriter, plot_run
from .modeling import add_lora, load_processor, load_thinker_from_recipe, multimodal_token_ids, torch_dtype
from .preflight import check_memory_fits, host_memory_problem, preflight_longest_prompts
from .progress import live_display, phase_progress
from .prompting import Encoded, PromptTooLongError, encode_row
from .recipe import Recipe
from .resume import load_training_state, resume_point, resume_requested
from .rewards import compute_rewards, resolve_rewards
from .rollout import RolloutEngine, SamplingParams
from .row_skips import SkipBudget, no_prompt_left, nonfinite_rows_note
from .thinker_forward import disable_hf_checkpointing, encode_prompts


class TrainingError(RuntimeError):
    """A run that had to stop; the message says where and which knobs to turn. Checkpoints are kept."""


class RowsSkippedError(TrainingError):
    """Too many rows of the run could not be loaded, or a step has no prompt left (row_skips.py)."""


# ---------------------------------------------------------------------------------------------------
# Data order: one seeded permutation per epoch, cut into steps; saved in every checkpoint
# ---------------------------------------------------------------------------------------------------
def data_schedule(n_rows: int, prompts_per_step: int, total_steps: int, seed: int) -> list[list[int]]:
    """Row indices of each step. Epoch e is permutation(seed + e), cut into steps of `prompts_per_step`. Its
    last step holds the prompts left over, filled up with the epoch's first prompts, as the original's data
    loader does: 4,490 prompts on 8 processes give 561 full steps and a 562nd of 2 new prompts plus the
    epoch's first 6 again (HF Trainer's dataloader sharded by accelerate, whose `even_batches`, on by default,
    cycles back to the first indices: accelerate/data_loader.py, BatchSamplerShard._iter_with_no_split)."""
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < total_steps:
        perm = np.random.default_rng(seed + epoch).permutation(n_rows).tolist()
        for s in range(0, n_rows, prompts_per_step):
            step = perm[s: s + prompts_per_step]
            while len(step) < prompts_per_step:
                step += perm[: prompts_per_step - len(step)]
            steps.append(step)
        epoch += 1
    return steps[:total_steps]


def rows_fingerprint(rows: list[Row]) -> str:
    ids = json.dumps([[str(r.problem_id), r.answer] for r in rows])
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    adapter_dir: Path | None
    last_metrics: dict[str, Any]
    skipped_rows: int
    model: Any = None  # the trained PeftModel (for notebooks and tests)


@dataclass
class Run:
    """Everything a step needs, built once by `train`."""

    recipe: Recipe
    dst: Dist
    rows: list[Row]
    schedule: list[list[int]]
    processor: Any
    model: Any
    engine: RolloutEngine
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    rewards: list
    float_dtype: torch.dtype
    console: Any
    spec: LossSpec
    counters: dict[str, Any] = field(default_factory=dict)
    skip_budget: SkipBudget | None = None  # when skipped rows stop the run (row_skips.py)


def train(recipe: Recipe, resume: str | None = None, console=None, force: bool = False, overwrite: bool = False) -> TrainResult:
    """Run GRPO for a validated recipe. Safe to call again with resume="auto" after any interruption.
    A folder holding an earlier run is refused unless resuming it, or with `overwrite` (moves it aside); so is
    one on the data or the model, or one another `train` holds (`run_folder`: locked for the whole run)."""
    console = make_console(console)
    dst = setup_dist()
    run_dir = Path(recipe.checkpoint.output_dir)
    resuming = resume_requested(resume)
    run_folder.check_run_dir(run_dir, resuming, overwrite)  # every process; reads only
    run_folder.check_apart_from_inputs(recipe)
    run_folder.check_own_run_files(run_dir, recipe.to_yaml())

    def note(message: str) -> None:  # run folder and checkpoint warnings, printed once
        if dst.main:
            console.print(f"warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)

    lock, error = None, None
    if dst.main:  # one lock per run: rank 0 takes it, every process stops if it cannot
        try:
            lock = run_folder.acquire_run_lock(run_dir, note)
        except ckpt.CheckpointError as err:
            error = err
    if not dst.all_ok(error is None):
        raise error or TrainingError(f"rank 0 could not lock the run folder {run_dir}; its message says why")
    try:
        return _train_locked(recipe, resume, console, force, overwrite, dst, note, lock)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(recipe: Recipe, resume: str | None, console, force: bool, overwrite: bool, dst: Dist, note,
                  lock) -> TrainResult:
    run_dir = Path(recipe.checkpoint.output_dir)
    resuming = resume_requested(resume)

    # -- setup: data (bad rows counted, never silently skipped) and the resume point ------------------
    scan = scan_split(recipe.data.train, open_media=True)
    enforce_bad_fraction(scan, recipe.data.max_bad_fraction, "training split")
    rows = scan.rows[: recipe.data.limit_train_rows] if recipe.data.limit_train_rows else scan.rows
    derived = recipe.derived(len(rows), world_size=dst.world)
    total_steps = derived["total_steps"]
    fingerprint = rows_fingerprint(rows)
    resume_from, state = resume_point(run_dir, resume, recipe, fingerprint, dst.world, warn=note, rank=dst.rank)
    start_step = state.get("step", 0)
    schedule = _saved_schedule(state, recipe) or data_schedule(len(rows), recipe.grpo.prompts_per_step, total_steps,
                                                                recipe.schedule.seed)
    if dst.main:
        print_plan(console, recipe, derived, run_dir, start_step, len(scan.rejects), scan.total,
                   engine=_engine_label(recipe, dst))
    check_memory_fits(recipe, dst.device, force, console, TrainingError)
    processor = load_processor(recipe.model.name_or_path, recipe.model.revision, max_pixels=recipe.data.max_pixels)
    try:
        longest = preflight_longest_prompts(rows, processor, recipe)
    except PromptTooLongError as err:
        raise TrainingError(f"preflight, before step 1: {err}") from None
    if dst.main:
        console.print(f"preflight: longest prompt {longest} tokens (cap generation.max_prompt_tokens="
                      f"{recipe.generation.max_prompt_tokens})")
    memory_problem = host_memory_problem(recipe, dst.device, prompt_tokens=longest or None)  # CPU only
    if memory_problem and force:
        note(f"{memory_problem} (continuing because --force)")
    if not dst.all_ok(memory_problem is None or force):
        raise TrainingError(f"{memory_problem or 'another process has too little host memory'}; --force tries anyway")

    # -- the first writes, after every check passed (with --overwrite, the earlier run moves aside) ----
    error = None
    if dst.main:
        try:
            run_folder.prepare_run_dir(run_dir, resuming, overwrite, resume_step=start_step if resume_from else None,
                                       recipe_text=recipe.to_yaml(), note=note, lock=lock)
        except ckpt.CheckpointError as err:
            error = err
    if not dst.all_ok(error is None):
        raise error or TrainingError(f"rank 0 could not prepare the run folder {run_dir}; its message says why")

    # -- model: 4-bit thinker, LoRA on the language model only; optimizer; rollout engine ---------------
    run = _build_run(recipe, dst, rows, schedule, total_steps, processor, console)
    run.counters = dict(state.get("counters") or {})
    for key in ("skipped_rows", "nonfinite_steps", "nonfinite_in_a_row", "warned_no_signal", "zero_reward_steps"):
        run.counters.setdefault(key, 0)
    run.counters.setdefault("bad_rows", [])
    run.counters.setdefault("skip_reasons", {})
    run.counters.setdefault("nonfinite_rows", [])
    run.skip_budget = SkipBudget.for_run(scan, rows, recipe.data.max_bad_fraction)
    if resume_from is not None:
        load_training_state(resume_from, run.model, run.optimizer, run.scheduler, dst.device, dst.rank)
        if dst.main:
            console.print(f"[green]resumed from {resume_from} at step {start_step}/{total_steps}[/]")
    else:
        torch.manual_seed(recipe.schedule.seed + 1000 * dst.rank)  # sampling streams differ per process
    dst.barrier()

    # -- the loop ---------------------------------------------------------------------------------------
    writer = MetricsWriter(run_dir, recipe.logging.report_to, recipe.logging.run_name, start_step,
                           recipe.model_dump(mode="json"), note=note) if dst.main else None
    saver = ckpt.Saver(run_dir, dst, run.model, run.optimizer, run.scheduler, recipe.checkpoint, total_steps, start_step,
                       state_fn=lambda: {"data_schedule": run.schedule, "recipe_math": recipe.math_dict(),
                                         "recipe_hash": recipe.math_hash(), "data_fingerprint": fingerprint,
                                         "counters": run.counters})
    # A live bar in a terminal; elsewhere the step lines (with their ETA) are the progress.
    bar = recipe.logging.progress and dst.main and live_display(console)
    step, last_metrics = start_step, {}
    try:
        with phase_progress("GRPO", total_steps, console, start=start_step, enabled=bar, live=True) as advance:
            while step < total_steps:
                metrics = _guarded_step(run, step, saver)
                step += 1
                metrics["step"] = step
                last_metrics = metrics
                advance(1, note=f"reward {metrics['reward']:.2f}")
                if dst.main:
                    writer.log(metrics)
                    print_step(console, metrics, total_steps, advance.eta_s())
                    warn_on_metrics(console, metrics, run.counters)
                if run.counters["nonfinite_in_a_row"] >= recipe.grpo.max_nonfinite_steps:
                    saver.save(step)
                    raise TrainingError(
                        f"{run.counters['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient (last at "
                        f"step {step}). The weights of the last finite step are saved. Fix: lower schedule.learning_rate, "
                        "use model.dtype bfloat16 instead of float16, or lower schedule.max_grad_norm; then --resume auto."
                        + nonfinite_rows_note(run.counters["nonfinite_rows"])
                    )
                saver.maybe_save(step)
    finally:
        if writer:
            writer.close()

    # -- save the adapter and the curves ----------------------------------------------------------------
    adapter_dir = None
    if dst.main:
        adapter_dir = run_dir / "adapter"
        try:
            run.model.save_pretrained(adapter_dir, safe_serialization=True)
        except OSError as err:
            raise ckpt.SaveError(ckpt.write_failure_message(err, adapter_dir, ckpt.latest_checkpoint(run_dir))) from None
        try:
            console.print(f"curves: {plot_run(run_dir)}")
        except FileNotFoundError:
            pass
        except ValueError as err:  # a refused curves.png or a bad metrics value: the adapter is saved regardless
            console.print(f"warning: curves not drawn: {err}", style="yellow", markup=False, highlight=False)
        console.print(f"[bold green]done[/]: {step} steps, adapter in {adapter_dir}")
    return TrainResult(run_dir, step, adapter_dir, last_metrics, run.counters["skipped_rows"], run.model)


def grpo_step(run: Run, step: int) -> dict[str, Any]:
    """One optimizer step: prompts -> rollout -> rewards -> advantages -> loss -> update. Returns metrics."""
    recipe, dst, model, g = run.recipe, run.dst, run.model, run.recipe.grpo
    t0 = time.time()
    if dst.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dst.device)

    # 1. prompts: this step's rows (a row that fails to load or encode is replaced), towers once per prompt
    rows, encoded = step_prompts(run, step)
    prompts = encode_prompts(model, encoded, dst.device, run.float_dtype)

    # 2. rollout
    roll = run.engine.generate(prompts, g.group_size) if prompts else None
    comps = roll.completions if roll else []
    for note in roll.notices if roll else []:
        run.console.print(f"[yellow]{note}[/]")

    # 3. rewards and advantages
    texts = [run.processor.tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in comps]
    slot_rows = [r for r in rows for _ in range(g.group_size)]
    columns = dict(solution=[r.solution for r in slot_rows], answer=[r.answer for r in slot_rows],
                   options=[list(r.options) for r in slot_rows], problem_id=[r.problem_id for r in slot_rows],
                   problem=[r.problem for r in slot_rows])
    total_r, per_name = compute_rewards(run.rewards, texts, **columns) if texts else ([], {n: [] for n, _, _ in run.rewards})
    rewards = torch.tensor(total_r, dtype=torch.float32)
    adv, std = _advantages(run, rewards)
    lengths = torch.tensor([c.numel() for c in comps], dtype=torch.float32)
    masked = (truncated(comps, run.engine.params.eos_id) if g.mask_truncated_completions
              else torch.zeros(len(comps), dtype=torch.bool))  # completions that get no loss

    # 4. loss pass (loss_pass.py): micro-batches of one group each; those whose advantages are all 0 are skipped
    # when that leaves the update unchanged (beta = 0) or when asked. The normaliser is the step's, over all
    # processes (loss_variants.step_normaliser), so the gradients summed over micro-batches and processes are the
    # step's gradient.
    t_loss = time.time()
    mbs = plan_micro_batches(prompts, comps, adv, ~masked, g.group_size, g.micro_batch_size,
                             run.processor.tokenizer.pad_token_id, dst.device, skips_zero_advantage(g))
    active_tokens = float(sum(int(mb.mask.sum()) for mb in mbs))
    counts = dst.sum_(torch.tensor([float(len(comps)), active_tokens, float(len(mbs))], dtype=torch.float64)).tolist()
    normaliser = step_normaliser(run.spec, *counts)
    if g.num_iterations > 1:  # the rollout policy's log-probs, once, for the clipped ratio of every update
        rollout_logps(model, prompts, mbs, recipe.generation.temperature, g.logprob_chunk_tokens, g.beta)

    # 5. update(s): backward over the step, all-reduce, clip, step; mu times over the same completions
    updates = []
    for _ in range(g.num_iterations):
        run.optimizer.zero_grad(set_to_none=True)
        passed = backward_pass(model, prompts, mbs, run.spec, normaliser, recipe.generation.temperature,
                               g.logprob_chunk_tokens, recipe.model.gradient_checkpointing)
        updates.append((_update(run, passed.loss), passed))
    _count_nonfinite(run, any(u["skipped_step"] for u, _ in updates), rows)
    t_loss = time.time() - t_loss

    # metrics summed over processes
    names = list(per_name)
    local = torch.tensor(
        [sum(per_name[n]) for n in names]
        + [float(rewards.sum()), float(len(comps)), float((std < 1e-8).sum()) if len(std) else 0.0, float(len(std)),
           float(lengths.sum()), float(roll.tokens if roll else 0), roll.seconds if roll else 0.0]
        + pass_sums(mbs, len(prompts), [p for _, p in updates], masked),
        dtype=torch.float64,
    )
    tot = dst.sum_(local).tolist()
    k = len(names)
    n = max(1.0, tot[k + 1])
    metrics: dict[str, Any] = {f"reward/{nm}": tot[i] / n for i, nm in enumerate(names)}
    metrics.update(
        reward=tot[k] / n,
        accuracy=metrics.get("reward/accuracy"),
        format_rate=metrics.get("reward/format"),
        zero_std_fraction=tot[k + 2] / max(1.0, tot[k + 3]),  # groups whose completions all got the same reward
        completion_length=tot[k + 4] / n,
        **_update_metrics(updates),
        rollout_tokens_per_s=tot[k + 5] / max(1e-9, tot[k + 6] / dst.world),  # tokens over mean rollout time
        step_time_s=time.time() - t0,
        rollout_time_s=roll.seconds if roll else 0.0,
        train_time_s=t_loss,
        rollout_path=roll.path if roll else None,
        skipped_rows=run.counters["skipped_rows"],
        **pass_metrics(tot[k + 7:], run.counters, g),  # kl, the skipped groups and tokens, clipping
    )
    metrics.update(_peak_memory(dst.device))
    if recipe.logging.log_completions_every and (step + 1) % recipe.logging.log_completions_every == 0 and texts:
        metrics["sample_completion"] = texts[0][:500]
    return metrics


# ---------------------------------------------------------------------------------------------------
# Step parts
# ---------------------------------------------------------------------------------------------------
def step_prompts(run: Run, step: int) -> tuple[list[Row], list[Encoded]]:
    """This process's rows of `step`, loaded and encoded. A row that fails (unreadable or unencodable media,
    a prompt over the cap) is skipped with a one-line warning, counted, remembered, and replaced by the next
    usable row of the data order, so every step keeps its number of prompts. All processes decide the same
    replacements, then each takes every world_size-th prompt."""
    recipe, dst = run.recipe, run.dst
    wanted = run.schedule[step]
    later = [i for s in run.schedule[step + 1:] + run.schedule[:step] for i in s]  # replacements, in data order
    bad = set(run.counters["bad_rows"])
    chosen: list[tuple[Row, Encoded]] = []
    seen: set[int] = set()
    for i in wanted + later:
        if len(chosen) == len(wanted):
            break
        if i in seen or i in bad:
            continue
        seen.add(i)
        row = run.rows[i]
        try:
            chosen.append((row, encode_row(run.processor, row, max_audio_seconds=recipe.data.max_audio_seconds,
                                           max_pixels=recipe.data.max_pixels,
                                           max_prompt_tokens=recipe.generation.max_prompt_tokens)))
        except RowEncodeError as err:
            bad.add(i)
            run.counters["bad_rows"].append(i)
            run.counters["skipped_rows"] += 1
            reasons = run.counters.setdefault("skip_reasons", {})
            reasons[err.reason] = reasons.get(err.reason, 0) + 1
            if dst.main:
                run.console.print(f"step {step + 1}: skipped ({err.reason}), replaced by the next row of the data "
                                  f"order: {err}", style="yellow", highlight=False, markup=False)
            problem = run.skip_budget and run.skip_budget.problem(run.counters["skipped_rows"], reasons)
            if problem:  # all processes skip the same rows, so all stop here together
                raise RowsSkippedError(f"step {step + 1}: {problem}")
    if not chosen:
        raise RowsSkippedError(f"step {step + 1}: " + no_prompt_left(run.counters["skipped_rows"],
                                                                      run.counters.get("skip_reasons", {}), recipe.data.train))
    mine = chosen[dst.rank:: dst.world]
    return [r for r, _ in mine], [e for _, e in mine]


def _update(run: Run, loss_sum: float) -> dict[str, Any]:
    """All-reduce gradients, clip, optimizer and scheduler step; a non-finite step is skipped."""
    dst, params = run.dst, run.params
    for p in params:
        if p.grad is None:  # no micro-batch ran here (all skipped): a zero gradient, as their backward would give
            p.grad = torch.zeros_like(p)
        if dst.world > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    has_grad = any(p.grad is not None for p in params)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, run.recipe.schedule.max_grad_norm)) if has_grad else 0.0
    loss = float(dst.sum_(torch.tensor([loss_sum], dtype=torch.float64)).item())
    finite = math.isfinite(grad_norm) and math.isfinite(loss)
    lr = run.scheduler.get_last_lr()[0]
    if finite:
        run.optimizer.step()
    else:
        run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped step steps the scheduler without the optimizer, on purpose
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()  # the schedule follows steps taken, skipped or not, so resume stays aligned
    return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped_step": not finite}


def _count_nonfinite(run: Run, nonfinite: bool, rows: list[Row]) -> None:
    """A step with a non-finite update counts once towards grpo.max_nonfinite_steps (in a row); the rows of the
    current streak of such steps are kept for the stop message (row_skips.nonfinite_rows_note)."""
    if nonfinite:
        run.counters["nonfinite_steps"] += 1
        run.counters["nonfinite_in_a_row"] += 1
        run.counters.setdefault("nonfinite_rows", []).append([str(r.problem_id) for r in rows])
    else:
        run.counters["nonfinite_in_a_row"] = 0
        run.counters["nonfinite_rows"] = []


def _update_metrics(updates: list) -> dict[str, Any]:
    """loss, grad_norm, lr and skipped_step of the step; with several updates per rollout, the mean loss and
    gradient norm, the first update's learning rate, and each update's own values under `updates`."""
    first = updates[0][0]
    if len(updates) == 1:
        return first
    losses, norms = [u["loss"] for u, _ in updates], [u["grad_norm"] for u, _ in updates]
    return {"loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms), "lr": first["lr"],
            "skipped_step": any(u["skipped_step"] for u, _ in updates),
            "updates": [{"loss": u["loss"], "grad_norm": u["grad_norm"], "lr": u["lr"]} for u, _ in updates]}


def _advantages(run: Run, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per-group std) with grpo.scale_rewards; 'batch' takes the std of every process's rewards."""
    g = run.recipe.grpo
    if not len(rewards):
        return rewards, rewards
    everyone = run.dst.gather_(rewards) if g.scale_rewards == "batch" else None
    return advantages(rewards, g.group_size, g.scale_rewards, g.advantage_eps, everyone)


def _peak_memory(device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _guarded_step(run: Run, step: int, saver: ckpt.Saver) -> dict[str, Any]:
    """`grpo_step`, turning a GPU out-of-memory into a TrainingError that keeps the finished steps."""
    rng_at_step_start = ckpt.rng_state()
    try:
        return grpo_step(run, step)
    except RowsSkippedError as err:
        ckpt.set_rng_state(rng_at_step_start)
        saver.save_if_new(step)
        kept = f"The {step} finished steps are saved." if step else "No step had finished; nothing was saved."
        raise RowsSkippedError(f"{err}. {kept}") from None
    except torch.cuda.OutOfMemoryError as err:
        run.optimizer.zero_grad(set_to_none=True)
        ckpt.set_rng_state(rng_at_step_start)
        saver.save_if_new(step)
        g, gen = run.recipe.grpo, run.recipe.generation
        ids = [str(run.rows[i].problem_id) for i in run.schedule[step]]
        raise TrainingError(
            f"GPU out of memory at step {step + 1} (rows {', '.join(ids)}): {str(err).splitlines()[0]}\n"
            "Finished steps are saved. Lower one of these and resume with --resume auto: "
            f"grpo.rollout_batch_size={g.rollout_batch_size} (rollout), grpo.micro_batch_size={g.micro_batch_size} "
            f"(loss pass), grpo.logprob_chunk_tokens={g.logprob_chunk_tokens}. These change the math and need a new "
            f"run: grpo.group_size={g.group_size}, generation.max_completion_tokens={gen.max_completion_tokens}. "
            "`echoink-lite plan RECIPE` estimates the effect."
        ) from None


# ---------------------------------------------------------------------------------------------------
# Setup, resume and saving
# ---------------------------------------------------------------------------------------------------
def _engine_label(recipe: Recipe, dst: Dist) -> str:
    if dst.device.type != "cuda":
        return "eager decode (CPU)"
    return "CUDA-graph decode" if recipe.generation.cuda_graph else "eager decode (generation.cuda_graph=false)"


def _build_run(recipe: Recipe, dst: Dist, rows, schedule, total_steps: int, processor, console) -> Run:
    torch.manual_seed(recipe.schedule.seed)
    tok = processor.tokenizer
    base = load_thinker_from_recipe(recipe, device=dst.device)
    # The loss pass checkpoints each decoder layer itself (loss.py); transformers' checkpointing stays off.
    model = add_lora(base, recipe.lora, gradient_checkpointing=False, seed=recipe.schedule.seed)
    disable_hf_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    s = recipe.schedule
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.weight_decay)
    from transformers import get_scheduler

    # With num_iterations (mu) > 1 each step makes mu optimizer updates; the schedule runs over the updates (as
    # TRL's, whose steps are updates), warm-up included: schedule.warmup_steps and the step count stay in steps.
    mu = recipe.grpo.num_iterations
    scheduler = get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=s.warmup_steps * mu,
                              num_training_steps=total_steps * mu)
    gen = recipe.generation
    sampling = SamplingParams(
        max_new_tokens=gen.max_completion_tokens, eos_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_id=tok.pad_token_id,
        do_sample=True, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
        suppress_ids=tuple(multimodal_token_ids(tok)),
    )
    engine = RolloutEngine(model, sampling, batch_size=recipe.grpo.rollout_batch_size, cuda_graph=gen.cuda_graph)
    return Run(recipe=recipe, dst=dst, rows=rows, schedule=schedule, processor=processor, model=model, engine=engine,
               optimizer=optimizer, scheduler=scheduler, params=params, rewards=resolve_rewards(recipe.grpo.rewards),
               float_dtype=torch_dtype(recipe.model.dtype), console=console, spec=LossSpec.from_recipe(recipe))


def _saved_schedule(state: dict, recipe: Recipe) -> list[list[int]] | None:
    if "data_schedule" in state:
        return state["data_schedule"]
    if "data_order" in state:  # checkpoints written before per-epoch steps: a flat order, full steps
        order, n = state["data_order"], recipe.grpo.prompts_per_step
        return [order[s: s + n] for s in range(0, len(order), n)]
    return None
