#!/usr/bin/env python
"""Measure a recipe's GRPO steps on the full-size Qwen2.5-Omni-7B thinker: peak GPU memory and time per phase.

    python benchmarks/bench_grpo.py --recipe recipes/paper_24gb.yaml [--steps 3] [--cap-gb 24] \
        [--out benchmarks/results/NAME.json] [--baselines] [--tiny]

What runs (nothing is downloaded):
1. A thinker with the real Qwen2.5-Omni-7B sizes (the config bundled in echoink_lite/configs/), random
   weights, built in bf16 directly on the GPU and saved once as safetensors to --model-dir (17.9 GB of disk;
   reused by later runs), with a tokenizer whose special tokens sit at the real ids (151643-151656) and a
   vocabulary of 152,064 rows like the real checkpoint. It is then loaded back through the kit's own
   loader (`modeling.load_thinker_from_recipe`), so the 4-bit path is exactly training's.
2. A synthetic data set in the AVQA-R1-6K layout with real-size inputs: 10 s of audio (250 audio tokens),
   a 448x448 image (256 visual tokens), and a question padded to the paper's prompt length (200 text
   tokens; ~706 prompt tokens in all, the planner's assumption and the paper's 700-750).
3. `echoink_lite.grpo.train` on that model and data for --steps optimizer steps, every completion forced to
   generation.max_completion_tokens: a random model never stops early on purpose, and to make sure of it
   the benchmark adds `<|im_end|>` to the tokens the rollout suppresses (it swaps
   `echoink_lite.run_setup.multimodal_token_ids` for the duration of the run; the kit's code is unchanged).
   The recipe is the file's, except: fewer prompts per step by default (--prompts-per-step auto: the fewest
   prompts that still fill one rollout batch and one micro-batch, so the memory peak is the recipe's; step
   times are scaled back up to the recipe's prompts per step for the projection), no validation, and the
   paths of the synthetic model, data and run folder.
4. With --baselines: the same workload through stock TRL `GRPOTrainer` (images only: stock TRL cannot carry
   the audio into the loss forward: TRL 1.16's trl/trainer/grpo_trainer.py re-processes the prompts for the
   loss forward with images only, so input_features never reach it) with PEFT LoRA and the same 4-bit weights, and
   the kit with `quantization.load_in_4bit=false` (bf16 LoRA). Ratios against the kit's QLoRA run.

Read from the training loop's metrics.jsonl (one line per step): rollout_time_s, train_time_s, step_time_s,
rollout_tokens_per_s, completion_length, peak_gpu_allocated_gb, peak_gpu_reserved_gb. The optimizer time is
measured here by timing `torch.optim.AdamW.step` (CUDA-synchronised); "log-prob fwd+bwd" is
train_time_s minus it (it includes the reference pass and gradient clipping). The first step is excluded
from time means when there are several (CUDA/cuBLAS warm-up). The CUDA context (memory the driver holds
outside PyTorch's allocator) is measured with `torch.cuda.mem_get_info` after the run; "measured total" =
peak reserved + context, the number the planner (`echoink-lite plan`) estimates.

--cap-gb N limits PyTorch to N GB minus the measured CUDA context (`torch.cuda.set_per_process_memory_fraction`),
which proves an N GB claim on a larger card. --tiny runs the same code on CPU with tiny widths (the real
vocabulary and token ids), 1 s audio, a 56x56 image and short completions: a smoke test, not a measurement.

Costs of a full run: 17.9 GB of disk for the random model (once), ~18 GB of host RAM while it is written and
read back, and about 5-8 minutes on an H100 for the default 3 steps of recipes/paper_24gb.yaml; --baselines
adds two more loads and runs (~+6 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

GIB = 2**30
SCHEMA = "echoink-lite-bench/1"
PAPER_TRAIN_ROWS = 4490
# The special tokens of the real Qwen2.5-Omni tokenizer, at their real ids (added_tokens_decoder in
# Qwen/Qwen2.5-Omni-7B's tokenizer_config.json).
QWEN_OMNI_SPECIAL = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<|AUDIO|>",
    151647: "<|audio_bos|>", 151648: "<|audio_eos|>", 151649: "<|box_end|>", 151650: "<|quad_start|>",
    151651: "<|quad_end|>", 151652: "<|vision_bos|>", 151653: "<|vision_eos|>", 151654: "<|vision_pad|>",
    151655: "<|IMAGE|>", 151656: "<|VIDEO|>",
}
# The question starts short and is grown word by word until the whole prompt has the paper's token length:
# the benchmark tokenizer spends ~2 tokens per English word (the real one ~1.3), so token counts, not words,
# are what the benchmark matches.
BASE_QUESTION = "What is happening?"
PADDING_TEXT = (
    "Look at the scene closely and listen to the whole recording before choosing, because the people, the objects "
    "and the sounds may each suggest a different answer and only one option matches both of them at the same time"
).split()
MODEL_MARKER = "echoink_bench_model.json"


# ---------------------------------------------------------------------------------------------------
# The synthetic full-size model
# ---------------------------------------------------------------------------------------------------
def bench_tokenizer():
    """A byte-level BPE (the kit's offline tiny merges) padded to the real Qwen2.5-Omni id layout: ordinary
    tokens from 0, unreachable filler entries up to 151642, the Omni special tokens at their real ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    from echoink_lite.tiny import OMNI_CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer

    # Merges inside the answer tags too: the tiny BPE already spends ~2 tokens per word of the paper's instruction
    # (the real one ~1.3); with the tags in 5-6 pieces each the fixed prompt text alone would pass the target.
    small = json.loads(build_tiny_tokenizer(merge_tags=True).backend_tokenizer.to_str())["model"]
    ordinary = [t for t, _ in sorted(small["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIAL_TOKENS]
    first_special = min(QWEN_OMNI_SPECIAL)
    vocab = {t: i for i, t in enumerate(ordinary)}
    for i in range(len(vocab), first_special):
        vocab[f"<filler{i}>"] = i  # never produced by the merges; decodes to its own text if sampled
    for i, t in QWEN_OMNI_SPECIAL.items():
        vocab[t] = i
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in small["merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(list(QWEN_OMNI_SPECIAL.values()))
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
        },
    )
    tok.chat_template = OMNI_CHAT_TEMPLATE
    tok.model_max_length = 32768
    for i, t in QWEN_OMNI_SPECIAL.items():
        assert tok.convert_tokens_to_ids(t) == i, (t, tok.convert_tokens_to_ids(t), i)
    return tok


def bench_config(tiny: bool) -> dict[str, Any]:
    """The bundled real thinker config; with `tiny`, the kit's tiny widths but the real vocabulary and ids."""
    from echoink_lite.plan import bundled_thinker_config

    cfg = bundled_thinker_config()
    if tiny:
        from echoink_lite.tiny import TINY_AUDIO, TINY_TEXT, TINY_VISION

        h = TINY_TEXT["hidden_size"]
        cfg["text_config"].update(TINY_TEXT, rope_scaling={"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"})
        cfg["audio_config"].update(TINY_AUDIO, output_dim=h)
        cfg["vision_config"].update(TINY_VISION, out_hidden_size=h, fullatt_block_indexes=[1])
    return cfg


def bench_processor(tokenizer):
    """The Omni processor for the benchmark folder. Where torchvision works (GPU machines) the complete
    `Qwen2_5OmniProcessor` with its video processor is saved, as in a real checkpoint, so that
    `Qwen2_5OmniProcessor.from_pretrained` finds every part; elsewhere the kit's processor without video."""
    from echoink_lite.modeling import torchvision_available
    from echoink_lite.tiny import build_tiny_processor

    fallback = build_tiny_processor(tokenizer)
    if not torchvision_available():
        return fallback
    try:
        from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        return Qwen2_5OmniProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=fallback.image_processor.min_pixels,
                                                  max_pixels=fallback.image_processor.max_pixels),
            video_processor=Qwen2VLVideoProcessor(), feature_extractor=fallback.feature_extractor,
            tokenizer=tokenizer, chat_template=fallback.chat_template,
        )
    except Exception:  # the kit's loader handles the video-less processor too
        return fallback


def build_random_thinker(out: Path, config: dict[str, Any], device: str, dtype: str, console) -> Path:
    """Save a randomly initialised thinker of `config` with the benchmark tokenizer and processor to `out`."""
    import torch
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from echoink_lite.modeling import torch_dtype
    from echoink_lite.tiny import _set_generation_defaults

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = bench_tokenizer()
    processor = bench_processor(tokenizer)
    cfg = Qwen2_5OmniThinkerConfig(**config)
    tdtype = torch_dtype(dtype)
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg, dtype=tdtype)
    _set_generation_defaults(model, tokenizer)
    n = sum(p.numel() for p in model.parameters())
    console.print(f"built a random thinker with {n:,} parameters on {device} in {time.time() - t0:.0f} s; saving to {out}")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
    processor.save_pretrained(tmp)
    (tmp / MODEL_MARKER).write_text(json.dumps({"config": config, "dtype": dtype, "parameters": n}, sort_keys=True))
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    console.print(f"saved in {time.time() - t0:.0f} s")
    return out


