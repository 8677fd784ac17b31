"""Several processes: reductions on the process group's device, whole prompts per process, allocator setting."""

import os
import subprocess
import sys

import pytest
import torch

from echoink_lite import distributed
from echoink_lite.distributed import Dist
from echoink_lite.recipe import RecipeError, load_recipe


def test_sum_reduces_on_the_process_groups_device(monkeypatch):
    """NCCL only reduces CUDA tensors: every reduction must reach all_reduce on the group's device, even the
    metrics and flags the loop builds on the CPU. Checked without a GPU with fake (meta-data only) tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None: seen.append(t.device))
    with FakeTensorMode(allow_non_fake_inputs=True):
        dst = Dist(rank=0, world=2, device=torch.device("cuda", 0))
        out = dst.sum_(torch.tensor([1.0, 2.0]))
    assert seen == [torch.device("cuda", 0)]
    assert out.device == torch.device("cpu")  # handed back where it came from


def test_cuda_processes_use_nccl_on_their_own_device(monkeypatch):
    started = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: started.setdefault("device", i))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: started.setdefault("backend", backend))
    dst = distributed.setup_dist()
    assert started == {"device": 1, "backend": "nccl"}
    assert dst.device == torch.device("cuda", 1) and dst.rank == 1 and dst.world == 2


def test_prompts_per_step_must_split_evenly_over_processes():
    recipe = load_recipe(None, ["grpo.prompts_per_step=8"])
    assert recipe.derived(4490, world_size=4)["completions_per_process"] == 2 * 16
    with pytest.raises(RecipeError, match="prompts_per_step=8 cannot be split over 16 processes"):
        recipe.derived(4490, world_size=16)
    with pytest.raises(RecipeError, match="multiple of 3"):
        recipe.derived(4490, world_size=3)


@pytest.mark.parametrize("preset", [None, "expandable_segments:False"])
def test_importing_the_kit_sets_expandable_segments_unless_the_user_did(preset):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    if preset:
        env["PYTORCH_CUDA_ALLOC_CONF"] = preset
    code = "import os, echoink_lite; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == (preset or "expandable_segments:True")


def _batch_advantages_on_one_rank(rank: int, port: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    from echoink_lite.loss_variants import advantages

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 0.0]][rank])  # one group of 4 per rank
    dst = Dist(rank=rank, world=2)
    adv, _ = advantages(rewards, 4, "batch", 1e-4, dst.gather_(rewards))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"gathered": dst.gather_(rewards).tolist(), "advantages": adv.tolist()}, f)
    dist.destroy_process_group()


def test_batch_scaled_advantages_take_the_std_of_every_process(tmp_path):
    """scale_rewards='batch' divides by the std of the whole step's rewards (TRL gathers them): each rank
    gets what one process holding both groups would compute."""
    import json
    import socket

    import torch.multiprocessing as mp

    from echoink_lite.loss_variants import advantages

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_batch_advantages_on_one_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    both = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 0.0])
    whole, _ = advantages(both, 4, "batch", 1e-4)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["gathered"] == both.tolist()
        assert got["advantages"] == whole[4 * rank: 4 * rank + 4].tolist()
