"""The loss pass runs exactly the forward passes its settings need, counted through the real loop.

Per micro-batch that is not skipped: mu policy passes (with gradients, adapter on); with mu = 1 no pass for
old log-probs at all (the ratio uses logp.detach(), as TRL's `old_per_token_logps is None` branch); with
mu > 1 one no-grad pass for them, once per rollout, not per update; a reference pass (adapter off) only when
beta > 0, once per rollout. An extra forward on the hot path (old log-probs at mu = 1, a reference pass at
beta = 0, the reference redone for every update) changes no loss value, so only a count can catch it.
"""

import pytest
import torch
from peft.tuners.lora import LoraLayer

import echoink_lite.grpo as grpo
import echoink_lite.loss_pass as loss_pass
from test_grpo import tiny_recipe


def _adapter_off(model) -> bool:
    return any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("mu, beta", [(1, 0.0), (1, 0.04), (2, 0.0), (2, 0.04)])
def test_forward_passes_per_step(tiny_model_dir, synth_dir, tmp_path, monkeypatch, mu, beta):
    passes, planned = [], []
    real_logps, real_plan = loss_pass.completion_logps, grpo.plan_micro_batches

    def logps_spy(model, *a, **kw):
        if torch.is_grad_enabled():
            kind = "policy"
        else:
            kind = "ref" if _adapter_off(model) else "old"
        passes.append(kind)
        return real_logps(model, *a, **kw)

    def plan_spy(*a, **kw):
        planned.append(real_plan(*a, **kw))
        return planned[-1]

    monkeypatch.setattr(loss_pass, "completion_logps", logps_spy)
    monkeypatch.setattr(grpo, "plan_micro_batches", plan_spy)
    # seed 3, step 1: prompts 11 and 15, and 15's group is tied (rewards_for_tests.tied_on_some_ids)
    grpo.train(tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "run", schedule__max_steps=1, grpo__beta=beta,
                           grpo__num_iterations=mu, grpo__micro_batch_size=2, grpo__epsilon_high=0.28,
                           grpo__rewards={"rewards_for_tests:tied_on_some_ids": 1.0}))
    (mbs,) = planned
    ran = sum(not mb.skip for mb in mbs)
    if beta == 0:
        assert ran < len(mbs), "no micro-batch was skipped: the test needs a tied group"
    else:
        assert ran == len(mbs)  # beta > 0: skipping is off unless asked for
    assert passes.count("policy") == mu * ran
    assert passes.count("old") == (ran if mu > 1 else 0)
    assert passes.count("ref") == (ran if beta > 0 else 0)
    assert len(passes) == (mu + (mu > 1) + (beta > 0)) * ran