def ensure_model(out: Path, config: dict[str, Any], device: str, dtype: str, console) -> Path:
    marker = out / MODEL_MARKER
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("config") == json.loads(json.dumps(config)) and saved.get("dtype") == dtype:
            console.print(f"reusing the random model in {out}")
            return out
    return build_random_thinker(out, config, device, dtype, console)


# ---------------------------------------------------------------------------------------------------
# Real-size synthetic data
# ---------------------------------------------------------------------------------------------------
def write_bench_data(out: Path, n: int, image_size: int, audio_seconds: float, question: str) -> Path:
    from echoink_lite.synth import write_synthetic_split

    split = write_synthetic_split(out, "train", n, seed=0, image_size=image_size, audio_seconds=audio_seconds)
    list_file = split / "omni_rl_format_train.json"
    items = json.loads(list_file.read_text())
    for item in items:
        item["problem"] = question
    list_file.write_text(json.dumps(items, indent=2) + "\n")
    return split


def prompt_length(processor, recipe, split: Path) -> int:
    from echoink_lite.data import scan_split
    from echoink_lite.prompting import encode_example
    from echoink_lite.row_media import load_example

    row = scan_split(split).rows[0]
    return encode_example(processor, load_example(row, recipe.data.max_audio_seconds, recipe.data.max_pixels)).length


