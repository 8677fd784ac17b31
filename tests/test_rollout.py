"""The rollout engine samples what `generate` would: same filtered distribution, same greedy tokens."""

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from echoink_lite.rollout import RolloutEngine, SamplingParams, filtered_probs, sample_next

SETTINGS = [  # (temperature, top_k, top_p): the paper's, and each filter alone
    (1.0, 50, 0.95),
    (0.7, 0, 0.9),
    (1.3, 20, 1.0),
    (1.0, 0, 1.0),
]


def hf_probs(logits, temperature, top_k, top_p, suppress):
    procs = [SuppressTokensLogitsProcessor(suppress, device="cpu")] if suppress else []
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return LogitsProcessorList(procs)(ids, logits.clone()).softmax(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filtered_distribution_equals_transformers_processors(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 3
    suppress = [3, 7, 250]
    p = SamplingParams(max_new_tokens=1, eos_id=0, pad_id=0, temperature=temperature, top_k=top_k, top_p=top_p,
                       suppress_ids=tuple(suppress))
    ours = filtered_probs(logits, p)
    ref = hf_probs(logits, temperature, top_k, top_p, suppress)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert torch.all(ours[:, suppress] == 0)
    if top_p < 1.0 or top_k:
        assert (ours > 0).sum(-1).max() < 300 - len(suppress)  # the filters removed something


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 0.95), (0.7, 50, 1.0), (1.0, 0, 0.95)])
def test_filtered_distribution_equals_transformers_on_bf16_logits_with_ties(temperature, top_k, top_p):
    """Vocab-sized rows rounded to bf16 (what lm_head gives in a bf16 run): many tokens tie with the k-th value
    and at the top-p cut. transformers keeps every token tied with the k-th, and its top-p sort decides which
    tied tokens fall on which side of the cut; the engine must keep the same set."""
    g = torch.Generator().manual_seed(0)
    vocab, rows = 152064, 64  # Qwen2.5-Omni-7B's vocabulary
    logits = (torch.randn(rows, vocab, generator=g) * 3).bfloat16().float()
    suppress = [3, 7, 151646]
    p = SamplingParams(max_new_tokens=1, eos_id=0, pad_id=0, temperature=temperature, top_k=top_k, top_p=top_p,
                       suppress_ids=tuple(suppress))
    ours = filtered_probs(logits, p)
    ref = hf_probs(logits, temperature, top_k, top_p, suppress)
    if top_k:
        scaled = logits / temperature
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        assert int(((scaled >= kth).sum(-1) > top_k).sum()) >= rows // 2, "too few rows tie at the k-th value"
    assert torch.equal(ours > 0, ref > 0), "the kept tokens differ from transformers'"
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert torch.all(ours[:, suppress] == 0)


def test_sampler_draws_from_the_filtered_distribution_and_records_unfiltered_logps():
    torch.manual_seed(0)
    # token 1 (suppressed) would be the likeliest; tokens 5 and 6 tie for 6th place, so top-k 6 keeps both
    row = torch.tensor([[1.8, 4.0, 1.6, 1.4, 1.2, 1.0, 1.0, 0.5, 0.3, -1.0, -2.0, 2.0]])
    p = SamplingParams(max_new_tokens=1, eos_id=0, pad_id=0, temperature=0.8, top_k=6, top_p=0.95, suppress_ids=(1,))
    n = 40000
    tokens, logps = sample_next(row.repeat(n, 1), p, torch.tensor([1]))
    freq = torch.bincount(tokens, minlength=12).float() / n
    expected = filtered_probs(row, p)[0]
    assert (expected > 0).tolist() == [True, False, True, True, True, True, True] + [False] * 4 + [True]
    assert torch.all(freq[expected == 0] == 0), "a filtered-out or suppressed token was drawn"
    assert (freq - expected).abs().max() < 0.01
    # the recorded log-prob is the temperature-scaled, unfiltered one (what the loss pass computes)
    torch.testing.assert_close(logps, torch.log_softmax(row / 0.8, -1)[0, tokens])


def _hf_greedy(model, proc, encoded, group, max_new, eos_id, suppress):
    from echoink_lite.prompting import collate, completion_mask, to_device

    batch = to_device(collate(encoded, group, proc.tokenizer.pad_token_id), "cpu", torch.float32)
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, eos_token_id=eos_id,
                             pad_token_id=proc.tokenizer.pad_token_id, suppress_tokens=list(suppress) or None,
                             temperature=None, top_p=None, top_k=None)
    comp = out[:, batch["input_ids"].shape[1]:]
    mask = completion_mask(comp, eos_id)
    return [c[: int(m.sum())].tolist() for c, m in zip(comp, mask)]


