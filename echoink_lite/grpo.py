"""GRPO on audio + image prompts with QLoRA: the training recipe, read top to bottom.

`train` = setup (data, resume checks; model, optimizer, rollout engine: run_setup.py) -> a loop of
`grpo_step` -> save.
One optimizer step (the paper's algorithm: EchoInk-R1, built on R1-V's GRPO trainer):
  1. prompts: `prompts_per_step` rows in the saved data order (step_data.py; each process takes every
     world_size-th one); the frozen audio and vision towers run once per prompt (`thinker_forward.encode_prompts`);
  2. rollout: `group_size` completions per prompt, sampled by the rollout engine (rollout.py: one prefill
     per prompt, static KV cache, sampling on the device, CUDA graph where it works);
  3. rewards (accuracy + format by default) and group advantages (r - mean) / (std + eps);
  4. loss pass (loss.py, loss_pass.py): per micro-batch of one group's completions, the prompt runs once and
     the completions attend to its keys/values; policy log-probs with LoRA on, reference log-probs with the
     adapters disabled (beta > 0 only); loss = -(exp(logp - logp.detach()) * A) + beta * k3-KL, averaged per
     sequence then over the step; backward;
  5. gradients all-reduced over processes, clipped, AdamW + scheduler step. One update per rollout, so no
     ratio clipping is needed (the ratio is exactly 1 in value; its gradient is the policy gradient);
  6. metrics of the step, summed over processes (step_metrics.py).

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

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoints as ckpt
from . import run_folder
from .console import make_console, print_plan, print_step, warn_on_metrics
from .data import Row, enforce_bad_fraction, scan_split
from .distributed import Dist, setup_dist
from .grpo_options import skips_zero_advantage
from .loss_pass import backward_pass, plan_micro_batches, rollout_logps
from .loss_variants import advantages, step_normaliser, truncated
from .metrics import MetricsWriter, plot_run
from .modeling import load_processor
from .preflight import check_memory_fits, host_memory_problem, preflight_longest_prompts
from .progress import live_display, phase_progress
from .prompting import PromptTooLongError
from .recipe import Recipe
from .resume import load_training_state, resume_point, resume_requested
from .rewards import compute_rewards
from .row_skips import SkipBudget, nonfinite_rows_note
from .run_setup import Run, build_run, engine_label
from .step_data import data_schedule, rows_fingerprint, saved_schedule, step_prompts
from .state_files import rng_state, set_rng_state
from .step_metrics import step_metrics
from .thinker_forward import encode_prompts
from .training_errors import RowsSkippedError, TrainingError


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
    schedule = saved_schedule(state, recipe) or data_schedule(len(rows), recipe.grpo.prompts_per_step, total_steps,
                                                               recipe.schedule.seed)
    if dst.main:
        print_plan(console, recipe, derived, run_dir, start_step, len(scan.rejects), scan.total,
                   engine=engine_label(recipe, dst))
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

    # -- model: 4-bit thinker, LoRA on the language model only; optimizer; rollout engine (run_setup.py) -
    run = build_run(recipe, dst, rows, schedule, total_steps, processor, console)
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

    # 6. metrics, summed over processes (step_metrics.py)
    return step_metrics(run, step, per_name=per_name, rewards=rewards, std=std, comps=comps, texts=texts, roll=roll,
                        n_prompts=len(prompts), mbs=mbs, updates=updates, masked=masked, t0=t0, t_loss=t_loss)


# ---------------------------------------------------------------------------------------------------
# Step parts
# ---------------------------------------------------------------------------------------------------
def _update(run: Run, loss_sum: float) -> dict[str, Any]:
    """All-reduce gradients, clip, optimizer and scheduler step; a non-finite step is skipped."""
    dst, params = run.dst, run.params
    for p in params:
        if p.grad is None:  # no micro-batch ran here (all skipped): a zero gradient, as their backward would give
            p.grad = torch.zeros_like(p)
        if dst.world > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, run.recipe.schedule.max_grad_norm))
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


def _advantages(run: Run, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per-group std) with grpo.scale_rewards; 'batch' takes the std of every process's rewards."""
    g = run.recipe.grpo
    if not len(rewards):
        return rewards, rewards
    everyone = run.dst.gather_(rewards) if g.scale_rewards == "batch" else None
    return advantages(rewards, g.group_size, g.scale_rewards, g.advantage_eps, everyone)


def _guarded_step(run: Run, step: int, saver: ckpt.Saver) -> dict[str, Any]:
    """`grpo_step`, turning a GPU out-of-memory into a TrainingError that keeps the finished steps."""
    rng_at_step_start = rng_state()
    try:
        return grpo_step(run, step)
    except RowsSkippedError as err:
        set_rng_state(rng_at_step_start)
        saver.save_if_new(step)
        kept = f"The {step} finished steps are saved." if step else "No step had finished; nothing was saved."
        raise RowsSkippedError(f"{err}. {kept}") from None
    except torch.cuda.OutOfMemoryError as err:
        run.optimizer.zero_grad(set_to_none=True)
        set_rng_state(rng_at_step_start)
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