def paper_length_question(processor, recipe, split: Path, target: int) -> tuple[str, int]:
    """The question grown word by word until the whole prompt (text + audio + image tokens) reaches `target`."""
    from echoink_lite.answer_protocol import build_prompt_text
    from echoink_lite.data import scan_split
    from echoink_lite.prompting import render_prompt

    row = scan_split(split, open_media=False).rows[0]
    tok = processor.tokenizer

    def text_len(q: str) -> int:
        return len(tok(render_prompt(processor, build_prompt_text(q, row.options))).input_ids)

    expansion = prompt_length(processor, recipe, split) - text_len(row.problem)  # audio + image placeholders
    q, i = BASE_QUESTION, 0
    while text_len(q) + expansion < target and i < 4000:
        q += " " + PADDING_TEXT[i % len(PADDING_TEXT)]
        i += 1
    return q, text_len(q) + expansion


# ---------------------------------------------------------------------------------------------------
# Hooks for the measurement (process-local, undone after each run)
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def force_full_length_completions():
    """Add `<|im_end|>` to the tokens the rollout suppresses, so every completion runs to the budget."""
    import echoink_lite.run_setup as run_setup

    original = run_setup.multimodal_token_ids

    def with_eos(tokenizer):
        return list(original(tokenizer)) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    run_setup.multimodal_token_ids = with_eos
    try:
        yield
    finally:
        run_setup.multimodal_token_ids = original


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def time_optimizer_steps(device: str, sink: list[float]):
    """Time every `torch.optim.AdamW.step` (the kit's optimizer) with CUDA synchronisation."""
    import torch

    cls = torch.optim.AdamW
    own = "step" in cls.__dict__  # else inherited from Adam
    original = cls.step

    def timed(self, *args, **kwargs):
        _sync(device)
        t = time.perf_counter()
        out = original(self, *args, **kwargs)
        _sync(device)
        sink.append(time.perf_counter() - t)
        return out

    timed.echoink_bench_timer = True
    cls.step = timed
    try:
        yield
    finally:
        if own:
            cls.step = original
        else:
            del cls.step


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cuda_context_gb(device: str) -> float | None:
    """Device memory in use by this process outside PyTorch's caching allocator (driver context, kernels)."""
    import torch

    if not device.startswith("cuda"):
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / GIB


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _timed_steps(rows: list[dict]) -> list[dict]:
    return rows[1:] if len(rows) > 1 else rows  # the first step carries CUDA / cuBLAS warm-up


