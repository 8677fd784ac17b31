"""GRPO on the tiny model: what changes, what the loss sees, rewards, resume, and failure handling."""

import dataclasses
import json
import shutil

import pytest
import torch

from echoink_lite import checkpoints as ckpt
from echoink_lite.grpo import TrainingError, train
from echoink_lite.loss import completion_logps, group_advantages, grpo_loss
from echoink_lite.recipe import recipe_from_dict
from echoink_lite.resume import load_state, resolve_resume
from echoink_lite.rewards import accuracy_reward, compute_rewards, format_reward, resolve_rewards


def tiny_recipe(model_dir, synth_dir, out, **over):
    d = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "gradient_checkpointing": True},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(synth_dir / "train"), "valid": str(synth_dir / "valid"), "max_audio_seconds": 1.0},
        "grpo": {"prompts_per_step": 2, "group_size": 4, "micro_batch_size": 4, "rollout_batch_size": 8, "beta": 0.04,
                 "rewards": {"rewards_for_tests:char_diversity": 1.0}, "logprob_chunk_tokens": 16},
        "generation": {"max_completion_tokens": 8},
        "schedule": {"learning_rate": 1e-2, "max_steps": 4, "seed": 3},
        "checkpoint": {"output_dir": str(out), "save_every_steps": 2, "keep_last": 5},
        "logging": {"progress": False},
    }
    for key, value in over.items():
        section, field = key.split("__")
        d.setdefault(section, {})[field] = value
    return recipe_from_dict(d)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_rewards_match_hand_computed_values():
    completions = [
        "<think>red and low</think><answer>A</answer>",  # right, well formed
        "<think>hmm</think> <answer> B </answer>",  # wrong letter, well formed (spaces allowed)
        "<answer>A</answer>",  # right, no think -> format 0
        "<think>a</think><think>b</think><answer>A</answer>",  # two thinks -> format 0, accuracy 1
        "The answer is A",  # no tags at all
    ]
    sol = ["<answer>A</answer>"] * 5
    assert accuracy_reward(completions, solution=sol) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    total, per = compute_rewards(resolve_rewards({"accuracy": 1.0, "format": 0.5}), completions, solution=sol)
    assert total == [1.5, 0.5, 1.0, 1.0, 0.0]
    assert per["format"] == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_unknown_reward_names_the_fix():
    with pytest.raises(ValueError, match="built-ins are"):
        resolve_rewards({"acuracy": 1.0})


def test_group_advantages_and_loss_math():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = group_advantages(r, 4, 1e-4)
    g = r[:4]
    assert torch.allclose(adv[:4], (g - g.mean()) / (g.std() + 1e-4))
    assert torch.all(adv[4:] == 0) and std[1] == 0  # a tied group carries no signal
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, kl = grpo_loss(logps, None, torch.tensor([1.0, -1.0]), mask, 0.0, "sequence", 2.0)
    assert loss.item() == pytest.approx((-1.0 + 1.0) / 2)  # ratio is 1: -(A) averaged per sequence
    loss.backward()
    # d loss / d logp = -A / (tokens of that sequence) / normaliser, and 0 on masked tokens
    assert torch.allclose(logps.grad, torch.tensor([[-0.25, -0.25, 0.0], [1 / 6, 1 / 6, 1 / 6]]))
    ref = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]]) + 0.1
    _, kl = grpo_loss(logps.detach(), ref, torch.zeros(2), mask, 0.1, "sequence", 2.0)
    assert torch.allclose(kl, torch.exp(torch.tensor(0.1)) - 0.1 - 1)


def test_only_lora_changes_and_every_lora_parameter_does(tiny_model_dir, synth_dir, tmp_path):
    from echoink_lite.modeling import add_lora, load_thinker_from_recipe

    recipe = tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "run", schedule__max_steps=3)
    torch.manual_seed(recipe.schedule.seed)
    fresh = add_lora(load_thinker_from_recipe(recipe, device="cpu"), recipe.lora, seed=recipe.schedule.seed)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    before_buffers = {n: b.detach().clone() for n, b in fresh.named_buffers()}
    res = train(recipe)
    after = dict(res.model.named_parameters())
    assert set(after) == set(before)
    lora = [n for n in after if "lora_" in n]
    assert lora and all(not any(t in n for t in ("audio_tower", "visual")) for n in lora)
    unchanged_lora = [n for n in lora if torch.equal(after[n].detach(), before[n])]
    assert unchanged_lora == [], f"LoRA parameters that did not move: {unchanged_lora[:3]}"
    changed_other = [n for n in after if "lora_" not in n and not torch.equal(after[n].detach(), before[n])]
    assert changed_other == [], f"non-LoRA parameters changed: {changed_other[:3]}"
    changed_buffers = [n for n, b in res.model.named_buffers() if n in before_buffers and not torch.equal(b, before_buffers[n])]
    assert changed_buffers == []
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["completion_length"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "curves.png").is_file()


