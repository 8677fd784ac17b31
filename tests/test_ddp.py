"""Data parallel with two CPU processes on loopback: same prompts per step, identical adapters on both ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_grpo import tiny_recipe


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# TRL's variants across processes: the batch std gathered from both, updates per rollout, and a rank whose only
# group is tied (rewards_for_tests.tied_on_some_ids) skipping its loss pass while the other runs its own
VARIANTS = dict(grpo__loss_type="dapo", grpo__num_iterations=2, grpo__scale_rewards="batch", grpo__beta=0.0,
                grpo__micro_batch_size=2, grpo__rewards={"rewards_for_tests:tied_on_some_ids": 1.0})


@pytest.mark.parametrize("overrides", [{}, VARIANTS], ids=["paper", "variants"])
def test_two_processes_keep_prompts_per_step_and_identical_adapters(tiny_model_dir, synth_dir, tmp_path, overrides):
    out = tmp_path / "ddp"
    recipe = tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=2, **overrides)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_loopback_port()), "--local-addr", "127.0.0.1",
           str(Path(__file__).parent / "ddp_worker.py"), json.dumps(recipe.model_dump(mode="json"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = load_file(str(out / "lora-rank0.safetensors"))
    b = load_file(str(out / "lora-rank1.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks diverged on {k}"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # 2 prompts x group 4 per step, split over 2 processes: the metrics count all 8 completions
    plan = recipe.derived(16, world_size=2)
    assert plan["completions_per_process"] == 4 and plan["completions_per_step"] == 8
    assert "8 (4 per process x 2)" in proc.stdout
    if overrides:  # step 1 holds prompts 11 and 15 (one per rank), and 15's group is tied: that rank skipped it
        assert [r["skipped_groups"] for r in rows][0] == 1 and all(len(r["updates"]) == 2 for r in rows)
    # the trained adapter moved away from its initialisation (LoRA B starts at zero)
    assert any(k.endswith("lora_B.default.weight") and a[k].abs().sum() > 0 for k in a)