def _is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------------------------------
# The kit's run
# ---------------------------------------------------------------------------------------------------
def run_kit(name: str, recipe, ctx: dict[str, Any], console) -> dict[str, Any]:
    import torch

    from echoink_lite.grpo import TrainingError, train
    from echoink_lite.metrics import read_metrics
    from echoink_lite.plan import estimate_memory

    device = ctx["device"]
    free_memory(device)
    opt_times: list[float] = []
    status, error = "ok", None
    t0 = time.time()
    console.rule(f"[bold]{name}")
    try:
        with force_full_length_completions(), time_optimizer_steps(device, opt_times):
            train(recipe, console=console, force=True, overwrite=True)  # force: measure even where the planner says no; a reused --workdir holds earlier runs
    except torch.cuda.OutOfMemoryError as err:
        status, error = "oom", str(err).splitlines()[0]
    except TrainingError as err:
        status, error = ("oom" if _is_oom(err) else "error"), str(err).splitlines()[0]
    wall = time.time() - t0
    context = cuda_context_gb(device)
    run_dir = Path(recipe.checkpoint.output_dir)
    steps = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    for i, m in enumerate(steps):
        m["optimizer_time_s"] = opt_times[i] if i < len(opt_times) else None
        m["logprob_time_s"] = m["train_time_s"] - m["optimizer_time_s"] if m["optimizer_time_s"] is not None else None
    timed = _timed_steps(steps)
    out: dict[str, Any] = {
        "name": name, "kind": "kit", "status": status, "error": error, "steps": len(steps), "wall_time_s": wall,
        "recipe": recipe.model_dump(mode="json"), "model_config": ctx["model_config_name"],
        "prompt_tokens": ctx["prompt_tokens"], "prompts_per_step": recipe.grpo.prompts_per_step,
        "completion_budget": recipe.generation.max_completion_tokens,
    }
    if steps:
        out.update(
            rollout_time_s=_mean([m["rollout_time_s"] for m in timed]),
            logprob_time_s=_mean([m["logprob_time_s"] for m in timed]),
            optimizer_time_s=_mean([m["optimizer_time_s"] for m in timed]),
            step_time_s=_mean([m["step_time_s"] for m in timed]),
            rollout_tokens_per_s=_mean([m["rollout_tokens_per_s"] for m in timed]),
            completion_length=_mean([m["completion_length"] for m in steps]),
            forced_full_length=all(abs(m["completion_length"] - recipe.generation.max_completion_tokens) < 1e-6 for m in steps),
            rollout_path=steps[-1].get("rollout_path"),
            per_step=steps,
        )
        if device.startswith("cuda"):
            out["peak_gpu_allocated_gb"] = max(m["peak_gpu_allocated_gb"] for m in steps)
            out["peak_gpu_reserved_gb"] = max(m["peak_gpu_reserved_gb"] for m in steps)
            out["cuda_context_gb"] = context
            out["measured_total_gb"] = out["peak_gpu_reserved_gb"] + (context or 0.0)
        else:
            out["peak_rss_gb"] = max(m.get("peak_rss_gb", 0.0) for m in steps)
        _add_projection(out, ctx)
    est = estimate_memory(recipe, ctx["card_memory_gb"] or 24.0, config=ctx["model_config"],
                          prompt_tokens=ctx["prompt_tokens"], suggest=False)
    out["planner_estimate_gb"] = est.total_gb
    out["planner_torch_peak_gb"] = est.torch_peak_gb
    if out.get("measured_total_gb"):
        out["planner_error_pct"] = 100 * (est.total_gb - out["measured_total_gb"]) / out["measured_total_gb"]
    return out


def _add_projection(out: dict[str, Any], ctx: dict[str, Any]) -> None:
    if out.get("step_time_s") is None:
        return
    scale = ctx["recipe_prompts_per_step"] / out["prompts_per_step"]
    out["projected_step_time_s"] = out["step_time_s"] * scale
    out["projected_full_run_steps"] = ctx["full_run_steps"]
    out["projected_full_run_h"] = out["projected_step_time_s"] * ctx["full_run_steps"] / 3600


# ---------------------------------------------------------------------------------------------------
# The peer baseline: stock TRL GRPOTrainer + PEFT + bitsandbytes (images only)
# ---------------------------------------------------------------------------------------------------
def _texts(completions) -> list[str]:
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def trl_accuracy(completions, solution, **_):
    from echoink_lite.rewards import accuracy_reward

    return accuracy_reward(_texts(completions), solution)


def trl_format(completions, **_):
    from echoink_lite.rewards import format_reward

    return format_reward(_texts(completions))


def trl_config_kwargs(recipe, device: str, steps: int, output_dir: str) -> dict[str, Any]:
    """GRPOConfig fields that define the workload; every other field keeps TRL's default (loss_type 'dapo',
    scale_rewards 'group', epsilon 0.2, ...)."""
    g, gen, s = recipe.grpo, recipe.generation, recipe.schedule
    completions = g.prompts_per_step * g.group_size
    micro = min(g.micro_batch_size, completions)
    return dict(
        output_dir=output_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=completions // micro,
        num_generations=g.group_size, max_completion_length=gen.max_completion_tokens, temperature=gen.temperature,
        top_p=gen.top_p, top_k=gen.top_k, beta=g.beta, learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, max_steps=steps, seed=s.seed,
        **_checkpointing_kwarg(recipe.model.gradient_checkpointing), bf16=(recipe.model.dtype == "bfloat16" and device.startswith("cuda")),
        use_cpu=not device.startswith("cuda"), logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )


