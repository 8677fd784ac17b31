"""Run by torchrun in tests/test_ddp.py: train a recipe given as JSON, save this rank's LoRA weights."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from echoink_lite.grpo import train
from echoink_lite.recipe import recipe_from_dict

recipe = recipe_from_dict(json.loads(sys.argv[1]))
result = train(recipe)
rank = int(os.environ["RANK"])
state = {n: p.detach().contiguous() for n, p in result.model.named_parameters() if "lora_" in n}
save_file(state, os.path.join(recipe.checkpoint.output_dir, f"lora-rank{rank}.safetensors"))
torch.distributed.destroy_process_group()
