"""The loss variants against TRL 1.16's own code, and the paper's loss unchanged to the bit.

TRL's `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py) needs a trainer only for its settings and
for the model's per-token log-probs, so it is called here with a stub `self` whose log-prob method returns
the test's tensor. A step is simulated as TRL runs it: each process calls `_compute_loss` once per
micro-batch (its gradient-accumulation steps) and DDP averages the gradients over processes; the kit's
micro-batch losses are summed over the same micro-batches and processes (its all-reduce is a sum).
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from echoink_lite.loss import grpo_loss
from echoink_lite.loss_variants import LossSpec, advantages, policy_loss, step_normaliser, truncated

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
MAX_LEN = 7


def trl_loss(spec: LossSpec, logps, old, ref, adv, mask, grad_accum: int, processes: int, num_items: float):
    """TRL 1.16's `GRPOTrainer._compute_loss` on one micro-batch, with a stub trainer holding `spec`."""
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=spec.importance_sampling_level, beta=spec.beta, loss_type=spec.loss_type,
        epsilon_low=spec.epsilon_low, epsilon_high=spec.epsilon_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=grad_accum,
                             sapo_temperature_pos=spec.sapo_temperature_pos, sapo_temperature_neg=spec.sapo_temperature_neg),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum, max_completion_length=spec.max_completion_length,
        accelerator=SimpleNamespace(num_processes=processes, gather=lambda t: t, reduce=lambda t, reduction: t),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
    )
    b, width = logps.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, width, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "num_items_in_batch": torch.tensor(float(num_items), dtype=logps.dtype)}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(stub, None, inputs)


