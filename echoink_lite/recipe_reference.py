"""The recipe reference: every key with its default, its description and its counterpart in TRL's GRPOConfig.

`echoink-lite recipes explain` prints it (`explain`) and the README's table of TRL names repeats the TRL column;
tests/test_recipe.py checks that it covers every key of the schema (recipe.py), that every GRPOConfig field it
names exists in the installed TRL, and that the README shows each line.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from .recipe import Recipe

# Each key's counterpart in TRL's `GRPOConfig` (trl 1.16, the version pinned in pyproject.toml), for people
# who know that trainer: (GRPOConfig fields named, text shown by `recipes explain` and in the README).
# Keys without a GRPOConfig field say "none" and, where one exists, where TRL takes the setting instead.
# tests/test_recipe.py checks every key is listed and every named field exists in the installed GRPOConfig.
_NONE = ()
TRL_GRPO_CONFIG: dict[str, tuple[tuple[str, ...], str]] = {
    "description": (_NONE, "none"),
    "model.name_or_path": (_NONE, "none; GRPOTrainer(model=...)"),
    "model.revision": (("model_init_kwargs",), 'model_init_kwargs["revision"]'),
    "model.dtype": (("bf16", "fp16", "model_init_kwargs"), 'bf16 / fp16, model_init_kwargs["dtype"]'),
    "model.attn_implementation": (("model_init_kwargs",), 'model_init_kwargs["attn_implementation"]'),
    "model.gradient_checkpointing": (("gradient_checkpointing",), "gradient_checkpointing"),
    "quantization.load_in_4bit": (_NONE, "none; GRPOTrainer(quantization_config=BitsAndBytesConfig(load_in_4bit=True))"),
    "quantization.quant_type": (_NONE, "none; BitsAndBytesConfig(bnb_4bit_quant_type=...)"),
    "quantization.double_quant": (_NONE, "none; BitsAndBytesConfig(bnb_4bit_use_double_quant=...)"),
    "quantization.quantize_audio_tower": (_NONE, "none; BitsAndBytesConfig(llm_int8_skip_modules=[...])"),
    "quantization.quantize_vision_tower": (_NONE, "none; BitsAndBytesConfig(llm_int8_skip_modules=[...])"),
    "quantization.quantize_lm_head": (_NONE, "none; BitsAndBytesConfig(llm_int8_skip_modules=[...])"),
    "lora.r": (_NONE, "none; GRPOTrainer(peft_config=LoraConfig(r=...))"),
    "lora.alpha": (_NONE, "none; LoraConfig(lora_alpha=...)"),
    "lora.dropout": (_NONE, "none; LoraConfig(lora_dropout=...)"),
    "lora.target_modules": (_NONE, "none; LoraConfig(target_modules=...)"),
    "data.train": (_NONE, "none; GRPOTrainer(train_dataset=...)"),
    "data.valid": (_NONE, "none; GRPOTrainer(eval_dataset=...)"),
    "data.max_audio_seconds": (_NONE, "none"),
    "data.max_pixels": (_NONE, "none; the processor's image max_pixels"),
    "data.max_bad_fraction": (_NONE, "none"),
    "data.limit_train_rows": (_NONE, "none"),
    "data.limit_valid_rows": (_NONE, "none"),
    "grpo.prompts_per_step": (
        ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations"),
        "none; per_device_train_batch_size x processes x gradient_accumulation_steps / num_generations",
    ),
    "grpo.group_size": (("num_generations",), "num_generations"),
    "grpo.micro_batch_size": (("per_device_train_batch_size",), "per_device_train_batch_size"),
    "grpo.rollout_batch_size": (("generation_batch_size",),
                                "none; generation_batch_size also spreads one generation over several steps"),
    "grpo.beta": (("beta",), "beta (TRL's default is 0.0)"),
    "grpo.loss_type": (("loss_type",), "loss_type (TRL's default is 'dapo'); the aliases sequence = 'grpo', token = 'dapo'"),
    "grpo.importance_sampling_level": (("importance_sampling_level",), "importance_sampling_level (default 'token' in both)"),
    "grpo.num_iterations": (("num_iterations",), "num_iterations (default 1 in both)"),
    "grpo.epsilon": (("epsilon",), "epsilon (default 0.2 in both)"),
    "grpo.epsilon_high": (("epsilon_high",), "epsilon_high (default None = epsilon in both)"),
    "grpo.sapo_temperature_pos": (("sapo_temperature_pos",), "sapo_temperature_pos (default 1.0 in both)"),
    "grpo.sapo_temperature_neg": (("sapo_temperature_neg",), "sapo_temperature_neg (default 1.05 in both)"),
    "grpo.scale_rewards": (("scale_rewards",), "scale_rewards (default 'group' in both)"),
    "grpo.advantage_eps": (("scale_rewards",), "none; TRL adds a fixed 1e-4 to the std (scale_rewards 'group' or 'batch')"),
    "grpo.mask_truncated_completions": (("mask_truncated_completions",), "mask_truncated_completions (default False in both)"),
    "grpo.skip_zero_advantage_groups": (_NONE, "none; TRL runs the loss pass of every group"),
    "grpo.rewards": (("reward_weights",), "GRPOTrainer(reward_funcs=...) with reward_weights"),
    "grpo.logprob_chunk_tokens": (_NONE, "none"),
    "grpo.max_nonfinite_steps": (_NONE, "none"),
    "generation.max_prompt_tokens": (_NONE, "none (TRL 1.16 has no max_prompt_length)"),
    "generation.max_completion_tokens": (("max_completion_length",), "max_completion_length"),
    "generation.temperature": (("temperature",), "temperature"),
    "generation.top_p": (("top_p",), "top_p (TRL's default is 1.0)"),
    "generation.top_k": (("top_k",), "top_k (TRL's default is 0)"),
    "generation.cuda_graph": (_NONE, "none (TRL generates with transformers' generate or vLLM)"),
    "schedule.learning_rate": (("learning_rate",), "learning_rate"),
    "schedule.lr_scheduler": (("lr_scheduler_type",), "lr_scheduler_type"),
    "schedule.warmup_steps": (("warmup_steps",), "warmup_steps (TRL counts updates: ours x num_iterations)"),
    "schedule.weight_decay": (("weight_decay",), "weight_decay"),
    "schedule.adam_beta1": (("adam_beta1",), "adam_beta1"),
    "schedule.adam_beta2": (("adam_beta2",), "adam_beta2"),
    "schedule.max_grad_norm": (("max_grad_norm",), "max_grad_norm"),
    "schedule.epochs": (("num_train_epochs",), "num_train_epochs"),
    "schedule.max_steps": (("max_steps",), "max_steps (TRL counts updates: ours x num_iterations)"),
    "schedule.seed": (("seed",), "seed"),
    "checkpoint.output_dir": (("output_dir",), "output_dir"),
    "checkpoint.save_every_steps": (("save_steps",), "save_steps"),
    "checkpoint.save_every_minutes": (_NONE, "none"),
    "checkpoint.keep_last": (("save_total_limit",), "save_total_limit"),
    "logging.run_name": (("run_name",), "run_name"),
    "logging.report_to": (("report_to",), "report_to"),
    "logging.log_completions_every": (("log_completions", "logging_steps"), "log_completions with logging_steps"),
    "logging.progress": (("disable_tqdm",), "disable_tqdm (inverted)"),
}


def explain() -> list[tuple[str, str, str, str]]:
    """(field, default, TRL GRPOConfig equivalent, description) for every field: the recipe reference."""
    rows = []

    def walk(model: type[BaseModel], inst: BaseModel, prefix: str) -> None:
        for name, info in model.model_fields.items():
            val = getattr(inst, name)
            if isinstance(val, BaseModel):
                walk(type(val), val, f"{prefix}{name}.")
            else:
                key = f"{prefix}{name}"
                rows.append((key, json.dumps(val), TRL_GRPO_CONFIG.get(key, (_NONE, "none"))[1], info.description or ""))

    walk(Recipe, Recipe(), "")
    return rows
