"""The command line as a user meets it: help, recipe checks, data commands, and the demo's quick mode."""

import argparse
import json
from pathlib import Path

import pytest

from echoink_lite.cli import build_parser, main

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")


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


def test_overrides_work_after_options(capsys):
    """The planner's advice pasted after an option, and `train ... --resume auto key=value` (issue 10)."""
    assert main(["plan", str(ROOT / "recipes" / "paper_24gb.yaml"), "--gpu-memory", "12GB", "grpo.micro_batch_size=1"]) == 1
    assert "micro-batches of 1 " in capsys.readouterr().out.replace("\n", " ")
    # the override reaches the recipe (its typo is reported), it is not an argparse error
    assert main(["train", TINY, "--resume", "auto", "grpo.gruop_size=4"]) == 2
    assert "did you mean 'grpo.group_size'" in capsys.readouterr().err
    assert main(["recipes", "validate", TINY, "grpo.micro_batch_size=3"]) == 1
    assert "micro_batch_size=3 does not divide" in capsys.readouterr().out


def test_unknown_options_are_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", TINY, "--gpu-memroy", "12GB"])
    assert e.value.code == 2 and "unrecognized arguments: --gpu-memroy 12GB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tiny", "out", "model.dtype=float32"])  # a command without a recipe takes no overrides


@pytest.mark.parametrize("group, subcommands", [("recipes", ["validate", "explain"]), ("data", ["check", "synth"])])
def test_a_group_without_its_subcommand_lists_them(capsys, group, subcommands):
    assert main([group]) == 2
    err = capsys.readouterr().err
    assert "required" not in err and f"echoink-lite {group}: choose a subcommand" in err
    for name in subcommands:
        assert f"echoink-lite {group} {name}: " in err


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_argument_has_help():
    missing = [f"{p.prog} {a.dest}" for p in _parsers(build_parser()) for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert missing == []


def test_recipes_explain_wraps_text_never_names_and_shows_trl_names(capsys, monkeypatch):
    from echoink_lite.recipe_reference import explain

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["recipes", "explain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    starts = {line.split(" = ")[0] for line in lines if " = " in line and not line.startswith(" ")}
    assert starts == {key for key, *_ in explain()}
    text = "\n".join(lines)
    for key, trl in [("grpo.group_size", "num_generations"), ("generation.max_completion_tokens", "max_completion_length"),
                     ("grpo.beta", "beta"), ("schedule.learning_rate", "learning_rate")]:
        block = text.split(f"\n{key} = ")[1].split("\n")[1:]
        block = block[:next(i for i, line in enumerate(block) if not line.startswith(" "))]
        assert any(line.startswith(f"    TRL GRPOConfig: {trl}") for line in block)


def test_recipes_validate_prints_the_steps_when_the_data_is_readable(capsys, synth_dir):
    assert main(["recipes", "validate", TINY, f"data.train={synth_dir / 'train'}"]) == 0
    out = capsys.readouterr().out
    assert "8 prompts x 8 = 64 completions/step in 8 micro-batches of up to 8 (one group each), 1 decode batch(es)/step" in out
    assert f"steps: 8 (2 per epoch x 4 epoch(s), at most schedule.max_steps=120); 16 usable rows in {synth_dir / 'train'}" in out
    assert main(["recipes", "validate", TINY, "data.train=/nonexistent/train"]) == 0
    out = capsys.readouterr().out
    assert "steps: 4 epoch(s) x ceil(training rows / 8 prompts), at most schedule.max_steps=120; " \
           "not counted: /nonexistent/train not found" in out


def test_an_unknown_reward_fails_before_anything_loads(capsys):
    assert main(["recipes", "validate", TINY, "grpo.rewards={accuraccy: 1.0}"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "grpo.rewards['accuraccy']: unknown reward 'accuraccy' (did you mean 'accuracy'?)" in out[0]
    assert main(["train", TINY, "grpo.rewards={accuraccy: 1.0}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'accuracy'" in err[0]


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
    """The README's main job in its smoke-test form: every stage runs and the summary is written; the final
    question is shown with its options, the model's answer and the gold answer; nothing reads as a failure."""
    import io

    from rich.console import Console

    from echoink_lite.demo import run_demo

    console = Console(file=io.StringIO(), width=200)
    s = run_demo(tmp_path / "demo", quick=True, console=console)
    out = console.file.getvalue()
    ex = s["infer_example"]
    assert f"question (validation item {ex['problem_id']}" in out and "A. red low" in out and "D. blue high" in out
    assert f"gold answer: {ex['gold']}" in out and "model's answer: " in out
    assert "FAIL" not in out and "B = 0?" not in out
    assert s["merge_verification"]["ok"] is True
    assert s["grpo_steps"] == 3 and s["validation_rows"] == 16
    for k in ("accuracy_before", "accuracy_after", "accuracy_audio_swapped", "accuracy_image_swapped",
              "zero_advantage_token_share", "skipped_token_share"):
        assert 0.0 <= s[k] <= 1.0
    assert s["skipped_token_share"] == 0.0  # the demo's beta 0.04: nothing is skipped unless asked
    assert "loss-pass tokens in zero-advantage groups" in out
    assert (tmp_path / "demo" / "run" / "curves.png").is_file()
    assert (tmp_path / "demo" / "merged" / "config.json").is_file()
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text())["quick"] is True
