"""What a training run builds once, before its first step: `Run`, everything `grpo.grpo_step` needs.

`build_run` loads the thinker (4-bit with quantization.load_in_4bit) with LoRA on its language model,
the AdamW optimizer and the learning-rate schedule (over the updates: steps x grpo.num_iterations), the
rollout engine with the recipe's sampling, the rewards and the loss spec. Data, resume checks and the run
folder stay in `grpo.train`, which calls this once every check has passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .data import Row
from .distributed import Dist
from .loss_variants import LossSpec
from .modeling import add_lora, load_thinker_from_recipe, multimodal_token_ids, torch_dtype
from .recipe import Recipe
from .rewards import resolve_rewards
from .rollout import RolloutEngine, SamplingParams
from .row_skips import SkipBudget
from .thinker_forward import disable_hf_checkpointing


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


def build_run(recipe: Recipe, dst: Dist, rows, schedule, total_steps: int, processor, console) -> Run:
    """The model, optimizer, schedule and rollout engine of a run, seeded by schedule.seed."""
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


def engine_label(recipe: Recipe, dst: Dist) -> str:
    """How the rollout engine decodes on this device, for the plan printed before training."""
    if dst.device.type != "cuda":
        return "eager decode (CPU)"
    return "CUDA-graph decode" if recipe.generation.cuda_graph else "eager decode (generation.cuda_graph=false)"
