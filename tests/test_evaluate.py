"""Tests for echoink_lite.evaluate: answer parsing, metrics against hand counts, the predictions file,
resume, bad-row accounting, base-vs-adapter comparison, and a real end-to-end run of the tiny model."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from rich.console import Console

from echoink_lite import evaluate
from echoink_lite.data import scan_split
from echoink_lite.cli_eval import add_eval_arguments, eval_config_from_args
from echoink_lite.cli_eval import cmd_eval as eval_command
from echoink_lite.evaluate import EvalConfig, EvalError, evaluate_rows, load_eval_model, run_eval
from echoink_lite.rollout import RolloutEngine

LETTERS = ("A", "B", "C", "D")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None)


def wide() -> Console:
    """A console that never wraps, for checking one-line messages with long temporary paths."""
    return Console(file=io.StringIO(), width=4000, color_system=None)


def gold_letters(split_dir: Path) -> list[str]:
    (list_file,) = split_dir.glob("omni_rl_format_*.json")
    return [item["solution"][len("<answer>"):-len("</answer>")] for item in json.loads(list_file.read_text())]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# A loaded tiny model whose completions we script
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, synth_dir):
    cfg = EvalConfig(model=str(tiny_model_dir), data=str(synth_dir / "valid"))
    return load_eval_model(cfg)


class ScriptedGenerate:
    """Replaces the rollout engine's decoding (`RolloutEngine.generate_rows`): the n-th decoded sequence (in
    evaluation order) gets script(n). Install with `monkeypatch.setattr(RolloutEngine, "generate_rows", fake)`."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script
        self.calls = self.sequences = 0

    def __get__(self, engine, owner=None):  # installed on the class: called as a method
        return self if engine is None else (lambda prompts, rows, params=None: self(prompts, rows))

    def __call__(self, prompts, rows):
        from echoink_lite.rollout import RolloutResult

        self.calls += 1
        comps = []
        for _ in rows:
            comps.append(torch.tensor(self.tokenizer.encode(self.script(self.sequences) + "<|im_end|>")))
            self.sequences += 1
        return RolloutResult(comps, [torch.zeros(len(c)) for c in comps], sum(len(c) for c in comps), 0.0, "eager")


def tag(letter: str) -> str:
    return f"<think>x</think><answer>{letter}</answer>"


def test_accuracy_and_format_rate_match_a_hand_count(loaded, synth_dir, tmp_path, monkeypatch):
    model, processor = loaded
    split = synth_dir / "valid"
    gold = gold_letters(split)
    wrong = {g: LETTERS[(LETTERS.index(g) + 1) % 4] for g in LETTERS}
    # Row by row: right, right, right, wrong letter, right, no tags, lowercase in tag, right + trailing text.
    completions = [
        tag(gold[0]), tag(gold[1]), tag(gold[2]), tag(wrong[gold[3]]), tag(gold[4]),
        f"The answer is {gold[5]}", tag(gold[6].lower()), tag(gold[7]) + " done",
    ]
    fake = ScriptedGenerate(processor.tokenizer, lambda n: completions[n])
    monkeypatch.setattr(RolloutEngine, "generate_rows", fake)

    rows = scan_split(split).rows
    out = tmp_path / "pred.jsonl"
    cfg = EvalConfig(data=str(split), batch_size=3, max_new_tokens=16)
    result = evaluate_rows(model, processor, rows, cfg, out, "base", quiet())

    # Hand count: correct rows 0, 1, 2, 4, 7 (strict); format failures rows 5 and 7.
    assert result.accuracy == pytest.approx(5 / 8)
    assert result.format_failure_rate == pytest.approx(2 / 8)
    assert (result.n_rows, result.n_samples, result.generated_samples) == (8, 8, 8)
    assert fake.calls == 3  # ceil(8 / 3) decode batches
    assert result.parse_rule == "strict" and result.bad_rows == {}

    lines = read_lines(out)
    assert len(lines) == 8
    assert set(lines[0]) >= {"problem_id", "sample", "label", "completion", "parsed", "gold", "correct", "format_ok"}
    assert [line["problem_id"] for line in lines] == list(range(8))
    assert [line["completion"] for line in lines] == completions  # decoded exactly, cut at <|im_end|>
    assert [line["correct"] for line in lines] == [True, True, True, False, True, False, False, True]
    assert [line["format_ok"] for line in lines] == [True] * 5 + [False, True, False]
    assert lines[5]["parsed"] is None and lines[3]["gold"] == gold[3]
    assert {line["label"] for line in lines} == {"base"} and {line["sample"] for line in lines} == {0}

    # The same completions under the lenient rule: rows 5 and 6 now count too.
    fake2 = ScriptedGenerate(processor.tokenizer, lambda n: completions[n])
    monkeypatch.setattr(RolloutEngine, "generate_rows", fake2)
    lenient = evaluate_rows(model, processor, rows, EvalConfig(data=str(split), lenient=True), tmp_path / "l.jsonl", "base", quiet())
    assert lenient.accuracy == pytest.approx(7 / 8) and lenient.parse_rule == "lenient"


