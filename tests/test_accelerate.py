"""`accelerate launch --multi_gpu ... -m echoink_lite.cli train` (as the README says) with two CPU processes.

accelerate's multi-GPU launcher runs torch.distributed.run, so the kit sees the same RANK / WORLD_SIZE /
MASTER_ADDR variables as under torchrun (tests/test_ddp.py) and starts a gloo group on CPU; every address
stays on 127.0.0.1. `accelerate launch --cpu --num_processes 2` is NOT an alternative: it starts one process
without those variables (checked with accelerate 1.15.0), so the kit would train in that single process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_ddp import _free_loopback_port
from test_grpo import tiny_recipe

from echoink_lite import checkpoints as ckpt
from echoink_lite.resume import load_state


def test_accelerate_launch_multi_gpu_trains_with_two_cpu_processes(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=2).to_yaml())
    tests = Path(__file__).parent  # this checkout's package, and the reward module of the tests
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               HF_HOME=str(tmp_path / "hf-home"),  # no user accelerate config file changes the launch
               PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_loopback_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "echoink_lite.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 (4 per process x 2)" in proc.stdout  # two processes share each step's prompts
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    final = ckpt.latest_checkpoint(out)
    assert final.name == "step-000002" and ckpt.verify_checkpoint(final)
    assert sorted(p.name for p in final.glob("rng-rank*")) == ["rng-rank0.safetensors", "rng-rank1.safetensors"]
    assert load_state(final)["world_size"] == 2