def test_audio_reaches_the_loss_forward(tiny_model_dir, synth_dir, tmp_path):
    from echoink_lite.data import scan_split
    from echoink_lite.modeling import add_lora, load_processor, load_thinker_from_recipe
    from echoink_lite.prompting import encode_example
    from echoink_lite.row_media import load_example
    from echoink_lite.thinker_forward import encode_prompts

    recipe = tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "run")
    model = add_lora(load_thinker_from_recipe(recipe, device="cpu"), recipe.lora, seed=0)
    proc = load_processor(str(tiny_model_dir))
    rows = scan_split(synth_dir / "train").rows
    enc = encode_example(proc, load_example(rows[0], 1.0))
    comp = torch.tensor([proc.tokenizer("<think>red low</think>").input_ids])
    mask = torch.ones_like(comp)
    louder = dataclasses.replace(enc, input_features=enc.input_features + 1.0)
    with torch.no_grad():
        prompt, changed = encode_prompts(model, [enc, louder], "cpu", torch.float32)
        a = completion_logps(model, prompt, comp, mask, 1.0, 2)
        b = completion_logps(model, changed, comp, mask, 1.0, 2)
        same = completion_logps(model, prompt, comp, mask, 1.0, 2)
        # chunking changes nothing
        c = completion_logps(model, prompt, comp, mask, 1.0, 1000)
    assert torch.equal(a, same)
    assert torch.allclose(a, c, atol=1e-6)
    assert (a - b).abs().max() > 1e-5, "changing only the audio features did not change the policy log-probs"
    # and they are real log-probabilities of the given tokens
    assert torch.all(a <= 0)


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_four_steps_equal_two_plus_resumed_two(tiny_model_dir, synth_dir, tmp_path):
    straight = train(tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "straight"))
    # interrupt after 2 steps: run the same recipe, stop by deleting everything after step 2
    split_dir = tmp_path / "split"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-000002", split_dir / "checkpoints" / "step-000002")
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    (split_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # includes steps 3-4: must be dropped on resume
    resumed = train(tiny_recipe(tiny_model_dir, synth_dir, split_dir), resume="auto")
    assert resumed.steps_done == 4
    a = _adapter_tensors(straight.adapter_dir)
    b = _adapter_tensors(resumed.adapter_dir)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    m1 = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (split_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m2] == [1, 2, 3, 4]
    for x, y in zip(m1, m2):
        for key in ("reward", "loss", "grad_norm", "completion_length", "kl", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


def test_resume_from_scratch_run_really_resumes_at_step(tiny_model_dir, synth_dir, tmp_path):
    """A genuine two-process history: run 2 steps, then a longer max_steps is a recipe change -> refused."""
    out = tmp_path / "run"
    train(tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=2))
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]
    with pytest.raises(ckpt.ResumeError) as err:
        train(tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=2, schedule__learning_rate=5e-3), resume="auto")
    assert "schedule.learning_rate" in str(err.value)
    # non-math fields may change
    res = train(tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=2, logging__run_name="renamed"), resume="auto")
    assert res.steps_done == 2


def test_interrupted_checkpoint_is_ignored(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=2))
    good = ckpt.latest_checkpoint(out)
    # a save of step 4 that died after the rename but before its marker, and a leftover temp folder
    broken = out / "checkpoints" / "step-000004"
    shutil.copytree(good, broken)
    (broken / ckpt.MARKER).unlink()
    (out / "checkpoints" / ".tmp-step-000006").mkdir()
    assert ckpt.latest_checkpoint(out) == good
    assert resolve_resume("auto", out) == good
    with pytest.raises(ckpt.ResumeError, match="marker"):
        load_state(broken)


def test_nonfinite_steps_are_skipped_then_stop_with_weights_saved(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, synth_dir, out, grpo__rewards={"rewards_for_tests:not_a_number": 1.0},
                         grpo__max_nonfinite_steps=2, schedule__max_steps=4)
    with pytest.raises(TrainingError, match="non-finite") as err:
        train(recipe)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_step"] for r in rows] == [True, True]
    assert "Rows of the last non-finite step: " in str(err.value)  # the rows are named, in case one is the cause
    assert ckpt.latest_checkpoint(out).name == "step-000002"