def step_tensors(seed=0, processes=2, groups=2, group_size=4, micro=2, masked_rows=()):
    """One step's tensors: completions of lengths 1..MAX_LEN, logps near the old and reference ones (within the
    clip range for some tokens, outside for others), one group whose advantages are all 0."""
    g = torch.Generator().manual_seed(seed)
    n = processes * groups * group_size
    lengths = torch.randint(1, MAX_LEN + 1, (n,), generator=g)
    lengths[0] = MAX_LEN
    mask = (torch.arange(MAX_LEN)[None] < lengths[:, None]).long()
    for r in masked_rows:
        mask[r] = 0
    logps = (-torch.rand(n, MAX_LEN, generator=g, dtype=torch.float64) * 3) * mask
    old = logps + torch.randn(n, MAX_LEN, generator=g, dtype=torch.float64) * 0.3
    ref = logps + torch.randn(n, MAX_LEN, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    adv[group_size: 2 * group_size] = 0.0  # a group whose completions all got the same reward
    # micro-batches as the kit cuts them: `micro` completions of one group; processes take whole groups
    mbs = [list(range(s, s + micro)) for s in range(0, n, micro)]
    per_process = len(mbs) // processes
    return SimpleNamespace(logps=logps, old=old, ref=ref, adv=adv, mask=mask, mbs=mbs, processes=processes,
                           per_process=per_process)


def run_both(spec: LossSpec, t, with_old: bool, with_ref: bool):
    """(kit loss, kit grad, TRL loss, TRL grad) over the whole simulated step."""
    kit_leaf = t.logps.clone().requires_grad_(True)
    trl_leaf = t.logps.clone().requires_grad_(True)
    normaliser = step_normaliser(spec, completions=len(t.adv), tokens=float(t.mask.sum()), micro_batches=len(t.mbs))
    kit_total = trl_total = 0.0
    for p in range(t.processes):
        for idx in t.mbs[p * t.per_process:(p + 1) * t.per_process]:
            old = t.old[idx] if with_old else None
            ref = t.ref[idx] if with_ref else None
            out = policy_loss(kit_leaf[idx], old, ref, t.adv[idx], t.mask[idx], spec, normaliser)
            out.loss.backward()
            kit_total += float(out.loss.detach())
            loss = trl_loss(spec, trl_leaf[idx], old, ref, t.adv[idx], t.mask[idx], grad_accum=t.per_process,
                            processes=t.processes, num_items=float(t.mask.sum()))
            (loss / t.processes).backward()  # DDP: the mean of the processes' gradients
            trl_total += float(loss.detach()) / t.processes
    return kit_total, kit_leaf.grad, trl_total, trl_leaf.grad


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old", [False, True], ids=["one-update", "old-logps"])
def test_loss_and_gradient_equal_trl_over_micro_batches_and_processes(loss_type, level, with_old):
    spec = LossSpec(loss_type, level, beta=0.04, epsilon_low=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28,
                    max_completion_length=MAX_LEN)
    t = step_tensors(masked_rows=(5,))
    kit, kit_grad, trl, trl_grad = run_both(spec, t, with_old, with_ref=True)
    assert kit == pytest.approx(trl, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(kit_grad, trl_grad, rtol=1e-11, atol=1e-14)
    assert kit_grad.abs().sum() > 0
    assert torch.all(kit_grad[t.mask == 0] == 0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_without_kl_too(loss_type):
    spec = LossSpec(loss_type, beta=0.0, epsilon_high=5.0 if loss_type == "cispo" else 0.2, max_completion_length=MAX_LEN)
    kit, kit_grad, trl, trl_grad = run_both(spec, step_tensors(seed=1), with_old=True, with_ref=False)
    assert kit == pytest.approx(trl, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(kit_grad, trl_grad, rtol=1e-11, atol=1e-14)


def test_the_normaliser_is_the_steps_not_the_micro_batchs():
    """dr_grpo divides by max_completion_length x ALL completions of the step, dapo by all its tokens: a loss
    normalised per micro-batch would give each micro-batch equal weight whatever its size."""
    spec = LossSpec("dr_grpo", beta=0.0, max_completion_length=MAX_LEN)
    t = step_tensors(seed=2)
    assert step_normaliser(spec, len(t.adv), float(t.mask.sum()), len(t.mbs)) == len(t.adv) * MAX_LEN
    leaf = t.logps.clone().requires_grad_(True)
    for idx in t.mbs:
        policy_loss(leaf[idx], None, None, t.adv[idx], t.mask[idx], spec, len(t.adv) * MAX_LEN).loss.backward()
    # d loss / d logp = -A / (L_max x completions) on every real token, the same in every micro-batch
    expected = -t.adv[:, None].expand_as(leaf) / (MAX_LEN * len(t.adv)) * t.mask
    torch.testing.assert_close(leaf.grad, expected)
    spec = LossSpec("dapo", beta=0.0)
    assert step_normaliser(spec, len(t.adv), float(t.mask.sum()), len(t.mbs)) == float(t.mask.sum())


def test_kl_keeps_the_papers_clamp_which_trl_does_not_have():
    """The one deliberate difference: x = ref - logp is clamped to [-10, 10] (EchoInk-R1's trainer)."""
    logps = torch.tensor([[-0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-0.5, -13.0]], dtype=torch.float64)
    spec = LossSpec("dapo", beta=1.0)
    out = policy_loss(logps, None, ref, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.long), spec, 2.0)
    x = torch.tensor(-10.0, dtype=torch.float64)
    assert float(out.kl[0, 1].detach()) == pytest.approx(float(torch.exp(x) - x - 1))
    theirs = trl_loss(spec, logps, None, ref, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.long), 1, 1, 2)
    assert float(theirs.detach()) > float(out.loss.detach())  # TRL's unclamped KL of x = -12 is larger


# ---- the paper's loss, bit for bit --------------------------------------------------------------------
def paper_loss_before_issue_16(logps, ref_logps, advantages, mask, beta, loss_type, normaliser):
    """loss.grpo_loss as it was before the loss variants (git history: echoink_lite/loss.py at 53fed9d)."""
    ratio = torch.exp(logps - logps.detach())
    per_token = -ratio * advantages.unsqueeze(1)
    kl = torch.zeros_like(logps)
    if beta > 0 and ref_logps is not None:
        log_ratio = (ref_logps - logps).clamp(-10, 10)
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
    maskf = mask.float()
    if loss_type == "sequence":
        per_seq = (per_token * maskf).sum(1) / maskf.sum(1).clamp(min=1)
        return per_seq.sum() / normaliser, kl
    return (per_token * maskf).sum() / normaliser, kl


@pytest.mark.parametrize("beta", [0.001, 0.0])
@pytest.mark.parametrize("old_name, new_name", [("sequence", "grpo"), ("token", "dapo")])
def test_the_papers_loss_and_gradients_are_unchanged_to_the_bit(beta, old_name, new_name):
    g = torch.Generator().manual_seed(4)
    logps = -torch.rand(6, 9, generator=g) * 4
    mask = (torch.arange(9)[None] < torch.tensor([9, 1, 4, 7, 2, 9])[:, None]).long()
    ref = logps + torch.randn(6, 9, generator=g)
    adv = torch.randn(6, generator=g)
    results = []
    for fn, name in ((paper_loss_before_issue_16, old_name), (grpo_loss, old_name), (grpo_loss, new_name),
                     (lambda *a: (policy_loss(a[0], None, a[1], a[2], a[3], LossSpec(new_name, beta=beta), a[6]).loss, None),
                      None)):
        leaf = logps.clone().requires_grad_(True)
        loss, _ = fn(leaf, ref, adv, mask, beta, name, 24.0)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


# ---- advantages and truncation, against TRL's formulas ---------------------------------------------
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_follow_trls_scale_rewards(scale):
    """TRL 1.16, GRPOTrainer._generate_and_score_completions (sum_then_normalize): r - group mean, divided by
    nanstd(group) + 1e-4 ('group'), nanstd(all rewards) + 1e-4 ('batch'), or not ('none')."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 1.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 1.0, 0.5])
    ours, _ = advantages(rewards, 4, scale, 1e-4)
    mean = rewards.view(-1, 4).mean(1).repeat_interleave(4)
    std = {"group": nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4), "batch": nanstd(rewards).expand(12)}
    theirs = rewards - mean
    if scale != "none":
        theirs = theirs / (std[scale] + 1e-4)
    torch.testing.assert_close(ours, theirs)
    assert torch.all(ours[4:8] == 0)  # the tied group: every advantage exactly 0


def test_truncated_completions_are_those_without_eos():
    eos = 7
    comps = [torch.tensor([1, 2, eos]), torch.tensor([3, 4, 5]), torch.tensor([eos]), torch.tensor([1])]
    assert truncated(comps, eos).tolist() == [False, True, False, True]
