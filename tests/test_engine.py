"""Tower reuse and prefix sharing are exact: the loss pass equals the full thinker forward, and the rollout's
log-probs equal the loss pass's for the same tokens, under every attention backend the recipe accepts
(`backend_setup` in conftest.py). Also: the towers run once per prompt per step."""

import pytest
import torch

from echoink_lite.loss import completion_logps
from echoink_lite.rollout import RolloutEngine, SamplingParams


def full_forward_logps(model, proc, enc, comp_ids, temperature):
    """The reference: `thinker(**batch)` over prompt + completion, repeated per completion (what a plain
    transformers forward does), log-softmax over the full vocabulary."""
    from echoink_lite.prompting import collate, to_device
    from echoink_lite.thinker_forward import thinker_of

    batch = to_device(collate([enc] * comp_ids.shape[0], 1, proc.tokenizer.pad_token_id, completions=list(comp_ids)),
                      "cpu", torch.float32)
    logits = thinker_of(model)(**batch, use_cache=False).logits.float() / temperature
    width = comp_ids.shape[1]
    logits = logits[:, -width - 1: -1]
    return torch.log_softmax(logits, -1).gather(-1, comp_ids.unsqueeze(-1)).squeeze(-1)


def _pad(seqs, value):
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


@pytest.mark.parametrize("checkpoint_layers", [False, True])
def test_prefix_sharing_equals_the_full_forward_in_logps_and_lora_gradients(backend_setup, checkpoint_layers):
    proc, model, encoded, prompts = backend_setup
    torch.manual_seed(0)
    # three completions of different lengths for prompt 1 (right-padded, masked)
    comps = [torch.randint(5, 300, (n,)) for n in (7, 4, 6)]
    ids, mask = _pad(comps, proc.tokenizer.pad_token_id), _pad([torch.ones_like(c) for c in comps], 0)
    weights = torch.randn(ids.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def grads(fn):
        for p in params:
            p.grad = None
        out = fn()
        (out * weights * mask).sum().backward()
        return out.detach(), [p.grad.clone() for p in params]

    ours, g_ours = grads(lambda: completion_logps(model, prompts[1], ids, mask, 0.9, 3, checkpoint_layers=checkpoint_layers))
    ref, g_ref = grads(lambda: full_forward_logps(model, proc, encoded[1], ids, 0.9))
    torch.testing.assert_close(ours * mask, ref * mask, atol=1e-5, rtol=0)
    assert torch.all(ours[mask == 0] == 0)
    assert all(g.abs().sum() > 0 for g in g_ref), "some LoRA parameter got no gradient in the reference"
    for a, b in zip(g_ours, g_ref):
        assert float((a - b).norm() / b.norm()) < 1e-4


def test_rollout_logps_equal_the_loss_pass_logps(backend_setup):
    proc, model, _, prompts = backend_setup
    tok = proc.tokenizer
    p = SamplingParams(max_new_tokens=9, eos_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_id=tok.pad_token_id,
                       temperature=0.8, top_k=50, top_p=0.95)
    torch.manual_seed(3)
    res = RolloutEngine(model, p, batch_size=12, cuda_graph=False).generate(prompts, group_size=4)
    model.train()  # the loss pass runs in training mode (LoRA dropout is 0 here)
    with torch.no_grad():
        for gi, prompt in enumerate(prompts):
            comps = res.completions[gi * 4:(gi + 1) * 4]
            ids, mask = _pad(comps, tok.pad_token_id), _pad([torch.ones_like(c) for c in comps], 0)
            loss_pass = completion_logps(model, prompt, ids, mask, 0.8, 4)
            rollout = _pad(res.logps[gi * 4:(gi + 1) * 4], 0.0)
            torch.testing.assert_close(loss_pass * mask, rollout * mask, atol=1e-5, rtol=0)


def test_towers_run_once_per_prompt_per_step(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

    from echoink_lite.grpo import train
    from test_grpo import tiny_recipe

    seen = {"audio": 0, "vision": 0}  # clips and images the towers processed
    real_audio, real_vision = omni.Qwen2_5OmniAudioEncoder.forward, omni.Qwen2_5OmniVisionEncoder.forward

    def audio(self, input_features, feature_lens=None, *a, **kw):
        seen["audio"] += len(feature_lens)
        return real_audio(self, input_features, feature_lens, *a, **kw)

    def vision(self, hidden_states, grid_thw=None, *a, **kw):
        seen["vision"] += len(grid_thw)
        return real_vision(self, hidden_states, grid_thw, *a, **kw)

    monkeypatch.setattr(omni.Qwen2_5OmniAudioEncoder, "forward", audio)
    monkeypatch.setattr(omni.Qwen2_5OmniVisionEncoder, "forward", vision)
    recipe = tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "run", schedule__max_steps=2)
    train(recipe)
    prompts = 2 * recipe.grpo.prompts_per_step  # group 4, beta > 0: rollout, reference and policy all reuse them
    assert seen == {"audio": prompts, "vision": prompts}
