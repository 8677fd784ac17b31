"""GRPO on audio + image prompts with QLoRA: the training recipe, read top to bottom.

One optimizer step (the paper's algorithm, EchoInk-R1 / R1-V):
  1. take `prompts_per_step` prompts in the saved data order (this process takes every world_size-th one);
  2. rollout: sample `group_size` completions per prompt in eval mode, KV cache on, gradient checkpointing
     off, multimodal marker tokens suppressed, as few `generate` calls as `rollout_batch_size` allows;
  3. rewards (accuracy + format by default) and group advantages (r - mean) / (std + eps);
  4. for each micro-batch: completion-token log-probs of the policy (LoRA on, training mode, checkpointing
     on) from the SAME audio features and pixels as the rollout, computed in chunks of completion
     positions; the reference log-probs are the same model with adapters disabled (beta > 0 only);
     loss = -(exp(logp - logp.detach()) * A) + beta * k3-KL, averaged per sequence then over the batch;
  5. gradients all-reduced over processes, clipped, AdamW + scheduler step. One update per rollout, so
     no ratio clipping is needed (the ratio is exactly 1 in value; its gradient is the policy gradient).

Why not TRL's GRPOTrainer: stock TRL drops the audio from the loss forward (in TRL 1.16,
`GRPOTrainer._get_per_token_logps_and_entropies` takes image inputs but no `input_features`); fixing that
needs overrides of its input preparation and loss inputs, and the kit also needs atomic checkpoints on a
timer, a resume that refuses changed recipes, non-finite step skipping, OOM reports that name the row and
chunked completion-only log-probs. Those touch most of GRPOTrainer's internals, which change from minor
release to minor release. The algorithm itself is ~150 lines, so the kit owns it and tests it directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoints as ckpt
from .data import MediaError, Row, enforce_bad_fraction, load_example, scan_split
from .metrics import MetricsWriter, plot_run
from .modeling import add_lora, default_device, load_processor, load_thinker_from_recipe, multimodal_token_ids, torch_dtype
from .prompting import (
    Encoded, PromptTooLongError, collate, completion_mask, encode_example, generation_kwargs, to_device,
)
from .recipe import Recipe, changed_math_fields
from .rewards import compute_rewards, resolve_rewards


class TrainingError(RuntimeError):
    """A run that had to stop; the message says where and which knobs to turn. Checkpoints are kept."""


# ---------------------------------------------------------------------------------------------------
# Processes: one, or several under torchrun / accelerate launch (data-parallel over prompts)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def setup_dist() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=default_device())
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, device=device)


# ---------------------------------------------------------------------------------------------------
# Data order: a seeded permutation per epoch, saved in every checkpoint
# ---------------------------------------------------------------------------------------------------
def data_order(n_rows: int, total_steps: int, prompts_per_step: int, seed: int) -> list[int]:
    order: list[int] = []
    epoch = 0
    needed = total_steps * prompts_per_step
    while len(order) < needed:
        order += np.random.default_rng(seed + epoch).permutation(n_rows).tolist()
        epoch += 1
    return order


def rows_fingerprint(rows: list[Row]) -> str:
    ids = json.dumps([[str(r.problem_id), r.answer] for r in rows])
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def total_steps_for(recipe: Recipe, n_rows: int) -> int:
    return recipe.derived(n_rows)["total_steps"]


# ---------------------------------------------------------------------------------------------------
# Log-probs of completion tokens only, in chunks (never full-vocabulary logits for the whole batch)
# ---------------------------------------------------------------------------------------------------
def _chunk_logps(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = lm_head(hidden).float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)


def completion_logps(model, batch: dict[str, torch.Tensor], prompt_width: int, completion_ids: torch.Tensor,
                     temperature: float, chunk_tokens: int) -> torch.Tensor:
    """[B, C] log-probs of `completion_ids` given prompt (+ audio features + pixels) and earlier tokens."""
    thinker = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = thinker.model(**batch, use_cache=False).last_hidden_state  # the multimodal thinker body
    n = completion_ids.shape[1]
    hidden = hidden[:, prompt_width - 1: prompt_width - 1 + n]  # position t predicts token t+1
    step = max(1, chunk_tokens)
    parts = []
    for s in range(0, n, step):
        h, tgt = hidden[:, s: s + step], completion_ids[:, s: s + step]
        if torch.is_grad_enabled():
            # Recompute the chunk's logits in backward instead of keeping [B, chunk, vocab] alive.
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logps, thinker.lm_head, h, tgt, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logps(thinker.lm_head, h, tgt, temperature))
    return torch.cat(parts, dim=1)


def grpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
              beta: float, loss_type: str, normaliser: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backward, per-token KL) for one micro-batch; `normaliser` = completions (or tokens) in the step."""
    ratio = torch.exp(logps - logps.detach())  # 1 in value; the gradient is the policy gradient
    per_token = -ratio * advantages.unsqueeze(1)
    kl = torch.zeros_like(logps)
    if beta > 0 and ref_logps is not None:
        log_ratio = (ref_logps - logps).clamp(-10, 10)
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3 estimator, as the paper
        per_token = per_token + beta * kl
    maskf = mask.float()
    if loss_type == "sequence":
        per_seq = (per_token * maskf).sum(1) / maskf.sum(1).clamp(min=1)
        return per_seq.sum() / normaliser, kl
    return (per_token * maskf).sum() / normaliser, kl


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per-group std) for rewards laid out group by group."""
    g = rewards.view(-1, group_size)
    std = g.std(dim=1)  # unbiased, as the original
    adv = (g - g.mean(dim=1, keepdim=True)) / (std.unsqueeze(1) + eps)
    return adv.view(-1), std


# ---------------------------------------------------------------------------------------------------
# Rollout: eval mode, KV cache on, checkpointing off; then training mode restored
# ---------------------------------------------------------------------------------------------------
def _set_checkpointing(model, on: bool) -> None:
    thinker = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(thinker, "_echoink_gc", False):
        return
    if on:
        thinker.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        thinker.gradient_checkpointing_disable()


@torch.no_grad()
def rollout(model, encoded: list[Encoded], group_size: int, rollout_batch: int, gen_kw: dict, pad_id: int,
            eos_id: int, device, float_dtype) -> tuple[list[torch.Tensor], int]:
    """Sample `group_size` completions per prompt; returns trimmed completion ids (EOS kept) and tokens made."""
    was_training = model.training
    model.eval()
    _set_checkpointing(model, False)
    slots = [i for i in range(len(encoded)) for _ in range(group_size)]
    completions: list[torch.Tensor] = []
    made = 0
    try:
        for s in range(0, len(slots), rollout_batch):
            part = [encoded[i] for i in slots[s: s + rollout_batch]]
            batch = to_device(collate(part, 1, pad_id), device, float_dtype)
            out = model.generate(**batch, **gen_kw)
            comp = out[:, batch["input_ids"].shape[1]:].cpu()
            mask = completion_mask(comp, eos_id)
            for ids, m in zip(comp, mask):
                n = int(m.sum())
                completions.append(ids[:n].clone())
                made += n
    finally:
        _set_checkpointing(model, True)
        model.train(was_training)
    return completions, made


def pad_completions(comps: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    width = max(1, max(int(c.numel()) for c in comps))
    out = torch.full((len(comps), width), pad_id, dtype=torch.long)
    for i, c in enumerate(comps):
        out[i, : c.numel()] = c
    return out


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


def _console(console):
    if console is not None:
        return console
    from rich.console import Console

    return Console()


def _print_plan(console, recipe: Recipe, derived: dict, run_dir: Path, start_step: int, n_bad: int, total: int) -> None:
    from rich.table import Table

    t = Table(title="echoink-lite GRPO plan", show_header=False)
    g = recipe.grpo
    rows = [
        ("model", recipe.model.name_or_path + ("  (4-bit NF4, LoRA r=%d)" % recipe.lora.r if recipe.quantization.load_in_4bit else f"  ({recipe.model.dtype}, LoRA r={recipe.lora.r})")),
        ("training rows", f"{derived['train_rows']} usable ({n_bad} rejected of {total})"),
        ("steps", f"{derived['total_steps']} (starting at {start_step}; {derived['steps_per_epoch']} per epoch)"),
        ("prompts per step", str(g.prompts_per_step)),
        ("group size", str(g.group_size)),
        ("completions per step", f"{derived['completions_per_step']} ({derived['completions_per_process']} per process x {derived['world_size']})"),
        ("micro-batches per step", f"{derived['micro_batches_per_step']} of {min(g.micro_batch_size, derived['completions_per_process'])}"),
        ("generate calls per step", str(derived["generate_calls_per_step"])),
        ("completion tokens budget", f"{recipe.generation.max_completion_tokens} per completion, {derived['rollout_tokens_budget']} per step"),
        ("KL beta / loss", f"{g.beta} / {g.loss_type}"),
        ("learning rate", f"{recipe.schedule.learning_rate} {recipe.schedule.lr_scheduler}"),
        ("outputs", str(run_dir)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def train(recipe: Recipe, resume: str | None = None, console=None, force: bool = False) -> TrainResult:
    """Run GRPO for a validated recipe. Safe to call again with resume="auto" after any interruption."""
    console = _console(console)
    dst = setup_dist()
    run_dir = Path(recipe.checkpoint.output_dir)
    if dst.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    float_dtype = torch_dtype(recipe.model.dtype)

    # -- data: the same checks as `data check`; bad rows are counted, never silently skipped ----------
    scan = scan_split(recipe.data.train, open_media=True)
    enforce_bad_fraction(scan, recipe.data.max_bad_fraction, "training split")
    rows = scan.rows[: recipe.data.limit_train_rows] if recipe.data.limit_train_rows else scan.rows
    derived = recipe.derived(len(rows), world_size=dst.world)
    total_steps = derived["total_steps"]
    fingerprint = rows_fingerprint(rows)

    # -- resume: refuse a changed recipe or changed data -----------------------------------------------
    resume_from = ckpt.resolve_resume(resume, run_dir)
    start_step = 0
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = ckpt.load_state(resume_from)
        changed = changed_math_fields(state["recipe_math"], recipe)
        if changed:
            raise ckpt.ResumeError(
                f"cannot resume {resume_from}: the recipe changed in fields that change the math:\n  "
                + "\n  ".join(changed)
                + "\nFix: restore those values, or start a new run with another checkpoint.output_dir."
            )
        if state["data_fingerprint"] != fingerprint:
            raise ckpt.ResumeError(
                f"cannot resume {resume_from}: the usable training rows differ from the checkpoint's "
                "(different file, edits, or different rows rejected). Fix: point data.train at the same data."
            )
        if state.get("world_size", 1) != dst.world:
            raise ckpt.ResumeError(f"checkpoint was written by {state.get('world_size')} processes; resume with the same number")
        start_step = state["step"]
        order = state["data_order"]
    else:
        order = data_order(len(rows), total_steps, recipe.grpo.prompts_per_step, recipe.schedule.seed)

    if dst.main:
        _print_plan(console, recipe, derived, run_dir, start_step, len(scan.rejects), scan.total)
    _preflight_memory(recipe, dst, force, console)

    # -- model: 4-bit thinker, LoRA on the language model only, processor -------------------------------
    torch.manual_seed(recipe.schedule.seed)
    processor = load_processor(recipe.model.name_or_path, recipe.model.revision, max_pixels=recipe.data.max_pixels)
    tok = processor.tokenizer
    base = load_thinker_from_recipe(recipe, device=dst.device)
    if recipe.model.gradient_checkpointing:
        base._echoink_gc = True
    model = add_lora(base, recipe.lora, gradient_checkpointing=recipe.model.gradient_checkpointing, seed=recipe.schedule.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    s = recipe.schedule
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=total_steps)
    if resume_from is not None:
        _load_training_state(resume_from, model, optimizer, scheduler, dst)
        if dst.main:
            console.print(f"[green]resumed from {resume_from} at step {start_step}/{total_steps}[/]")
    else:
        torch.manual_seed(recipe.schedule.seed + 1000 * dst.rank)  # sampling streams differ per process
    dst.barrier()

    try:
        longest = preflight_longest_prompts(rows, processor, recipe)
    except PromptTooLongError as err:
        raise TrainingError(f"preflight, before step 1: {err}") from None
    if dst.main:
        console.print(f"preflight: longest prompt {longest} tokens (cap generation.max_prompt_tokens="
                      f"{recipe.generation.max_prompt_tokens})")
    rewards = resolve_rewards(recipe.grpo.rewards)
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.pad_token_id
    gcfg = recipe.generation
    gen_kw = generation_kwargs(
        tok, do_sample=True, max_new_tokens=gcfg.max_completion_tokens, temperature=gcfg.temperature,
        top_p=gcfg.top_p, top_k=gcfg.top_k, suppress_ids=multimodal_token_ids(tok),
    )
    writer = MetricsWriter(run_dir, recipe.logging.report_to, recipe.logging.run_name, start_step,
                           recipe.model_dump(mode="json")) if dst.main else None
    counters = dict(state.get("counters", {"skipped_rows": 0, "nonfinite_steps": 0, "nonfinite_in_a_row": 0,
                                            "warned_no_signal": 0, "zero_reward_steps": 0}))
    last_save_time = time.time()
    last_saved_step = start_step
    last_metrics: dict[str, Any] = {}

    def save(step: int) -> None:
        nonlocal last_save_time, last_saved_step
        tmp = ckpt.tmp_path_for(run_dir, step)
        if dst.main:
            ckpt.begin_save(run_dir, step)
        dst.barrier()
        ckpt.save_rank_rng(tmp, dst.rank)
        dst.barrier()
        if dst.main:
            st = {"total_steps": total_steps, "data_order": order, "recipe_math": recipe.math_dict(),
                  "recipe_hash": recipe.math_hash(), "data_fingerprint": fingerprint, "counters": counters,
                  "world_size": dst.world}
            ckpt.finish_save(run_dir, tmp, step, model, optimizer, scheduler, st, recipe.checkpoint.keep_last)
        dst.barrier()
        last_save_time, last_saved_step = time.time(), step

    progress = _progress(console, recipe.logging.progress and dst.main)
    task = progress.add_task("GRPO", total=total_steps, completed=start_step) if progress else None
    step = start_step
    try:
        with progress if progress else nullcontext():
            while step < total_steps:
                rng_at_step_start = ckpt.rng_state()
                try:
                    metrics = _train_step(step, recipe, model, processor, rows, order, optimizer, scheduler, params,
                                          rewards, gen_kw, eos_id, pad_id, float_dtype, dst, counters)
                except torch.cuda.OutOfMemoryError as err:
                    optimizer.zero_grad(set_to_none=True)
                    ckpt.set_rng_state(rng_at_step_start)
                    if step > last_saved_step:
                        save(step)
                    ids = [str(rows[i].problem_id) for i in order[step * recipe.grpo.prompts_per_step:(step + 1) * recipe.grpo.prompts_per_step]]
                    raise TrainingError(
                        f"GPU out of memory at step {step + 1} (rows {', '.join(ids)}): {str(err).splitlines()[0]}\n"
                        "Finished steps are saved; resume with --resume auto after turning one of these knobs: "
                        f"grpo.micro_batch_size={recipe.grpo.micro_batch_size} (lower), grpo.rollout_batch_size="
                        f"{recipe.grpo.rollout_batch_size} (lower), grpo.group_size={recipe.grpo.group_size} (lower), "
                        f"generation.max_completion_tokens={gcfg.max_completion_tokens} (lower), "
                        f"grpo.logprob_chunk_tokens={recipe.grpo.logprob_chunk_tokens} (lower). "
                        "`echoink-lite plan RECIPE` estimates the effect."
                    ) from None
                except PromptTooLongError as err:
                    ckpt.set_rng_state(rng_at_step_start)
                    if step > last_saved_step:
                        save(step)
                    raise TrainingError(f"at step {step + 1}: {err}\nFinished steps are saved; fix and resume with --resume auto.") from None
                step += 1
                metrics["step"] = step
                last_metrics = metrics
                if dst.main:
                    writer.log(metrics)
                    _print_step(console, metrics, total_steps, recipe)
                    _warn(console, metrics, counters)
                    if progress:
                        progress.update(task, completed=step)
                if counters["nonfinite_in_a_row"] >= recipe.grpo.max_nonfinite_steps:
                    save(step)
                    raise TrainingError(
                        f"{counters['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient (last at step {step}). "
                        "The weights of the last finite step are saved. Fix: lower schedule.learning_rate, "
                        "use model.dtype bfloat16 instead of float16, or lower schedule.max_grad_norm; then --resume auto."
                    )
                due_time = (time.time() - last_save_time) / 60 >= recipe.checkpoint.save_every_minutes
                due_time = bool(dst.sum_(torch.tensor([float(due_time)])).item() > 0)  # all ranks agree
                if step % recipe.checkpoint.save_every_steps == 0 or due_time or step == total_steps:
                    save(step)
    finally:
        if writer:
            writer.close()

    adapter_dir = None
    if dst.main:
        adapter_dir = run_dir / "adapter"
        model.save_pretrained(adapter_dir, safe_serialization=True)
        try:
            png = plot_run(run_dir)
            console.print(f"curves: {png}")
        except FileNotFoundError:
            pass
        console.print(f"[bold green]done[/]: {step} steps, adapter in {adapter_dir}")
    return TrainResult(run_dir, step, adapter_dir, last_metrics, counters["skipped_rows"], model)


def preflight_longest_prompts(rows: list[Row], processor, recipe: Recipe, k: int = 8) -> int:
    """Encode the rows likely to give the longest prompts (longest audio, largest image, longest text) and
    fail before step 1, naming the row, if one exceeds the cap: an OOM or a crash late in the run costs more."""
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
            ex = load_example(r, recipe.data.max_audio_seconds, recipe.data.max_pixels)
        except MediaError:
            continue  # counted when the row is reached
        longest = max(longest, encode_example(processor, ex, recipe.generation.max_prompt_tokens).length)
    return longest


def _load_training_state(path: Path, model, optimizer, scheduler, dst: Dist) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"), device=str(dst.device))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ckpt.ResumeError(f"{path}: adapter has unexpected keys {result.unexpected_keys[:3]}; was it written by another recipe?")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dst.device, weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    ckpt.load_rank_rng(path, dst.rank)


def _preflight_memory(recipe: Recipe, dst: Dist, force: bool, console) -> None:
    """Refuse a recipe that cannot fit the detected GPU (the planner), unless forced."""
    if dst.device.type != "cuda":
        return
    from .plan import check_recipe_fits_gpu

    ok, message = check_recipe_fits_gpu(recipe, dst.device)
    if not ok:
        if force:
            console.print(f"[yellow]planner: {message} (continuing because --force)[/]")
        else:
            raise TrainingError(f"{message}\nPass --force to try anyway.")


def _train_step(step, recipe, model, processor, rows, order, optimizer, scheduler, params, rewards, gen_kw,
                eos_id, pad_id, float_dtype, dst: Dist, counters) -> dict[str, Any]:
    g = recipe.grpo
    t0 = time.time()
    if dst.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dst.device)
    step_rows = [rows[i] for i in order[step * g.prompts_per_step:(step + 1) * g.prompts_per_step]]
    my_rows = step_rows[dst.rank:: dst.world]

    # 1. prompts: media decoded and encoded once per prompt; bad media is skipped and counted
    encoded, kept_rows = [], []
    for row in my_rows:
        try:
            ex = load_example(row, recipe.data.max_audio_seconds, recipe.data.max_pixels)
        except MediaError:
            counters["skipped_rows"] += 1
            continue
        encoded.append(encode_example(processor, ex, recipe.generation.max_prompt_tokens))
        kept_rows.append(row)

    # 2. rollout
    t_roll = time.time()
    comps, made = rollout(model, encoded, g.group_size, g.rollout_batch_size, gen_kw, pad_id, eos_id, dst.device, float_dtype) if encoded else ([], 0)
    t_roll = time.time() - t_roll

    # 3. rewards and advantages
    texts = [processor.tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in comps]
    slot_rows = [r for r in kept_rows for _ in range(g.group_size)]
    columns = dict(solution=[r.solution for r in slot_rows], answer=[r.answer for r in slot_rows],
                   options=[list(r.options) for r in slot_rows], problem_id=[r.problem_id for r in slot_rows],
                   problem=[r.problem for r in slot_rows])
    total_r, per_name = compute_rewards(rewards, texts, **columns) if texts else ([], {n: [] for n, _, _ in rewards})
    r = torch.tensor(total_r, dtype=torch.float32)
    adv, std = group_advantages(r, g.group_size, g.advantage_eps) if len(r) else (r, r)
    lengths = torch.tensor([c.numel() for c in comps], dtype=torch.float32)

    # normaliser over all processes, so the summed gradients equal the single-process mean
    n_local = float(len(comps)) if g.loss_type == "sequence" else float(lengths.sum())
    normaliser = max(1.0, float(dst.sum_(torch.tensor([n_local])).item()))

    # 4. policy (and reference) log-probs per micro-batch, backward
    t_fb = time.time()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, kl_sum, kl_tokens = 0.0, 0.0, 0.0
    micro = g.micro_batch_size
    slot_enc = [encoded[i // g.group_size] for i in range(len(comps))]
    for s in range(0, len(comps), micro):
        idx = list(range(s, min(s + micro, len(comps))))
        comp_ids = pad_completions([comps[i] for i in idx], pad_id)
        mask = pad_completions([torch.ones_like(comps[i]) for i in idx], 0)
        batch = to_device(collate([slot_enc[i] for i in idx], 1, pad_id, completions=list(comp_ids)), dst.device, float_dtype)
        prompt_width = batch["input_ids"].shape[1] - comp_ids.shape[1]
        comp_ids, mask = comp_ids.to(dst.device), mask.to(dst.device)
        ref = None
        if g.beta > 0:
            with torch.no_grad(), model.disable_adapter():
                ref = completion_logps(model, batch, prompt_width, comp_ids, recipe.generation.temperature, g.logprob_chunk_tokens)
        logps = completion_logps(model, batch, prompt_width, comp_ids, recipe.generation.temperature, g.logprob_chunk_tokens)
        loss, kl = grpo_loss(logps, ref, adv[idx].to(dst.device), mask, g.beta, g.loss_type, normaliser)
        loss.backward()
        loss_sum += float(loss.detach())
        kl_sum += float((kl.detach() * mask).sum())
        kl_tokens += float(mask.sum())

    # 5. all-reduce, clip, step (skip a non-finite step)
    if dst.world > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, recipe.schedule.max_grad_norm)) if any(p.grad is not None for p in params) else 0.0
    loss_t = dst.sum_(torch.tensor([loss_sum]))
    finite = math.isfinite(grad_norm) and bool(torch.isfinite(loss_t).all())
    lr = scheduler.get_last_lr()[0]
    if finite:
        optimizer.step()
        counters["nonfinite_in_a_row"] = 0
    else:
        optimizer.zero_grad(set_to_none=True)
        counters["nonfinite_steps"] += 1
        counters["nonfinite_in_a_row"] += 1
    with warnings.catch_warnings():  # a skipped step steps the scheduler without the optimizer, on purpose
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()  # the schedule follows steps taken, skipped or not, so resume stays aligned
    t_fb = time.time() - t_fb

    # metrics summed over processes
    names = list(per_name)
    local = torch.tensor(
        [sum(per_name[n]) for n in names]
        + [float(r.sum()), float(len(comps)), float((std < 1e-8).sum()) if len(std) else 0.0, float(len(std)),
           float(lengths.sum()), kl_sum, kl_tokens, float(made), t_roll],
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
        zero_std_fraction=tot[k + 2] / max(1.0, tot[k + 3]),
        completion_length=tot[k + 4] / n,
        kl=tot[k + 5] / max(1.0, tot[k + 6]) if recipe.grpo.beta > 0 else None,
        loss=float(loss_t.item()),
        grad_norm=grad_norm,
        lr=lr,
        rollout_tokens_per_s=tot[k + 7] / max(1e-9, tot[k + 8] / dst.world),  # tokens over mean rollout time
        step_time_s=time.time() - t0,
        rollout_time_s=t_roll,
        train_time_s=t_fb,
        skipped_step=not finite,
        skipped_rows=counters["skipped_rows"],
    )
    metrics.update(_peak_memory(dst.device))
    if recipe.logging.log_completions_every and (step + 1) % recipe.logging.log_completions_every == 0 and texts:
        metrics["sample_completion"] = texts[0][:500]
    return metrics


def _peak_memory(device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _progress(console, enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def _print_step(console, m: dict, total: int, recipe: Recipe) -> None:
    mem = m.get("peak_gpu_allocated_gb", m.get("peak_rss_gb"))
    extra = " [red]non-finite: skipped[/]" if m.get("skipped_step") else ""
    console.print(
        f"step {m['step']:>4}/{total} reward {_fmt(m['reward'])} acc {_fmt(m['accuracy'])} fmt {_fmt(m['format_rate'])} "
        f"no-signal {_fmt(m['zero_std_fraction'], '.2f')} len {_fmt(m['completion_length'], '.1f')} kl {_fmt(m['kl'], '.4f')} "
        f"gnorm {_fmt(m['grad_norm'], '.3f')} lr {m['lr']:.2e} {m['rollout_tokens_per_s']:.0f} tok/s "
        f"{m['step_time_s']:.1f}s mem {_fmt(mem, '.2f')}GB{extra}"
    )
    if m.get("sample_completion"):
        console.print(f"  sample: {m['sample_completion']!r}")


def _warn(console, m: dict, counters: dict) -> None:
    if m["zero_std_fraction"] >= 0.75:
        counters["warned_no_signal"] += 1
        if counters["warned_no_signal"] in (3, 10, 30):
            console.print(f"[yellow]warning: {m['zero_std_fraction']:.0%} of groups had identical rewards for several steps "
                          "(no learning signal). Raise grpo.group_size or generation.temperature, or use harder/easier data.[/]")
    else:
        counters["warned_no_signal"] = 0
    if (m["reward"] or 0.0) == 0.0:
        counters["zero_reward_steps"] += 1
        if counters["zero_reward_steps"] in (5, 20):
            console.print("[yellow]warning: every reward has been zero for several steps: check the prompt format, "
                          "the solutions (`echoink-lite data check`), and generation.max_completion_tokens.[/]")
    else:
        counters["zero_reward_steps"] = 0