def test_k_samples_report_mean_and_spread(loaded, synth_dir, tmp_path, monkeypatch):
    model, processor = loaded
    split = synth_dir / "valid"
    gold = gold_letters(split)
    wrong = {g: LETTERS[(LETTERS.index(g) + 1) % 4] for g in LETTERS}

    def script(n):  # row-major: sequence n is row n // 2, sample n % 2
        row, k = divmod(n, 2)
        return tag(gold[row] if k == 0 or row < 2 else wrong[gold[row]])

    fake = ScriptedGenerate(processor.tokenizer, script)
    monkeypatch.setattr(RolloutEngine, "generate_rows", fake)
    rows = scan_split(split).rows[:4]
    cfg = EvalConfig(data=str(split), do_sample=True, samples=2, batch_size=4, seed=3)
    result = evaluate_rows(model, processor, rows, cfg, tmp_path / "k.jsonl", "adapter", quiet())
    assert fake.calls == 1 and fake.sequences == 8  # 4 rows x K=2 in one decode batch
    assert result.accuracy_per_sample == [1.0, 0.5]
    assert result.accuracy == pytest.approx(0.75) and result.accuracy_mean == pytest.approx(0.75)
    assert result.accuracy_spread == pytest.approx(statistics.stdev([1.0, 0.5]))
    assert sorted((line["problem_id"], line["sample"]) for line in read_lines(tmp_path / "k.jsonl")) == [
        (i, k) for i in range(4) for k in range(2)
    ]


def test_resume_generates_only_missing_rows(loaded, synth_dir, tmp_path, monkeypatch):
    model, processor = loaded
    split = synth_dir / "valid"
    monkeypatch.setattr(evaluate, "load_eval_model", lambda cfg: (model, processor))
    out = tmp_path / "pred.jsonl"
    base = dict(model="unused", data=str(split), out=str(out), batch_size=2, max_new_tokens=8)

    first = ScriptedGenerate(processor.tokenizer, lambda n: tag("A"))
    monkeypatch.setattr(RolloutEngine, "generate_rows", first)
    summary = run_eval(EvalConfig(**base, limit=4), console=quiet())
    assert first.sequences == 4 and summary["results"][0]["n_rows"] == 4

    second = ScriptedGenerate(processor.tokenizer, lambda n: tag("A"))
    monkeypatch.setattr(RolloutEngine, "generate_rows", second)
    console = quiet()
    summary = run_eval(EvalConfig(**base), console=console)
    assert (second.calls, second.sequences) == (2, 4)  # only rows 4..7
    assert "base: resuming, 4 predictions" in console.file.getvalue()
    result = summary["results"][0]
    assert result["n_rows"] == 8 and result["resumed_samples"] == 4 and result["generated_samples"] == 4
    gold = gold_letters(split)
    assert result["accuracy"] == pytest.approx(gold.count("A") / 8)  # every row answered "A"
    assert sorted(line["problem_id"] for line in read_lines(out)) == list(range(8))
    assert json.loads((tmp_path / "pred.summary.json").read_text())["results"][0]["n_rows"] == 8

    # A third run with other decoding settings must not blend into these lines.
    with pytest.raises(EvalError, match="other settings"):
        run_eval(EvalConfig(**{**base, "max_new_tokens": 9}), console=quiet())


