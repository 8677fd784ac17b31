"""The curves PNG of a run folder: labelled axes, a title naming the run and recipe, smoothed lines, and a
one-line error for a folder that is not a run."""

import json
import math

import yaml

from echoink_lite.cli import main
from echoink_lite.metrics import draw_curves, plot_run, smooth
from echoink_lite.recipe import recipe_from_dict


def _run_folder(tmp_path, steps=20):
    run = tmp_path / "my-run"
    run.mkdir()
    recipe = recipe_from_dict({"description": "tiny trial", "logging": {"run_name": "trial-7"},
                               "grpo": {"rewards": {"accuracy": 1.0, "format": 0.5}}})
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    rows = [{"step": i + 1, "reward": 0.5 + i / 40, "accuracy": 0.25 + i / 40, "format_rate": 1.0,
             "completion_length": 9.0, "zero_std_fraction": 0.5 - i / 40} for i in range(steps)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, rows, yaml.safe_load((run / "recipe.yaml").read_text())


def test_the_curves_say_what_they_show(tmp_path):
    run, rows, recipe = _run_folder(tmp_path)
    fig = draw_curves(rows, recipe, "trial-7")
    title = fig._suptitle.get_text()
    assert title.startswith("trial-7: tiny trial") and "8 prompts x 16 completions per step" in title
    reward, accuracy, length, no_signal = fig.axes
    assert all(ax.get_ylabel() and ax.get_xlabel() == "optimizer step" for ax in fig.axes)
    assert "max 1.5 = 1 x accuracy + 0.5 x format" in reward.get_title()
    assert reward.get_lines()[-1].get_ydata()[0] == 1.5  # the maximum drawn as a line
    assert accuracy.get_title().startswith("sampled TRAINING accuracy") and "temperature 1.0, top_p 0.95" in accuracy.get_title()
    legend = [t.get_text() for t in no_signal.get_legend().get_texts()]
    assert "identical rewards" in no_signal.get_title() and any("same reward" in t for t in legend) and any("mean of last" in t for t in legend)
    assert len(accuracy.get_lines()) == 5  # raw + smoothed for accuracy and format, and the 1.0 line
    assert plot_run(run).name == "curves.png" and (run / "curves.png").stat().st_size > 0


def test_smoothing_is_a_trailing_mean_that_skips_missing_values():
    out = smooth([1.0, None, 3.0, 5.0], window=2)
    assert out[:2] == [1.0, 1.0] and out[2:] == [3.0, 4.0]
    assert math.isnan(smooth([None], 3)[0])


def test_plot_without_recipe_or_steps_still_draws(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert plot_run(run, tmp_path / "x.png").is_file()


def test_plot_on_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl not found" in err[0] and "echoink-lite train" in err[0]