def test_preflight_refuses_a_prompt_over_the_cap_before_step_one(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        train(tiny_recipe(tiny_model_dir, synth_dir, out, generation__max_prompt_tokens=64))
    msg = str(err.value)
    assert "preflight" in msg and "problem_id=" in msg and "generation.max_prompt_tokens=64" in msg
    assert "data.max_audio_seconds" in msg
    assert not (out / "metrics.jsonl").exists() and ckpt.latest_checkpoint(out) is None


def test_out_of_memory_names_step_rows_and_knobs_and_keeps_finished_steps(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    from echoink_lite.rollout import RolloutEngine

    real_generate = RolloutEngine.generate
    calls = {"n": 0}

    def generate_that_runs_out_of_memory(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(RolloutEngine, "generate", generate_that_runs_out_of_memory)
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, synth_dir, out, checkpoint__save_every_steps=10)
    with pytest.raises(TrainingError) as err:
        train(recipe)
    msg = str(err.value)
    assert "out of memory at step 2" in msg and "rows " in msg
    for knob in ("grpo.micro_batch_size", "grpo.rollout_batch_size", "grpo.group_size", "generation.max_completion_tokens"):
        assert knob in msg
    # step 1 finished before the OOM: it is saved although save_every_steps is 10, and resumes
    assert ckpt.latest_checkpoint(out).name == "step-000001"
    monkeypatch.setattr(RolloutEngine, "generate", real_generate)
    assert train(recipe, resume="auto").steps_done == 4


def test_the_last_step_of_an_epoch_is_filled_with_the_epochs_first_prompts_as_the_original():
    import numpy as np

    from echoink_lite.step_data import data_schedule
    from echoink_lite.recipe import load_recipe

    assert load_recipe(None).derived(4490)["total_steps"] == 562  # the paper's 562 steps
    steps = data_schedule(4490, 8, 562, seed=42)
    perm = np.random.default_rng(42).permutation(4490).tolist()
    assert all(len(s) == 8 for s in steps)
    assert [i for s in steps[:561] for i in s] == perm[:4488]  # one pass, each prompt once
    # the 562nd: the 2 left over, then the epoch's first 6 again (accelerate's even_batches on 8 processes)
    assert steps[561] == perm[4488:] + perm[:6]
    two = load_recipe(None, ["schedule.epochs=2"]).derived(4490)["total_steps"]
    assert two == 1124
    steps = data_schedule(4490, 8, two, seed=42)
    second = np.random.default_rng(43).permutation(4490).tolist()
    assert steps[562] == second[:8] and steps[1123] == second[4488:] + second[:6]


def test_a_row_that_fails_to_encode_is_skipped_counted_and_replaced(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    import echoink_lite.grpo as grpo
    import echoink_lite.step_data as step_data
    from echoink_lite.rollout import RolloutEngine

    # 1 row of 16 is 6.25% of the data: allowed by data.max_bad_fraction 0.1 (the default 0.02 stops the run)
    recipe = tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "run", schedule__max_steps=2, data__max_bad_fraction=0.1)
    rows = grpo.scan_split(recipe.data.train).rows
    steps = step_data.data_schedule(len(rows), recipe.grpo.prompts_per_step, 2, recipe.schedule.seed)
    broken = rows[steps[1][0]].problem_id  # the first prompt of step 2
    real_encode, real_generate = step_data.encode_row, RolloutEngine.generate
    prompts_per_call = []

    def encode(processor, row, **kw):
        if row.problem_id == broken:
            raise step_data.RowEncodeError("encode_failed", f"row {row.index}: the processor cannot encode it (test)", row.problem_id)
        return real_encode(processor, row, **kw)

    def generate(self, prompts, group_size, *a, **kw):
        prompts_per_call.append(len(prompts))
        return real_generate(self, prompts, group_size, *a, **kw)

    monkeypatch.setattr(step_data, "encode_row", encode)
    monkeypatch.setattr(RolloutEngine, "generate", generate)
    res = train(recipe)
    assert res.steps_done == 2 and res.skipped_rows == 1
    assert prompts_per_call == [2, 2]  # the step kept its number of prompts
    rows_logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_rows"] for r in rows_logged] == [0, 1]
