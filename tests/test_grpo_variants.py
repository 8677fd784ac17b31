"""GRPO variants in real training steps on the tiny model: the paper's step unchanged to the bit, skipping
zero-advantage groups with the same gradients, several updates per rollout with clipping, every loss type."""

import json
import math

import pytest
import torch

import echoink_lite.grpo as grpo
import echoink_lite.loss_pass as loss_pass
from echoink_lite.grpo import train
from echoink_lite.loss import completion_logps
from echoink_lite.rollout import RolloutEngine
from test_grpo import tiny_recipe
from test_loss_variants import paper_loss_before_issue_16


def _pad(seqs, value):
    width = max(1, max(int(c.numel()) for c in seqs))
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, c in enumerate(seqs):
        out[i, : c.numel()] = c
    return out


def paper_step_gradients(run, prompts, comps, adv):
    """The loss pass of grpo_step before the loss variants (git history: echoink_lite/grpo.py at 53fed9d):
    every micro-batch, reference then policy, the paper's loss, one backward each. Returns the loss sum."""
    g, gen = run.recipe.grpo, run.recipe.generation
    normaliser = max(1.0, float(len(comps)))  # 'sequence': the step's completions (one process)
    total = 0.0
    for gi, prompt in enumerate(prompts):
        members = sorted(range(gi * g.group_size, (gi + 1) * g.group_size), key=lambda i: -comps[i].numel())
        for s in range(0, len(members), g.micro_batch_size):
            idx = members[s: s + g.micro_batch_size]
            ids = _pad([comps[i] for i in idx], run.processor.tokenizer.pad_token_id)
            mask = _pad([torch.ones_like(comps[i]) for i in idx], 0)
            ref = None
            if g.beta > 0:
                with torch.no_grad(), run.model.disable_adapter():
                    ref = completion_logps(run.model, prompt, ids, mask, gen.temperature, g.logprob_chunk_tokens)
            logps = completion_logps(run.model, prompt, ids, mask, gen.temperature, g.logprob_chunk_tokens,
                                     checkpoint_layers=run.recipe.model.gradient_checkpointing)
            loss, _ = paper_loss_before_issue_16(logps, ref, adv[idx], mask, g.beta, "sequence", normaliser)
            loss.backward()
            total += float(loss.detach())
    return total


@pytest.mark.parametrize("beta", [0.04, 0.0], ids=["paper-beta>0", "beta0-skipping"])
def test_each_step_has_the_papers_gradients_to_the_bit(tiny_model_dir, synth_dir, tmp_path, monkeypatch, beta):
    """beta > 0: the paper's recipe (nothing skipped). beta = 0: zero-advantage groups are skipped (auto), and
    the gradients still equal those of the full loop, which runs them."""
    seen, compared = {}, []
    real_generate, real_advantages, real_update = RolloutEngine.generate, grpo._advantages, grpo._update

    def generate(self, prompts, group_size, *a, **kw):
        seen["prompts"], seen["roll"] = prompts, real_generate(self, prompts, group_size, *a, **kw)
        return seen["roll"]

    def advantages(run, rewards):
        out = real_advantages(run, rewards)
        seen["adv"] = out[0]
        return out

    def update(run, loss_sum):
        ours = [p.grad for p in run.params]  # None where no micro-batch ran (all skipped)
        run.optimizer.zero_grad(set_to_none=True)
        theirs_loss = paper_step_gradients(run, seen["prompts"], seen["roll"].completions, seen["adv"])
        theirs = [p.grad for p in run.params]
        compared.append(all(torch.equal(torch.zeros_like(b) if a is None else a, b) for a, b in zip(ours, theirs))
                        and loss_sum == theirs_loss)
        for p, grad in zip(run.params, ours):
            p.grad = grad
        return real_update(run, loss_sum)

    monkeypatch.setattr(RolloutEngine, "generate", generate)
    monkeypatch.setattr(grpo, "_advantages", advantages)
    monkeypatch.setattr(grpo, "_update", update)
    out = tmp_path / "run"
    recipe = dict(schedule__max_steps=3, grpo__beta=beta, grpo__micro_batch_size=2,
                  grpo__rewards={"rewards_for_tests:tied_on_some_ids": 1.0})
    res = train(tiny_recipe(tiny_model_dir, synth_dir, out, **recipe))
    assert compared == [True, True, True]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the test needs a step with one tied group (the normaliser still counts the skipped completions) and one
    # where every group is tied (nothing runs: the update must still see zero gradients)
    assert sorted(r["zero_advantage_groups"] for r in rows) == [1, 1, 2], "see rewards_for_tests.tied_on_some_ids"
    assert [r["skipped_groups"] for r in rows] == ([r["zero_advantage_groups"] for r in rows] if beta == 0 else [0, 0, 0])
    if beta == 0:  # and the whole run, optimizer steps included, equals one that skips nothing
        full = train(tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "full", grpo__skip_zero_advantage_groups=False,
                                 **recipe))
        assert compared == [True] * 6
        ours, theirs = dict(res.model.named_parameters()), dict(full.model.named_parameters())
        assert all(torch.equal(ours[n], theirs[n]) for n in ours if "lora_" in n)
    if beta == 0:
        assert rows[-1]["skipped_token_share_run"] > 0
        assert rows[-1]["skipped_token_share_run"] == rows[-1]["zero_advantage_token_share_run"]


