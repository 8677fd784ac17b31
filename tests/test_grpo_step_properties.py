"""What a GRPO step must get right, checked through the real loop (`train` -> `grpo_step`) with completions
that end at different lengths, at temperature 0.7, with micro-batches smaller than a group.

Every tiny run elsewhere has all completions at the length cap, so the length-sorted micro-batches never
reorder anything and a per-micro-batch mean equals the step's mean. Here the model is biased toward EOS
(conftest `eos_biased_model_dir`) and the reward depends on the solution (`solution_keyed`), and each
property is compared with a reference computed by hand, one completion at a time, in rollout order:

1. each completion keeps its own advantage (the step's LoRA gradient equals the by-hand gradient);
2. each completion is scored against its own prompt's solution (completion i against prompt i // group);
3. the reference pass is the base model, adapter off (KL > 0 after one update, and equal to the by-hand KL);
4. the loss pass uses generation.temperature (the rollout's log-probs equal the policy pass's);
5. suppressed multimodal markers are never sampled, although the model makes one likely;
6. `sequence` averages over the step's completions and `token` over the step's tokens, not per micro-batch
   (the step's loss and gradient equal the by-hand ones for both).
"""

import json
from dataclasses import dataclass, field

import pytest
import torch

import echoink_lite.grpo as grpo
import echoink_lite.loss_pass as loss_pass
from echoink_lite.loss import completion_logps
from echoink_lite.modeling import multimodal_token_ids
from echoink_lite.rollout import RolloutEngine
from echoink_lite.thinker_forward import CaptureKV, language_model, rope, run_layers, thinker_of
from rewards_for_tests import solution_keyed
from test_grpo import tiny_recipe

GROUP, TEMPERATURE, BETA = 4, 0.7, 0.04
CHECKED_STEP = 2  # after one update: the adapter is non-zero, so the KL to the base is too


@dataclass
class Observed:
    """What `train` did, step by step, recorded by spies on its parts."""

    recipe: object
    tokenizer: object = None
    model: object = None
    rows: list = field(default_factory=list)  # per step: the Row of each prompt
    prompts: list = field(default_factory=list)  # per step: PromptInputs
    rollouts: list = field(default_factory=list)  # per step: RolloutResult
    policy_calls: list = field(default_factory=list)  # per step: [(prompt, ids, mask, logps)]
    step_grads: dict = field(default_factory=dict)  # the step's LoRA gradient, before clipping
    hand: dict = field(default_factory=dict)  # the by-hand reference of the same step
    metrics: list = field(default_factory=list)