def test_greedy_rollouts_are_token_identical_to_generate(backend_setup):
    """Under every attention backend the recipe accepts: `generate` builds its own masks for the backend, the
    engine builds them in attention.layer_mask."""
    from echoink_lite.modeling import multimodal_token_ids

    proc, model, encoded, prompts = backend_setup
    tok = proc.tokenizer
    max_new = 10
    unused = tok.convert_tokens_to_ids("<|VIDEO|>")
    # Pick an EOS that greedy decoding emits mid-sequence in some rows but not all (early EOS), and
    # suppress the token greedy decoding emits most (so suppression changes the output).
    free = _hf_greedy(model, proc, encoded, 1, max_new, unused, [])
    counts = torch.bincount(torch.tensor([t for c in free for t in c]))
    top = int(counts.argmax())
    suppress = tuple(multimodal_token_ids(tok)) + (top,)
    unsuppressed = _hf_greedy(model, proc, encoded, 1, max_new, unused, list(multimodal_token_ids(tok)))
    candidates = [t for c in unsuppressed for t in c[1:-1] if t != top]
    eos = max(set(candidates), key=lambda t: sum(t in c for c in unsuppressed))
    ref = _hf_greedy(model, proc, encoded, 2, max_new, eos, list(suppress))
    assert any(len(c) < max_new for c in ref), "no early EOS: the test would not cover it"
    assert any(len(c) == max_new for c in ref), "every row stopped early"
    assert ref != _hf_greedy(model, proc, encoded, 2, max_new, eos, list(multimodal_token_ids(tok)))

    p = SamplingParams(max_new_tokens=max_new, eos_id=eos, pad_id=tok.pad_token_id, do_sample=False, suppress_ids=suppress)
    for batch_size in (6, 4):  # one decode batch; and groups split over batches
        res = RolloutEngine(model, p, batch_size=batch_size, cuda_graph=False).generate(prompts, group_size=2)
        assert [c.tolist() for c in res.completions] == ref
        assert res.path == "eager" and res.tokens == sum(len(c) for c in ref)
        assert all(len(lp) == len(c) and torch.all(lp <= 0) for lp, c in zip(res.logps, res.completions))


def test_fixed_seed_gives_the_same_sampled_completions(engine_setup):
    proc, model, _, prompts = engine_setup
    p = SamplingParams(max_new_tokens=8, eos_id=proc.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                       pad_id=proc.tokenizer.pad_token_id, temperature=1.0, top_k=50, top_p=0.95)
    engine = RolloutEngine(model, p, batch_size=8, cuda_graph=False)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append([c.tolist() for c in engine.generate(prompts, group_size=4).completions])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len({tuple(c) for c in runs[0]}) > 1  # samples, not copies


def test_a_checkpoints_generation_config_cannot_change_what_is_sampled(engine_setup):
    """`generate` merges the checkpoint's generation_config into every call (a repetition_penalty there would
    silently change the sampling the loss assumes); the engine samples from SamplingParams alone."""
    from echoink_lite.thinker_forward import thinker_of

    proc, model, encoded, prompts = engine_setup
    tok = proc.tokenizer
    eos = tok.convert_tokens_to_ids("<|VIDEO|>")  # never emitted: full-length rows
    p = SamplingParams(max_new_tokens=8, eos_id=eos, pad_id=tok.pad_token_id, do_sample=False)
    engine = RolloutEngine(model, p, batch_size=8, cuda_graph=False)
    before = [c.tolist() for c in engine.generate(prompts, group_size=1).completions]
    hf_before = _hf_greedy(model, proc, encoded, 1, 8, eos, [])
    cfg = thinker_of(model).generation_config
    saved = (cfg.repetition_penalty, cfg.no_repeat_ngram_size)
    try:
        cfg.repetition_penalty, cfg.no_repeat_ngram_size = 5.0, 1
        assert _hf_greedy(model, proc, encoded, 1, 8, eos, []) != hf_before  # generate does take them
        assert [c.tolist() for c in engine.generate(prompts, group_size=1).completions] == before
    finally:
        cfg.repetition_penalty, cfg.no_repeat_ngram_size = saved