def test_resume_survives_a_line_cut_short(loaded, synth_dir, tmp_path, monkeypatch):
    model, processor = loaded
    split = synth_dir / "valid"
    rows = scan_split(split).rows[:3]
    out = tmp_path / "pred.jsonl"
    cfg = EvalConfig(data=str(split), batch_size=3)
    monkeypatch.setattr(RolloutEngine, "generate_rows", ScriptedGenerate(processor.tokenizer, lambda n: tag("B")))
    evaluate_rows(model, processor, rows, cfg, out, "base", quiet())
    text = out.read_text()
    out.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + '{"problem_id": 2, "sam')  # crash mid-line
    again = ScriptedGenerate(processor.tokenizer, lambda n: tag("B"))
    monkeypatch.setattr(RolloutEngine, "generate_rows", again)
    result = evaluate_rows(model, processor, rows, cfg, out, "base", quiet())
    assert again.sequences == 1 and result.n_rows == 3
    complete = [json.loads(x) for x in out.read_text().splitlines() if x.endswith("}")]
    assert sorted(line["problem_id"] for line in complete) == [0, 1, 2]  # the cut line is left, never merged


def test_bad_rows_are_counted_per_reason(loaded, synth_dir, tmp_path, monkeypatch):
    model, processor = loaded
    split = tmp_path / "valid"
    shutil.copytree(synth_dir / "valid", split)
    (split / "audios" / "sample_3.wav").unlink()  # rejected by the scan
    monkeypatch.setattr(evaluate, "load_eval_model", lambda cfg: (model, processor))
    monkeypatch.setattr(RolloutEngine, "generate_rows", ScriptedGenerate(processor.tokenizer, lambda n: tag("A")))
    console = quiet()
    summary = run_eval(EvalConfig(model="unused", data=str(split), out=str(tmp_path / "p.jsonl")), console=console)
    result = summary["results"][0]
    assert result["bad_rows"] == {"missing_file": 1} and result["n_rows"] == 7
    assert "missing_file" in console.file.getvalue() and "sample_3.wav" in console.file.getvalue()

    # Media that break after the scan, and prompts over the cap, are counted too.
    rows = scan_split(split).rows
    (split / "images" / "sample_0.png").write_bytes(b"not a png")
    result = evaluate_rows(model, processor, rows[:2], EvalConfig(data=str(split)), tmp_path / "q.jsonl", "base", quiet())
    assert result.bad_rows == {"unreadable_image": 1} and result.n_rows == 1
    result = evaluate_rows(
        model, processor, rows[1:3], EvalConfig(data=str(split), max_prompt_tokens=50), tmp_path / "r.jsonl", "base", quiet()
    )
    assert result.bad_rows == {"prompt_too_long": 2} and result.n_rows == 0 and result.accuracy is None


