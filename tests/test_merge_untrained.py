"""An untrained adapter (every LoRA B still zero, as after `demo --quick`) merges exactly and is reported as
such in one line, not as a failure per tensor; an adapter with only some B zero still fails verification."""

import io

import torch
from rich.console import Console

from echoink_lite.merge import merge_adapter
from echoink_lite.recipe import LoraSection


def save_adapter(base_dir, out, zero_b_every: int):
    """A LoRA adapter whose B is zero on every `zero_b_every`-th target (1: all of them, LoRA's initial state)."""
    from echoink_lite.modeling import add_lora, load_thinker

    model = add_lora(load_thinker(str(base_dir), dtype="float32", device="cpu"), LoraSection(r=4, alpha=8),
                     gradient_checkpointing=False, seed=0)
    g = torch.Generator().manual_seed(0)
    b_names = [n for n, _ in model.named_parameters() if "lora_B" in n]
    params = dict(model.named_parameters())
    for i, name in enumerate(b_names):
        if i % zero_b_every:
            params[name].data = torch.randn(params[name].shape, generator=g) * 0.05
    model.save_pretrained(out)
    return out


def test_untrained_adapter_is_one_line_not_a_failure(tiny_model_dir, tmp_path):
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", zero_b_every=1)
    console = Console(file=io.StringIO(), width=200)
    report = merge_adapter(str(adapter), str(tmp_path / "merged"), format="thinker", dtype="fp32", verify=True, console=console)
    out = console.file.getvalue()
    weights = report["verification"]["weights"]
    assert weights["untrained_adapter"] is True and weights["problems"] == []
    assert report["ok"] is True  # the merged weights are exactly base + adapter (= base)
    assert "FAIL" not in out and "B = 0?" not in out
    assert out.count("untrained adapter: all 28 LoRA B matrices are zero") == 1


def test_some_zero_b_targets_fail_with_one_summary_line(tiny_model_dir, tmp_path):
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", zero_b_every=2)
    console = Console(file=io.StringIO(), width=300)
    report = merge_adapter(str(adapter), str(tmp_path / "merged"), format="thinker", dtype="fp32", verify=True, console=console)
    weights = report["verification"]["weights"]
    assert report["ok"] is False and weights["untrained_adapter"] is False
    assert weights["lora_tensors_changed"] == 14
    assert weights["problems"] == [weights["problems"][0]] and weights["problems"][0].startswith("14 of 28 LoRA targets have B = 0")


def test_an_untrained_merge_is_never_pushed(monkeypatch, tmp_path):
    import echoink_lite.export as export
    import echoink_lite.merge as merge
    from echoink_lite.cli import main

    report = {"ok": True, "verification": {"weights": {"untrained_adapter": True}}}
    monkeypatch.setattr(merge, "merge_adapter", lambda *a, **k: report)
    pushed = []
    monkeypatch.setattr(export, "push_to_hub", lambda *a, **k: pushed.append(a) or "https://hub/me/model")
    args = ["merge", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m"), "--push-to-hub", "me/model"]
    assert main(args) == 1
    assert pushed == []
    report["verification"]["weights"]["untrained_adapter"] = False  # a trained one is pushed
    assert main(args) == 0 and len(pushed) == 1