@contextlib.contextmanager
def trl_internal_deprecations():
    """TRL 1.16 and PEFT call transformers' renamed gradient-checkpointing API inside GRPOTrainer (the peer
    baseline): their notices, not the kit's, so they are silenced for that run only."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)
        yield


def _checkpointing_kwarg(on: bool) -> dict[str, bool]:
    """transformers 5.23 renamed TrainingArguments.gradient_checkpointing to activation_checkpointing."""
    import dataclasses

    from trl import GRPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    return {"activation_checkpointing": on} if "activation_checkpointing" in names else {"gradient_checkpointing": on}


def run_trl(name: str, recipe, ctx: dict[str, Any], console) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from echoink_lite.data import scan_split
    from echoink_lite.media import load_image
    from echoink_lite.modeling import load_processor, load_thinker, lora_target_regex, multimodal_token_ids

    device = ctx["device"]
    free_memory(device)
    console.rule(f"[bold]{name}")
    rows = scan_split(recipe.data.train).rows
    model_dir = recipe.model.name_or_path
    out: dict[str, Any] = {"name": name, "kind": "trl", "status": "ok", "error": None, "modalities": "image + text (no audio)",
                           "prompts_per_step": recipe.grpo.prompts_per_step, "completion_budget": recipe.generation.max_completion_tokens}
    step_times: list[float] = []
    gen_stats = {"time": 0.0, "tokens": 0, "lengths": []}
    t0 = time.time()
    try:
        processor = load_processor(model_dir, max_pixels=recipe.data.max_pixels)
        model = load_thinker(model_dir, dtype=recipe.model.dtype,
                             quantization=recipe.quantization if recipe.quantization.load_in_4bit else None,
                             attn_implementation=recipe.model.attn_implementation, device=device)
        dataset = Dataset.from_list([
            {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.prompt_text}]}],
             "image": load_image(r.image_path, recipe.data.max_pixels), "solution": r.solution}
            for r in rows
        ])
        suppress = multimodal_token_ids(processor.tokenizer) + [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        args = GRPOConfig(**trl_config_kwargs(recipe, device, ctx["steps"], str(Path(ctx["workdir"]) / name)),
                          generation_kwargs={"suppress_tokens": suppress})
        lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                          target_modules=lora_target_regex(recipe.lora.target_modules), task_type="CAUSAL_LM")

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                _sync(device)
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync(device)
                now = time.perf_counter()
                step_times.append(now - self.t)
                self.t = now

        with trl_internal_deprecations():
            trainer = GRPOTrainer(model=model, reward_funcs=[trl_accuracy, trl_format], args=args, train_dataset=dataset,
                                  processing_class=processor, peft_config=lora, callbacks=[StepTimer()])
        generate = trainer.model.generate

        def timed_generate(*a, **kw):
            _sync(device)
            t = time.perf_counter()
            result = generate(*a, **kw)
            _sync(device)
            gen_stats["time"] += time.perf_counter() - t
            new = result.shape[1] - kw["input_ids"].shape[1] if "input_ids" in kw else 0
            gen_stats["tokens"] += result.shape[0] * new
            gen_stats["lengths"].append(new)
            return result

        trainer.model.generate = timed_generate
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with trl_internal_deprecations():
            trainer.train()
        if device.startswith("cuda"):
            out["peak_gpu_allocated_gb"] = torch.cuda.max_memory_allocated() / GIB
            out["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / GIB
            out["cuda_context_gb"] = cuda_context_gb(device)
            out["measured_total_gb"] = out["peak_gpu_reserved_gb"] + (out["cuda_context_gb"] or 0.0)
        else:
            import resource

            out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out["trl_log"] = [h for h in trainer.state.log_history if "loss" in h]
        del trainer, model
    except torch.cuda.OutOfMemoryError as err:
        out.update(status="oom", error=str(err).splitlines()[0])
    except Exception as err:  # the baseline must not take the kit's numbers down with it
        out.update(status="oom" if _is_oom(err) else "error", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    out["wall_time_s"] = time.time() - t0
    out["steps"] = len(step_times)
    if step_times:
        timed = step_times[1:] if len(step_times) > 1 else step_times
        out["step_time_s"] = _mean(timed)
        out["per_step_time_s"] = step_times
        out["rollout_time_s_total"] = gen_stats["time"]
        out["rollout_tokens_per_s"] = gen_stats["tokens"] / gen_stats["time"] if gen_stats["time"] else None
        out["completion_length"] = _mean(gen_stats["lengths"])
        _add_projection(out, ctx)
    free_memory(device)
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def _f(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    base = next((r for r in runs if r["name"] == "kit-qlora" and r["status"] == "ok"), None)
    out: dict[str, Any] = {}
    if base is None:
        return out
    # GPU memory only: on CPU the only figure is the process's lifetime peak RSS, useless between runs.
    keys = ("measured_total_gb", "step_time_s", "rollout_tokens_per_s")
    for r in runs:
        if r is base or r["status"] != "ok":
            continue
        entry = {}
        for key in keys:
            if r.get(key) and base.get(key):
                entry[f"{key}_ratio"] = r[key] / base[key]
        out[f"{r['name']} / kit-qlora"] = entry
    return out


def print_report(result: dict[str, Any], console) -> None:
    from rich.table import Table

    cuda = result["device"] == "cuda"
    t = Table(title=f"echoink-lite GRPO benchmark: {result['card']} ({result['recipe_file']})")
    t.add_column("")
    for r in result["runs"]:
        t.add_column(r["name"], justify="right")
    rows = [("status", "status", "s"), ("steps measured", "steps", "d")]
    if cuda:
        rows += [("peak allocated (GB)", "peak_gpu_allocated_gb", ".2f"), ("peak reserved (GB)", "peak_gpu_reserved_gb", ".2f"),
                 ("CUDA context (GB)", "cuda_context_gb", ".2f"), ("measured total (GB)", "measured_total_gb", ".2f")]
    else:
        rows += [("peak host RSS (GB, process)", "peak_rss_gb", ".2f")]
    rows += [("planner estimate (GB)", "planner_estimate_gb", ".2f"), ("planner error (%)", "planner_error_pct", "+.1f"),
             ("prompt tokens", "prompt_tokens", "d"), ("prompts per step (bench)", "prompts_per_step", "d"),
             ("completion length (budget)", "completion_length", ".0f"),
             ("rollout path", "rollout_path", "s"), ("rollout s/step", "rollout_time_s", ".2f"), ("log-prob fwd+bwd s/step", "logprob_time_s", ".2f"),
             ("optimizer s/step", "optimizer_time_s", ".3f"), ("step s", "step_time_s", ".2f"),
             ("rollout tokens/s", "rollout_tokens_per_s", ".0f"), ("projected s/step (recipe prompts)", "projected_step_time_s", ".1f"),
             ("projected full run (h)", "projected_full_run_h", ".1f")]
    for label, key, spec in rows:
        vals = []
        for r in result["runs"]:
            v = r.get(key)
            vals.append("-" if v is None else (str(v) if spec == "s" else format(v, spec)))
        t.add_row(label, *vals)
    console.print(t)
    for r in result["runs"]:
        if r.get("error"):
            console.print(f"[yellow]{r['name']}:[/] {r['error']}", highlight=False)
        if r["kind"] == "kit" and r["status"] == "ok" and not r.get("forced_full_length"):
            console.print(f"[yellow]{r['name']}: completions did not all reach the budget[/]")
    if result.get("ratios"):
        rt = Table(title="ratios (x the kit's QLoRA run)")
        rt.add_column("run")
        rt.add_column("memory", justify="right")
        rt.add_column("step time", justify="right")
        rt.add_column("rollout tokens/s", justify="right")
        for name, e in result["ratios"].items():
            mem = e.get("measured_total_gb_ratio")
            rt.add_row(name, _f(mem), _f(e.get("step_time_s_ratio")), _f(e.get("rollout_tokens_per_s_ratio")))
        console.print(rt)
    if result["device"] != "cuda":
        console.print("[yellow]CPU run (--tiny): a smoke test of the benchmark code, not a GPU measurement.[/]")


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "echoink-lite"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def auto_prompts_per_step(recipe) -> int:
    """The fewest prompts per step that still fill one rollout batch and one micro-batch of the recipe."""
    g = recipe.grpo
    p = max(1, math.ceil(g.rollout_batch_size / g.group_size), math.ceil(g.micro_batch_size / g.group_size))
    while p < g.prompts_per_step and (p * g.group_size) % g.micro_batch_size:
        p += 1
    return min(p, g.prompts_per_step)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", nargs="+", default=[str(REPO / "recipes" / "paper_24gb.yaml")],
                   help="one or more recipes, measured in this order (one JSON report each)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is excluded from time means)")
    p.add_argument("--cap-gb", nargs="+", type=float, default=None,
                   help="limit PyTorch to this many GB (proves a claim on a larger card): one value, or one per recipe")
    p.add_argument("--completion-tokens", nargs="+", type=int, default=None,
                   help="forced completion lengths, one run each (default: the recipe's generation.max_completion_tokens)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget: a run is started only if the time left exceeds the previous run's (scaled); "
                   "the JSON reports are rewritten after every run, so a cut-off session keeps what finished")
    p.add_argument("--out", default=None, help="JSON report, one recipe only (default: benchmarks/results/<card>-<recipe>[-capN].json on CUDA)")
    p.add_argument("--baselines", action="store_true", help="also run stock TRL GRPOTrainer (images only) and the kit in bf16 LoRA")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny widths, tiny inputs, short completions")
    p.add_argument("--prompts-per-step", default="auto", help="'auto' (fills one decode batch and one micro-batch), 'recipe', or a number")
    p.add_argument("--model-dir", default=None, help="where the random full-size model is saved and reused "
                   "(default ~/.cache/echoink-lite/bench-omni7b-random; 17.9 GB)")
    p.add_argument("--workdir", default=None, help="data and run folders (default: a temporary folder, removed at the end)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value", help="extra recipe overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    t_start = time.time()
    import echoink_lite  # noqa: F401  (sets the CUDA allocator's expandable segments before CUDA starts)
    import torch
    from rich.console import Console

    console = Console(width=max(100, Console().width))
    if args.tiny:
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            console.print("[red]bench_grpo.py measures a GPU: no CUDA device here.[/] Use --tiny for the CPU smoke run.")
            return 2
        device = "cuda"
    caps = args.cap_gb or [None]
    if len(caps) not in (1, len(args.recipe)):
        console.print("[red]--cap-gb takes one value, or one per --recipe[/]")
        return 2
    if args.out and len(args.recipe) > 1:
        console.print("[red]--out names one report: use it with one --recipe[/]")
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="echoink-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    reports, rc = [], 0
    try:
        for i, recipe_file in enumerate(args.recipe):
            cap = caps[i] if len(caps) > 1 else caps[0]
            report, ok = bench_recipe(args, recipe_file, cap, device, workdir, console, t_start)
            reports.append(report)
            rc = rc or (0 if ok else 1)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"total {time.time() - t_start:.0f} s; reports: " + ", ".join(str(r) for r in reports))
    return rc


def _time_left(args, t_start: float) -> float | None:
    return None if args.budget_s is None else args.budget_s - (time.time() - t_start)


def bench_recipe(args, recipe_file: str, cap_gb: float | None, device: str, workdir: Path, console, t_start: float):
    """Measure one recipe: the kit at each forced completion length (then the baselines); the report is
    rewritten after every run. Returns (report path, whether the first kit run succeeded)."""
    import torch

    from echoink_lite.plan import Dims, prompt_token_estimate
    from echoink_lite.recipe import load_recipe

    dtype = "float32" if args.tiny else None
    base = load_recipe(recipe_file, args.overrides)
    dtype = dtype or base.model.dtype
    model_dir = Path(args.model_dir) if args.model_dir else (
        workdir / "tiny-model" if args.tiny else Path.home() / ".cache" / "echoink-lite" / "bench-omni7b-random")
    config = bench_config(args.tiny)
    if args.prompts_per_step == "recipe":
        prompts = base.grpo.prompts_per_step
    elif args.prompts_per_step == "auto":
        prompts = auto_prompts_per_step(base)
    else:
        prompts = int(args.prompts_per_step)
    tiny_overrides = [
        "model.dtype=float32", "grpo.group_size=2", "grpo.micro_batch_size=2", "grpo.rollout_batch_size=2",
        "generation.max_completion_tokens=8", "data.max_audio_seconds=1.0", "data.max_pixels=3136",
    ] if args.tiny else []
    if args.tiny:
        prompts = 1
    lengths = args.completion_tokens or [None]
    common = [
        f"model.name_or_path={model_dir}", "data.valid=null", f"schedule.max_steps={args.steps}",
        f"grpo.prompts_per_step={prompts}", "logging.progress=false", "logging.log_completions_every=0",
        "logging.report_to=[]", "checkpoint.save_every_steps=1000000", "checkpoint.save_every_minutes=100000",
    ]
    recipe = load_recipe(recipe_file, args.overrides + tiny_overrides + common + [f"data.train={workdir / 'data' / 'train'}"])
    ensure_model(model_dir, config, device, dtype, console)

    # data: real-size media; the question padded to the planner's prompt length (tiny: as is)
    from echoink_lite.modeling import load_processor

    n_rows = prompts * args.steps
    image_size = 56 if args.tiny else int(math.isqrt(recipe.data.max_pixels))
    audio_seconds = recipe.data.max_audio_seconds
    split = write_bench_data(workdir / "data", n_rows, image_size, audio_seconds, BASE_QUESTION)
    processor = load_processor(str(model_dir), max_pixels=recipe.data.max_pixels)
    if args.tiny:
        prompt_tokens = prompt_length(processor, recipe, split)
    else:
        target = prompt_token_estimate(recipe, Dims.from_config(config))["prompt"]
        question, _ = paper_length_question(processor, recipe, split, target)
        split = write_bench_data(workdir / "data", n_rows, image_size, audio_seconds, question)
        prompt_tokens = prompt_length(processor, recipe, split)
    console.print(f"benchmark data: {n_rows} rows, {audio_seconds:g} s audio, {image_size}x{image_size} image, "
                  f"{prompt_tokens}-token prompts")

    card, card_gb, cap_info = "CPU (--tiny)", None, None
    if device == "cuda":
        card = torch.cuda.get_device_name(0)
        card_gb = torch.cuda.get_device_properties(0).total_memory / GIB
        torch.zeros(1, device="cuda")  # create the context before measuring it
        context_now = cuda_context_gb(device) or 0.0
        fraction = 1.0 if not cap_gb else max(0.01, min(1.0, (cap_gb - context_now) / card_gb))
        torch.cuda.set_per_process_memory_fraction(fraction)
        if cap_gb:
            cap_info = {"cap_gb": cap_gb, "context_at_cap_gb": context_now, "memory_fraction": fraction}
            console.print(f"capped PyTorch at {fraction * card_gb:.2f} GB ({cap_gb:g} GB less a {context_now:.2f} GB "
                          f"CUDA context) of {card_gb:.1f} GB")

    full_steps = load_recipe(recipe_file, args.overrides).derived(PAPER_TRAIN_ROWS)["total_steps"]
    ctx = {"device": device, "card_memory_gb": cap_gb or card_gb, "model_config": config,
           "model_config_name": "tiny widths, real vocabulary" if args.tiny else "bundled Qwen2.5-Omni-7B thinker",
           "prompt_tokens": prompt_tokens, "recipe_prompts_per_step": base.grpo.prompts_per_step,
           "full_run_steps": full_steps, "steps": args.steps, "workdir": str(workdir)}
    result: dict[str, Any] = {
        "schema": SCHEMA, "device": device, "card": card, "card_memory_gb": card_gb, "cap": cap_info,
        "versions": _versions(), "python": platform.python_version(),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())] + sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe_file": str(recipe_file), "bench_steps": args.steps, "prompts_per_step_bench": prompts,
        "prompts_per_step_recipe": base.grpo.prompts_per_step, "full_run_steps": full_steps,
        "prompt_tokens": prompt_tokens, "audio_seconds": audio_seconds, "image_pixels": image_size * image_size,
        "total_wall_time_s": None, "runs": [],
    }
    suffix = f"-cap{cap_gb:g}gb" if cap_gb else ""
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / f"echoink-bench-tiny-{Path(recipe_file).stem}.json" if args.tiny else
        REPO / "benchmarks" / "results" / f"{_slug(card)}-{Path(recipe_file).stem}{suffix}.json")

    def save() -> None:
        result["ratios"] = ratios(result["runs"])
        if cap_info and result["runs"]:
            kit = result["runs"][0]
            cap_info["within_cap"] = bool(kit["status"] == "ok" and kit.get("measured_total_gb") is not None
                                          and kit["measured_total_gb"] <= cap_gb)
        result["total_wall_time_s"] = time.time() - t_start
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def fits_budget(last: dict | None, scale: float) -> bool:
        left = _time_left(args, t_start)
        if left is None or last is None:
            return left is None or left > 60
        return left > last["wall_time_s"] * scale * 1.1 + 20

    last = None
    for tokens in lengths:
        name = "kit-qlora" if tokens is None or tokens == recipe.generation.max_completion_tokens or last is None else f"kit-qlora-{tokens}tok"
        run_recipe = recipe if tokens is None else load_recipe(recipe_file, args.overrides + tiny_overrides + common + [
            f"data.train={split}", f"generation.max_completion_tokens={tokens}"])
        scale = 1.0 if last is None else run_recipe.generation.max_completion_tokens / max(1, last["completion_budget"])
        if not fits_budget(last, scale):
            result["runs"].append({"name": name, "kind": "kit", "status": "skipped", "error": "time budget"})
            save()
            continue
        run = run_kit(name, _with_run_dir(run_recipe, workdir, name), ctx, console)
        result["runs"].append(run)
        last = run if run["status"] == "ok" else last
        save()
        print_report(result, console)
    if args.baselines:
        bf16 = load_recipe(recipe_file, args.overrides + tiny_overrides + common + [
            f"data.train={split}", "quantization.load_in_4bit=false"])
        for name, fn, r in (("kit-bf16-lora", run_kit, bf16), ("trl-grpo-qlora-images", run_trl, recipe)):
            if fits_budget(last, 1.0):
                result["runs"].append(fn(name, _with_run_dir(r, workdir, name if fn is run_kit else "trl"), ctx, console))
            else:
                result["runs"].append({"name": name, "kind": "kit" if fn is run_kit else "trl", "status": "skipped",
                                       "error": "time budget"})
            save()
            print_report(result, console)
    save()
    console.print(f"report: {out}  ({time.time() - t_start:.0f} s since start)")
    first = result["runs"][0] if result["runs"] else {}
    return out, first.get("status") == "ok"


def _with_run_dir(recipe, workdir: Path, name: str):
    from echoink_lite.recipe import recipe_from_dict

    data = recipe.model_dump(mode="json")
    data["checkpoint"]["output_dir"] = str(workdir / "runs" / name)
    return recipe_from_dict(data, f"benchmark {name}")


if __name__ == "__main__":
    sys.exit(main())
