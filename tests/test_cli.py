"""The command line as a user meets it: help, recipe checks, data commands, and the demo's quick mode."""

import json
from pathlib import Path

import pytest

from echoink_lite.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "eval", "infer", "merge", "data", "plan", "recipes"):
        assert cmd in out


def test_recipes_validate_reports_typos_with_the_closest_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  group_sizee: 8\n")
    assert main(["recipes", "validate", str(bad)]) == 1
    assert "did you mean 'grpo.group_size'" in capsys.readouterr().out
    good = tmp_path / "good.yaml"
    good.write_text("grpo:\n  group_size: 8\n")
    assert main(["recipes", "validate", str(good), "--set", "grpo.micro_batch_size=8"]) == 0


def test_train_refuses_a_typo_override_before_loading_anything(tmp_path, capsys):
    assert main(["train", str(Path(__file__).parent.parent / "recipes" / "tiny_cpu.yaml"), "grpo.gruop_size=4"]) == 2
    assert "did you mean 'grpo.group_size'" in capsys.readouterr().err


def test_data_synth_then_check(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "d"), "--train", "8", "--valid", "4"]) == 0
    assert main(["data", "check", str(tmp_path / "d" / "train"), "--report", str(tmp_path / "r.jsonl")]) == 0
    items = json.loads((tmp_path / "d" / "train" / "omni_rl_format_train.json").read_text())
    items[0]["solution"] = "<answer>Z</answer>"
    (tmp_path / "d" / "train" / "omni_rl_format_train.json").write_text(json.dumps(items))
    assert main(["data", "check", str(tmp_path / "d" / "train"), "--report", str(tmp_path / "r.jsonl")]) == 1
    rejected = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejected] == ["solution_not_an_option"]


def test_demo_quick_runs_end_to_end(tmp_path):
    """The README's main job in its smoke-test form: every stage runs and the summary is written."""
    from echoink_lite.demo import run_demo

    s = run_demo(tmp_path / "demo", quick=True)
    assert s["grpo_steps"] == 3 and s["validation_rows"] == 16
    for k in ("accuracy_before", "accuracy_after", "accuracy_audio_swapped", "accuracy_image_swapped"):
        assert 0.0 <= s[k] <= 1.0
    assert (tmp_path / "demo" / "run" / "curves.png").is_file()
    assert (tmp_path / "demo" / "merged" / "config.json").is_file()
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text())["quick"] is True