def test_eval_never_dies_on_one_row(loaded, synth_dir, tmp_path, monkeypatch):
    # Rows that decode but that the processor (600x2 image: aspect ratio over 200) or the model (160 samples:
    # no audio token) cannot take, and a row the processor fails on for any other reason, are each skipped with
    # a one-line warning naming the row, counted by reason, and the rest is evaluated (real generate).
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from echoink_lite import prompting

    model, processor = loaded
    split = tmp_path / "valid"
    shutil.copytree(synth_dir / "valid", split)
    Image.new("RGB", (600, 2), (200, 10, 10)).save(split / "images" / "sample_0.png")
    sf.write(split / "audios" / "sample_1.wav", np.zeros(160, dtype=np.float32), 16000, subtype="PCM_16")
    real_encode = prompting.encode_example

    def encode_failing_on_row_2(processor, example, *args, **kwargs):
        if example.row.problem_id == 2:
            raise IndexError("index 7 is out of bounds")
        return real_encode(processor, example, *args, **kwargs)

    monkeypatch.setattr(prompting, "encode_example", encode_failing_on_row_2)
    rows = scan_split(split, open_media=False).rows[:5]  # the scan's media checks off: all 5 reach the encoder
    console = quiet()
    cfg = EvalConfig(data=str(split), batch_size=5, max_new_tokens=4)
    result = evaluate_rows(model, processor, rows, cfg, tmp_path / "p.jsonl", "base", console)
    assert result.bad_rows == {"image_aspect_ratio": 1, "audio_too_short": 1, "encode_failed": 1}
    assert result.n_rows == 2 and result.n_samples == 2 and result.to_dict()["n_bad_rows"] == 3
    assert sorted(line["problem_id"] for line in read_lines(tmp_path / "p.jsonl")) == [3, 4]
    warnings = [line for line in console.file.getvalue().splitlines() if "skipped row" in line]
    assert len(warnings) == 3
    assert "sample_0.png" in warnings[0] and "aspect ratio" in warnings[0]
    assert "sample_1.wav" in warnings[1] and "too short" in warnings[1]
    assert "problem_id 2" in warnings[2] and "IndexError" in warnings[2]

    # Through `eval` itself the scan already rejects the first two; the summary JSON counts every skipped row.
    monkeypatch.setattr(evaluate, "load_eval_model", lambda cfg: (model, processor))
    summary = run_eval(EvalConfig(model="unused", data=str(split), out=str(tmp_path / "s.jsonl"), limit=5, max_new_tokens=4), console=quiet())
    saved = json.loads(evaluate.summary_path(tmp_path / "s.jsonl").read_text())
    for counted in (summary, saved):
        assert counted["results"][0]["bad_rows"] == {"image_aspect_ratio": 1, "audio_too_short": 1, "encode_failed": 1}
        assert counted["results"][0]["n_rows"] == 4  # --limit 5 takes usable rows 2-6; row 2 fails to encode


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(EvalError, match="not both"):
        EvalConfig(adapter="a", merged="m")
    with pytest.raises(EvalError, match="--compare-base needs --adapter"):
        EvalConfig(compare_base=True)
    with pytest.raises(EvalError, match=r"needs sampled decoding \(--sample, or --protocol echoink-rl\)"):
        EvalConfig(samples=4)
    assert EvalConfig(adapter=str(tmp_path)).predictions_path() == tmp_path / "predictions.jsonl"
    assert EvalConfig().predictions_path() == Path("eval") / "predictions.jsonl"
    assert EvalConfig(device="cpu").resolved_dtype() == "float32"

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    console = quiet()
    assert eval_command(parser.parse_args(["--temperature", "0.7"]), console=console) == 1
    assert "add --sample" in console.file.getvalue()
    cfg = eval_config_from_args(parser.parse_args(["--sample", "--samples", "4", "--top-p", "0.9"]))
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.samples) == (True, 1.0, 0.9, 4)


# ---------------------------------------------------------------------------------------------
# Real generation with the tiny model
# ---------------------------------------------------------------------------------------------