def by_hand(model, tokenizer, rows, prompts, completions, loss_type):
    """Rewards, advantages, loss, mean KL per token and LoRA gradients of one step, computed one completion at
    a time in rollout order (no sorting, no micro-batches): completion i belongs to prompt i // GROUP."""
    n = len(completions)
    texts = [tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in completions]
    rewards = torch.tensor(solution_keyed(texts, [rows[i // GROUP].solution for i in range(n)]))
    grouped = rewards.view(-1, GROUP)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    tokens = sum(int(c.numel()) for c in completions)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    loss = kl_sum = 0.0
    for i, comp in enumerate(completions):
        ids, mask = comp[None], torch.ones(1, comp.numel(), dtype=torch.long)
        with torch.no_grad(), model.disable_adapter():
            ref = completion_logps(model, prompts[i // GROUP], ids, mask, TEMPERATURE, 1000)
        logps = completion_logps(model, prompts[i // GROUP], ids, mask, TEMPERATURE, 1000)
        log_ratio = ref - logps  # k3 estimator of KL(policy || reference)
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = -torch.exp(logps - logps.detach()) * adv[i] + BETA * kl
        part = per_token.mean() / n if loss_type == "sequence" else per_token.sum() / tokens
        part.backward()
        loss += float(part.detach())
        kl_sum += float(kl.detach().sum())
    grads = {name: p.grad.detach().clone() for name, p in params.items()}
    for p in params.values():
        p.grad = None
    return dict(rewards=rewards, advantages=adv, loss=loss, kl=kl_sum / tokens, grads=grads)


def run_and_observe(model_dir, synth_dir, out, loss_type) -> Observed:
    recipe = tiny_recipe(model_dir, synth_dir, out, schedule__max_steps=CHECKED_STEP, generation__temperature=TEMPERATURE,
                         grpo__group_size=GROUP, grpo__micro_batch_size=2, grpo__rollout_batch_size=8, grpo__beta=BETA,
                         grpo__loss_type=loss_type, grpo__rewards={"rewards_for_tests:solution_keyed": 1.0},
                         schedule__learning_rate=1e-3)  # small enough that step 2 still ends early
    seen = Observed(recipe)
    real_step_prompts, real_encode, real_generate = grpo.step_prompts, grpo.encode_prompts, RolloutEngine.generate
    real_logps, real_clip = loss_pass.completion_logps, torch.nn.utils.clip_grad_norm_

    def step_prompts(run, step):
        seen.tokenizer = run.processor.tokenizer
        rows, encoded = real_step_prompts(run, step)
        seen.rows.append(rows)
        seen.policy_calls.append([])
        return rows, encoded

    def encode_prompts(*a, **kw):
        seen.prompts.append(real_encode(*a, **kw))
        return seen.prompts[-1]

    def generate(self, *a, **kw):
        seen.model = self.model
        seen.rollouts.append(real_generate(self, *a, **kw))
        return seen.rollouts[-1]

    def logps_spy(model, prompt, ids, mask, temperature, *a, **kw):
        out = real_logps(model, prompt, ids, mask, temperature, *a, **kw)
        if torch.is_grad_enabled():  # the policy pass (the reference pass runs without gradients)
            seen.policy_calls[-1].append((prompt, ids, mask, out.detach().clone()))
        return out

    def clip(params, *a, **kw):
        if len(seen.rollouts) == CHECKED_STEP:  # the step's gradient is complete; weights not yet updated
            params = list(params)
            names = {id(p): name for name, p in seen.model.named_parameters()}
            seen.step_grads = {names[id(p)]: p.grad.detach().clone() for p in params}
            seen.hand = by_hand(seen.model, seen.tokenizer, seen.rows[-1], seen.prompts[-1],
                                seen.rollouts[-1].completions, loss_type)
            for p in params:  # put the step's own gradient back
                p.grad = seen.step_grads[names[id(p)]].clone()
        return real_clip(params, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "step_prompts", step_prompts)
        mp.setattr(grpo, "encode_prompts", encode_prompts)
        mp.setattr(RolloutEngine, "generate", generate)
        mp.setattr(loss_pass, "completion_logps", logps_spy)
        mp.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        grpo.train(recipe)
    seen.metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return seen


@pytest.fixture(scope="module", params=["sequence", "token"])
def observed(request, eos_biased_model_dir, synth_dir, tmp_path_factory):
    return run_and_observe(eos_biased_model_dir, synth_dir, tmp_path_factory.mktemp("run") / "run", request.param)


def test_completions_end_at_different_lengths_and_sorting_reorders_them(observed):
    """The precondition of the other tests: without it they could not fail."""
    for result in observed.rollouts:
        lengths = [int(c.numel()) for c in result.completions]
        assert len(set(lengths)) >= 3, lengths
        groups = [lengths[g: g + GROUP] for g in range(0, len(lengths), GROUP)]
        assert any(g != sorted(g, reverse=True) for g in groups), f"sorting by length reorders no group: {groups}"
    assert float(observed.hand["rewards"].view(-1, GROUP).std(1).min()) > 0, "a group of the checked step has no signal"


def test_each_completion_keeps_its_own_advantage_and_the_step_is_normalised_over_all_of_it(observed):
    """Properties 1 and 6: the step's gradient (sorted, micro-batched, padded) equals the by-hand gradient, and
    its loss equals the by-hand loss (mean over the step's completions for `sequence`, tokens for `token`)."""
    hand, step = observed.hand["grads"], observed.step_grads
    assert set(hand) == set(step) and all(g.abs().sum() > 0 for g in hand.values())
    for name, ref in hand.items():
        rel = float((step[name] - ref).norm() / ref.norm())
        assert rel < 1e-4, f"{name}: the step's gradient differs from the by-hand one (relative error {rel:.2e})"
    assert observed.metrics[CHECKED_STEP - 1]["loss"] == pytest.approx(observed.hand["loss"], rel=1e-4, abs=1e-7)


def test_each_completion_is_scored_against_its_own_prompts_solution(observed):
    """Property 2: the logged reward is the mean of reward(completion i, solution of prompt i // group)."""
    for step, (rows, result) in enumerate(zip(observed.rows, observed.rollouts)):
        texts = [observed.tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in result.completions]
        own = solution_keyed(texts, [rows[i // GROUP].solution for i in range(len(texts))])
        other = solution_keyed(texts, [rows[i % len(rows)].solution for i in range(len(texts))])
        assert len({r.solution for r in rows}) > 1 and sum(own) != pytest.approx(sum(other))  # the test can fail
        assert observed.metrics[step]["reward"] == pytest.approx(sum(own) / len(own), abs=1e-6)


def test_the_reference_pass_is_the_base_model(observed):
    """Property 3: after one update the policy differs from the base, so the KL is above zero; it equals the
    by-hand KL against the model with its adapter disabled."""
    kl = observed.metrics[CHECKED_STEP - 1]["kl"]
    assert kl > 1e-6
    assert kl == pytest.approx(observed.hand["kl"], rel=1e-3)


def test_the_policy_pass_uses_the_generation_temperature(observed):
    """Property 4: at temperature 0.7 the rollout's recorded log-probs equal the policy pass's (step 1, before
    any update)."""
    result, prompts, calls = observed.rollouts[0], observed.prompts[0], observed.policy_calls[0]
    assert calls
    matched = set()
    for prompt, ids, mask, logps in calls:
        g = next(i for i, p in enumerate(prompts) if p is prompt)
        for row, m, lp in zip(ids, mask, logps):
            tokens = row[m.bool()]
            i = next(i for i in range(g * GROUP, (g + 1) * GROUP)
                     if i not in matched and torch.equal(result.completions[i], tokens))
            matched.add(i)
            torch.testing.assert_close(lp[m.bool()], result.logps[i], atol=1e-5, rtol=0)
    assert matched == set(range(len(result.completions)))


def test_suppressed_markers_are_never_sampled_although_the_model_favours_one(observed):
    """Property 5: the biased model gives <|IMAGE|> a large probability as the first completion token, yet no
    completion of the run holds a multimodal marker."""
    model, tok = observed.model, observed.tokenizer
    image = tok.convert_tokens_to_ids("<|IMAGE|>")
    lm = language_model(model)
    with torch.no_grad(), model.disable_adapter():
        for pr in observed.prompts[0]:
            h = run_layers(lm, pr.embeds[None], rope(lm, pr.embeds[None], pr.positions[:, None, :]), None, CaptureKV())
            probs = torch.softmax(thinker_of(model).lm_head(h[0, -1]).float() / TEMPERATURE, -1)
            assert probs[image] > 0.1, "the marker is not likely: the test could not fail"
    markers = torch.tensor(multimodal_token_ids(tok))
    for result in observed.rollouts:
        for c in result.completions:
            assert not torch.isin(c, markers).any(), f"a suppressed marker was sampled: {c.tolist()}"
