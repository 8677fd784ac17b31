#!/usr/bin/env python
"""How far the rollout engine's recorded log-probs are from the loss pass's, in bf16 and fp32.

    python benchmarks/old_logps_bf16.py [--out FILE.json] [--groups 4] [--group-size 8] [--max-new 24]

With grpo.num_iterations > 1 the clipped ratio needs the rollout policy's log-probs. Two sources exist: the
engine records each sampled token's log-prob while decoding (`RolloutResult.logps`: one token at a time
against its KV cache), and a no-grad pass of the policy over the finished completions (`loss.completion_logps`,
the loss pass's own code). This script samples completions with the engine and compares both, on the real
tokens, for the tiny Qwen2.5-Omni thinker (echoink_lite/tiny.py, random weights, LoRA with random non-zero
weights as in tests/conftest.py) loaded through the kit's loader in bf16 and fp32, with and without the NF4
language model, on the synthetic data. It
prints (and writes with --out) the largest and mean |difference| and the share of tokens whose ratio
exp(difference) lies outside [0.8, 1.28] (TRL's and DAPO's clip range) and outside [0.99, 1.01].

The tiny model has 4 layers of width 128; the 7B's 28 layers of width 3584 accumulate rounding differently,
so these figures say whether the two paths agree to rounding, not how large the gap is on the 7B.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def measure(dtype: str, four_bit: bool, model_dir: Path, data_dir: Path, groups: int, group_size: int, max_new: int,
            seed: int) -> dict:
    from echoink_lite.data import scan_split
    from echoink_lite.loss import completion_logps
    from echoink_lite.modeling import add_lora, load_processor, load_thinker, multimodal_token_ids, torch_dtype
    from echoink_lite.prompting import encode_example
    from echoink_lite.recipe import LoraSection, QuantizationSection
    from echoink_lite.rollout import RolloutEngine, SamplingParams
    from echoink_lite.row_media import load_example
    from echoink_lite.thinker_forward import encode_prompts

    proc = load_processor(str(model_dir))
    tok = proc.tokenizer
    model = load_thinker(str(model_dir), dtype=dtype, quantization=QuantizationSection(load_in_4bit=four_bit),
                         device="cpu")
    model = add_lora(model, LoraSection(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False, seed=seed)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.05)
    rows = scan_split(data_dir / "train").rows[:groups]
    encoded = [encode_example(proc, load_example(r, 1.0)) for r in rows]
    prompts = encode_prompts(model, encoded, "cpu", torch_dtype(dtype))
    params = SamplingParams(max_new_tokens=max_new, eos_id=tok.convert_tokens_to_ids("<|im_end|>"),
                            pad_id=tok.pad_token_id, temperature=1.0, top_k=50, top_p=0.95,
                            suppress_ids=tuple(multimodal_token_ids(tok)))
    res = RolloutEngine(model, params, batch_size=groups * group_size, cuda_graph=False).generate(prompts, group_size)
    model.eval()  # as loss_pass.rollout_logps computes the old log-probs
    diffs = []
    with torch.no_grad():
        for gi, prompt in enumerate(prompts):
            comps = res.completions[gi * group_size:(gi + 1) * group_size]
            width = max(c.numel() for c in comps)
            ids = torch.full((len(comps), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(comps), width, dtype=torch.long)
            for i, c in enumerate(comps):
                ids[i, : c.numel()], mask[i, : c.numel()] = c, 1
            forward = completion_logps(model, prompt, ids, mask, 1.0, 256)
            for i, c in enumerate(comps):
                diffs.append(forward[i, : c.numel()] - res.logps[gi * group_size + i])
    d = torch.cat(diffs).double()
    ratio = d.exp()
    return {"dtype": dtype, "nf4": four_bit, "tokens": int(d.numel()),
            "share_identical": float((d == 0).double().mean()), "max_abs_diff": float(d.abs().max()),
            "mean_abs_diff": float(d.abs().mean()),
            "share_ratio_outside_0.8_1.28": float(((ratio < 0.8) | (ratio > 1.28)).double().mean()),
            "share_ratio_outside_0.99_1.01": float(((ratio < 0.99) | (ratio > 1.01)).double().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from echoink_lite.synth import synth_command
    from echoink_lite.tiny import build_tiny_thinker

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_thinker(Path(tmp) / "tiny")
        synth_command(Path(tmp) / "data", train=args.groups, valid=1, seed=args.seed)
        results = [measure(dt, q, model_dir, Path(tmp) / "data", args.groups, args.group_size, args.max_new, args.seed)
                   for dt, q in (("bfloat16", False), ("bfloat16", True), ("float32", False), ("float32", True))]
    for r in results:
        print(json.dumps(r))
    if args.out:
        tmp_out = args.out.with_name(f".{args.out.name}.tmp")
        tmp_out.write_text(json.dumps(results, indent=2) + "\n")
        tmp_out.replace(args.out)


if __name__ == "__main__":
    main()