def test_end_to_end_greedy_eval_through_the_command(tiny_model_dir, synth_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "eval" / "predictions.jsonl"
    args = parser.parse_args([
        "--model", str(tiny_model_dir), "--data", str(synth_dir / "valid"), "--out", str(out),
        "--limit", "4", "--max-new-tokens", "8", "--batch-size", "4",
    ])
    console = quiet()
    assert eval_command(args, console=console) == 0
    lines = read_lines(out)
    assert len(lines) == 4 and {line["label"] for line in lines} == {"base"}
    summary = json.loads((tmp_path / "eval" / "predictions.summary.json").read_text())
    result = summary["results"][0]
    assert result["n_rows"] == 4 and result["parse_rule"] == "strict" and result["rows_per_second"] > 0
    assert result["accuracy"] == pytest.approx(sum(line["correct"] for line in lines) / 4)
    text = console.file.getvalue()
    assert "accuracy" in text and "strict" in text


def test_compare_base_scores_both_labels_with_one_model(tiny_model_dir, synth_dir, tmp_path):
    from echoink_lite.modeling import add_lora, load_thinker
    from echoink_lite.recipe import LoraSection

    thinker = load_thinker(str(tiny_model_dir), dtype="float32", device="cpu")
    adapter_dir = tmp_path / "adapter"
    add_lora(thinker, LoraSection(r=4, alpha=8), gradient_checkpointing=False, seed=0).save_pretrained(adapter_dir)

    cfg = EvalConfig(
        model=str(tiny_model_dir), adapter=str(adapter_dir), data=str(synth_dir / "valid"), compare_base=True,
        limit=3, max_new_tokens=6, batch_size=3, device="cpu",
    )
    console = quiet()
    summary = run_eval(cfg, console=console)
    assert [r["label"] for r in summary["results"]] == ["base", "adapter"]
    lines = read_lines(adapter_dir / "predictions.jsonl")  # default out: beside the adapter
    assert sorted((line["label"], line["problem_id"]) for line in lines) == sorted(
        [("base", i) for i in range(3)] + [("adapter", i) for i in range(3)]
    )
    # A fresh LoRA adds exactly zero, so greedy completions agree and the difference is 0 points.
    by_label = {label: [line["completion"] for line in lines if line["label"] == label] for label in ("base", "adapter")}
    assert by_label["base"] == by_label["adapter"]
    assert summary["difference_pp"] == 0.0
    assert "percentage points" in console.file.getvalue()
    assert (adapter_dir / "predictions.summary.json").is_file()


# ---------------------------------------------------------------------------------------------
# Which base, which quantization, which adapter: the model side of an evaluation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """RUN/adapter (LoRA B perturbed, base recorded by PEFT) and RUN/recipe.yaml saying the base was 4-bit NF4."""
    from echoink_lite.modeling import add_lora, load_thinker
    from echoink_lite.recipe import LoraSection

    run = tmp_path_factory.mktemp("run")
    model = add_lora(load_thinker(str(tiny_model_dir), dtype="float32", device="cpu"), LoraSection(r=4, alpha=8),
                     gradient_checkpointing=False, seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.full(p.shape, 0.01)
    model.save_pretrained(run / "adapter")
    (run / "recipe.yaml").write_text(f"model:\n  name_or_path: {tiny_model_dir}\nquantization:\n  load_in_4bit: true\n")
    return run


def _eval_args(*argv: str):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_without_model_the_adapters_base_and_training_quantization_are_used(tiny_model_dir, trained_run, synth_dir, tmp_path):
    adapter = trained_run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    out = tmp_path / "pred.jsonl"
    console = wide()
    args = _eval_args("--adapter", str(adapter), "--data", str(synth_dir / "valid"), "--out", str(out), "--limit", "1",
                      "--max-new-tokens", "2", "--batch-size", "1")
    assert eval_command(args, console=console) == 0
    text = console.file.getvalue()
    assert f"base model: {tiny_model_dir} (from {adapter / 'adapter_config.json'}" in text
    assert f"quantization nf4, as trained ({(trained_run / 'recipe.yaml').resolve()})" in text
    summary = json.loads((tmp_path / "pred.summary.json").read_text())
    assert summary["base_model"] == str(tiny_model_dir) and summary["base_quantization"].startswith("nf4, as trained")
    assert summary["split"] == "valid"

    # The model it loads: the language model in 4 bits, as in training; the towers not.
    import bitsandbytes as bnb

    model, _ = load_eval_model(eval_config_from_args(args))
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(".language_model." in n for n in four_bit)


def test_quantization_choice_and_its_description(trained_run, tmp_path):
    adapter = str(trained_run / "adapter")
    section, text = EvalConfig(adapter=adapter).base_quantization()
    assert section.load_in_4bit and text.startswith("nf4, as trained")
    assert EvalConfig(adapter=adapter, quantization="none").base_quantization() == (None, "none (--quantization none)")
    bare = tmp_path / "elsewhere" / "adapter"  # an adapter copied out of its run folder: no recipe beside it
    shutil.copytree(trained_run / "adapter", bare)
    section, text = EvalConfig(adapter=str(bare)).base_quantization()
    assert section is None and text.startswith("none (default: no recipe.yaml beside") and "--quantization nf4" in text
    section, text = EvalConfig(adapter=str(bare), quantization="nf4").base_quantization()
    assert section.load_in_4bit and text == "nf4 (--quantization nf4)"
    with pytest.raises(EvalError, match="--quantization must be one of"):
        EvalConfig(quantization="int8")


def test_no_base_anywhere_is_one_line(trained_run, synth_dir, tmp_path):
    no_base = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", no_base)
    cfg = json.loads((no_base / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (no_base / "adapter_config.json").write_text(json.dumps(cfg))
    for argv, expected in (
        (["--adapter", str(no_base)], "names no base_model_name_or_path. Fix: pass --model"),
        ([], "nothing to evaluate: pass --model"),
    ):
        console = wide()
        assert eval_command(_eval_args(*argv, "--data", str(synth_dir / "valid")), console=console) == 1
        (line,) = console.file.getvalue().splitlines()
        assert expected in line and line.startswith("error:")


def test_an_adapter_from_another_base_is_refused(tiny_model_dir, mismatched_adapters, synth_dir, tmp_path):
    for variant in ("deeper", "narrower"):
        console = wide()
        args = _eval_args("--model", str(tiny_model_dir), "--adapter", str(mismatched_adapters[variant]),
                          "--data", str(synth_dir / "valid"), "--out", str(tmp_path / variant / "p.jsonl"), "--limit", "1")
        assert eval_command(args, console=console) == 1
        (line,) = console.file.getvalue().splitlines()
        assert "does not fit the base" in line and str(mismatched_adapters[variant]) in line and "Fix: pass --model" in line
        assert not (tmp_path / variant / "p.jsonl").exists()


def test_a_retrained_adapter_at_the_same_path_does_not_reuse_old_predictions(loaded, trained_run, synth_dir, tmp_path, monkeypatch):
    model, processor = loaded
    adapter = tmp_path / "run" / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    monkeypatch.setattr(evaluate, "load_eval_model", lambda cfg: (model, processor))
    out = tmp_path / "pred.jsonl"
    cfg = EvalConfig(adapter=str(adapter), quantization="none", data=str(synth_dir / "valid"), out=str(out), limit=2)
    first = ScriptedGenerate(processor.tokenizer, lambda n: tag("A"))
    monkeypatch.setattr(RolloutEngine, "generate_rows", first)
    assert run_eval(cfg, console=quiet())["results"][0]["generated_samples"] == 2

    # The same adapter again: resumed, nothing generated.
    again = ScriptedGenerate(processor.tokenizer, lambda n: tag("A"))
    monkeypatch.setattr(RolloutEngine, "generate_rows", again)
    assert run_eval(cfg, console=quiet())["results"][0]["resumed_samples"] == 2 and again.sequences == 0

    # Train again into the same folder (here: other weights): the old predictions are not reused.
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in weights.items()}, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EvalError, match="predictions of another adapter") as err:
        run_eval(cfg, console=quiet())
    assert "--out" in str(err.value) and again.sequences == 0
    fresh = run_eval(dataclasses.replace(cfg, out=str(tmp_path / "fresh.jsonl")), console=quiet())
    assert fresh["results"][0]["generated_samples"] == 2