def test_two_updates_per_rollout_clip_outside_the_range(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    """mu = 2: the first update's ratio is exactly 1 (old log-probs from the same pass in eval mode, LoRA dropout
    0), the second's is not, and the tokens whose gradient the clip cuts are exactly those outside
    [1 - epsilon, 1 + epsilon_high] on the side their advantage pushes towards."""
    calls, update_no = [], {"n": 0}
    real_backward, real_loss = loss_pass.backward_pass, loss_pass.policy_loss

    def backward_pass(*a, **kw):
        update_no["n"] += 1
        return real_backward(*a, **kw)

    def policy_loss(logps, old, ref, adv, mask, spec, normaliser):
        logps.retain_grad()
        out = real_loss(logps, old, ref, adv, mask, spec, normaliser)
        calls.append((update_no["n"], logps, old, adv, mask, out))
        return out

    monkeypatch.setattr(grpo, "backward_pass", backward_pass)
    monkeypatch.setattr(loss_pass, "policy_loss", policy_loss)
    out = tmp_path / "run"
    res = train(tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=2, schedule__learning_rate=0.05,
                            grpo__beta=0.0, grpo__num_iterations=2, grpo__epsilon=0.2, grpo__epsilon_high=0.28,
                            grpo__micro_batch_size=2))
    assert res.steps_done == 2 and {n for n, *_ in calls} == {1, 2, 3, 4}
    clipped_seen = free_seen = 0
    for n, logps, old, adv, mask, o in calls:
        real = mask.bool()
        assert old is not None
        ratio, a = o.ratio, adv[:, None].expand_as(mask)
        if n % 2 == 1:  # the first update of a step
            assert torch.all(ratio[real] == 1.0) and not (o.clipped_low | o.clipped_high).any()
            continue
        assert (ratio[real] - 1).abs().max() > 1e-3, "the second update's ratio moved"
        outside_low, outside_high = (ratio < 0.8) & (a < 0) & real, (ratio > 1.28) & (a > 0) & real
        assert torch.equal(o.clipped_low & real, outside_low) and torch.equal(o.clipped_high & real, outside_high)
        clipped = outside_low | outside_high
        assert torch.all(logps.grad[clipped] == 0)
        free = real & ~clipped & (a != 0)
        assert torch.all(logps.grad[free] != 0)
        clipped_seen += int(clipped.sum())
        free_seen += int(free.sum())
    assert clipped_seen > 0 and free_seen > 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["updates"]) == 2 for r in rows)
    assert any(r["clip_ratio/region"] > 0 for r in rows)
    # the schedule runs over the 4 updates: cosine from 0.05, one value per update
    lrs = [u["lr"] for r in rows for u in r["updates"]]
    assert lrs == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


@pytest.mark.parametrize("overrides", [
    {"grpo__loss_type": "grpo", "grpo__importance_sampling_level": "sequence"},
    {"grpo__loss_type": "bnpo", "grpo__scale_rewards": "batch"},
    {"grpo__loss_type": "dr_grpo", "grpo__scale_rewards": "none"},
    {"grpo__loss_type": "dapo", "grpo__epsilon_high": 0.28, "grpo__mask_truncated_completions": True},
    {"grpo__loss_type": "cispo", "grpo__epsilon_high": 5.0},
    {"grpo__loss_type": "sapo"},
], ids=lambda o: o["grpo__loss_type"])
def test_a_few_steps_of_each_loss_type_give_finite_losses(tiny_model_dir, synth_dir, tmp_path, overrides):
    out = tmp_path / "run"
    res = train(tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=2, grpo__num_iterations=2,
                            grpo__micro_batch_size=2, **overrides))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert res.steps_done == 2 and len(rows) == 2
    for r in rows:
        assert all(math.isfinite(u["loss"]) and math.isfinite(u["grad_norm"]) for u in r["updates"])
        assert not r["skipped_step"]
        if not r.get("masked_truncated_completions"):  # every completion masked leaves no gradient at all
            assert r["grad_norm"] > 0


def test_two_updates_per_rollout_resume_where_they_stopped(tiny_model_dir, synth_dir, tmp_path):
    """Checkpoints fall between steps, so a step's mu updates never straddle a resume; the learning-rate
    schedule (steps x mu updates) continues where it was."""
    import shutil

    from safetensors.torch import load_file

    over = dict(grpo__num_iterations=2, grpo__micro_batch_size=2, grpo__epsilon_high=0.28)
    straight = train(tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "straight", **over))
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-000002", split / "checkpoints" / "step-000002")
    resumed = train(tiny_recipe(tiny_model_dir, synth_dir, split, **over), resume="auto")
    a, b = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (straight, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    rows = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [u["lr"] for u in rows[-1]["updates"]] == pytest.approx([u["lr"] for u in first[-1]["updates"]])
