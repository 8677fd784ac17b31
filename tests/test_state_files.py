"""The training state's files hold tensors and plain values only, and read back exactly."""

import json

import pytest
import torch
from safetensors.torch import save_file

from echoink_lite.state_files import StateFileError, check_rng_state, load_tree, rng_state, save_tree, set_rng_state


def test_optimizer_and_scheduler_states_round_trip_exactly(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    for name, obj in (("opt", opt), ("sched", sched)):
        save_tree(obj.state_dict(), tmp_path / f"{name}.safetensors")
        back = load_tree(tmp_path / f"{name}.safetensors")
        want = obj.state_dict()
        assert json.dumps(back, default=repr, sort_keys=True) == json.dumps(want, default=repr, sort_keys=True)
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    fresh.load_state_dict(load_tree(tmp_path / "opt.safetensors"))
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and fresh.param_groups[0]["betas"] == (0.9, 0.99)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key])


def test_rng_states_round_trip_and_continue_the_same_streams(tmp_path):
    import random

    import numpy as np

    save_tree(rng_state(), tmp_path / "rng.safetensors")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)  # move every stream on
    set_rng_state(check_rng_state(load_tree(tmp_path / "rng.safetensors"), tmp_path))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_a_state_the_generators_refuse_is_one_line_and_changes_no_stream(tmp_path):
    state = rng_state()
    state["torch"] = torch.zeros(3, dtype=torch.uint8)  # not a generator state
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.raises(StateFileError) as err:
        check_rng_state(state, tmp_path / "rng-rank0.safetensors")
    assert "\n" not in str(err.value) and "rng-rank0.safetensors" in str(err.value)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("tree", ['{"x": 1}', '{"T": "missing"}', '{"d": [[{"T": "t0"}, 1]]}', "not json"])
def test_a_state_file_that_the_kit_did_not_write_is_refused(tmp_path, tree):
    path = tmp_path / "optimizer.safetensors"
    save_file({"t0": torch.zeros(1)}, str(path), metadata={"echoink-lite-state": tree})
    with pytest.raises(StateFileError) as err:
        load_tree(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(StateFileError, match="not a readable safetensors file"):
        load_tree(path)
