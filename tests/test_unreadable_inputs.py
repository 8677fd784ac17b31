"""Inputs that used to end in a traceback are one line naming the file: JSON nested deeper than Python's
recursion limit (a split, a JSON Lines file, an adapter config), and an adapter whose adapter_config.json gives
another rank than its weights, in every command that reads an adapter (`merge` refused it; `infer` and `eval`
printed PEFT's size-mismatch traceback)."""

from __future__ import annotations

import json
import shutil

import pytest

from echoink_lite.adapter_tensors import read_adapter
from echoink_lite.adapters import AdapterError, lora_shapes, read_adapter_config
from echoink_lite.cli import main
from echoink_lite.data import BAD_JSON, DataError, scan_split
from echoink_lite.jsonl import JsonlError, read_jsonl

RECIPES_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes"
DEEP = "[" * 100_000 + "]" * 100_000


def test_a_deeply_nested_split_is_one_line(tmp_path, capsys):
    split = tmp_path / "train"
    split.mkdir()
    (split / "omni_rl_format_train.json").write_text(DEEP)
    with pytest.raises(DataError, match="omni_rl_format_train.json is nested too deeply to read"):
        scan_split(split)
    assert main(["data", "check", str(split)]) == 1
    out = capsys.readouterr()
    assert "nested too deeply" in out.err and "Traceback" not in out.err and "nested" not in out.out  # errors: stderr


def test_a_deeply_nested_json_lines_row_is_one_bad_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"problem_id": ' + DEEP + "}\n")
    scan = scan_split(path)
    assert [(r.reason, r.index) for r in scan.rejects] == [(BAD_JSON, 0)]
    assert "line 1 of" in scan.rejects[0].detail and "nested too deeply" in scan.rejects[0].detail


def test_a_deeply_nested_metrics_line_is_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n' + DEEP + '\n{"step": 2}\n')
    with pytest.raises(JsonlError, match=r"metrics.jsonl, line 2: nested too deeply"):
        read_jsonl(path)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A rank-4 LoRA adapter of the tiny thinker."""
    from echoink_lite.modeling import add_lora, load_thinker
    from echoink_lite.recipe import LoraSection

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model = add_lora(load_thinker(str(tiny_model_dir), dtype="float32"), LoraSection(r=4, alpha=8),
                     gradient_checkpointing=False)
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def edited(adapter, tmp_path, **changes):
    out = tmp_path / "edited"
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_a_rank_that_does_not_match_the_weights_is_refused_by_every_reader(adapter, tmp_path):
    bad = edited(adapter, tmp_path, r=2)
    for reader in (lora_shapes, read_adapter):
        with pytest.raises(AdapterError, match=r"has rank 4 but adapter_config.json says r=2\. Fix: restore"):
            reader(bad)
    lora_shapes(adapter)  # the untouched adapter reads


@pytest.mark.parametrize("command", ["infer", "eval", "merge"])
def test_infer_eval_and_merge_refuse_it_in_one_line(adapter, synth_dir, tmp_path, capsys, command):
    bad = edited(adapter, tmp_path, r=2)
    row = scan_split(synth_dir / "valid").rows[0]
    argv = {
        "infer": ["infer", "--adapter", str(bad), "--audio", str(row.audio_path), "--image", str(row.image_path),
                  "--question", "Which?", "--max-new-tokens", "2", "--no-stream"],
        "eval": ["eval", "--adapter", str(bad), "--data", str(synth_dir / "valid"), "--max-new-tokens", "2",
                 "--out", str(tmp_path / "preds.jsonl")],
        "merge": ["merge", "--adapter", str(bad), "--out", str(tmp_path / "merged")],
    }[command]
    assert main(argv) in (1, 2)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "has rank 4 but adapter_config.json says r=2" in " ".join(text.split())
    assert "size mismatch" not in text and "Traceback" not in text


@pytest.mark.parametrize("changes", [{"r": "eight"}, {"r": True}, {"lora_alpha": None}, {"rank_pattern": [1]}])
def test_lora_settings_that_are_not_numbers_are_refused(adapter, tmp_path, changes):
    with pytest.raises(AdapterError, match="is not a valid LoRA setting"):
        read_adapter(edited(adapter, tmp_path, **changes))


def test_a_deeply_nested_adapter_config_is_one_line(adapter, tmp_path):
    bad = edited(adapter, tmp_path)
    (bad / "adapter_config.json").write_text(DEEP)
    with pytest.raises(AdapterError, match="adapter_config.json is nested too deeply"):
        read_adapter_config(bad)


def test_odd_media_paths_are_rejected_rows_not_tracebacks(synth_dir, tmp_path):
    """A symlink loop, a NUL byte, a name too long for the file system: pathlib raises RuntimeError,
    ValueError or OSError for these, which used to end `data check` and training's scan in a traceback."""
    split = tmp_path / "valid"
    shutil.copytree(synth_dir / "valid", split)
    (split / "images" / "loop1").symlink_to("loop2")
    (split / "images" / "loop2").symlink_to("loop1")
    list_file = split / "omni_rl_format_valid.json"
    rows = json.loads(list_file.read_text())
    rows[0]["path"]["image"] = "images/loop1"
    rows[1]["path"]["audio"] = "audios/a\u0000b.wav"
    rows[2]["path"]["image"] = "images/" + "x" * 300 + ".png"
    list_file.write_text(json.dumps(rows))
    scan = scan_split(split)
    assert [(r.index, r.reason) for r in scan.rejects] == [(0, "missing_file"), (1, "missing_file"), (2, "missing_file")]
    assert "Symlink loop" in scan.rejects[0].detail and "null byte" in scan.rejects[1].detail
    assert "File name too long" in scan.rejects[2].detail and len(scan.rows) == 5


def test_an_integer_past_pythons_digit_limit_is_one_line(tmp_path):
    big = "1" + "0" * 5000  # json raises ValueError (not JSONDecodeError) past 4300 digits
    (tmp_path / "rows.jsonl").write_text('{"problem_id": ' + big + "}\n")
    scan = scan_split(tmp_path / "rows.jsonl")
    assert scan.rejects[0].reason == BAD_JSON and "cannot be read" in scan.rejects[0].detail
    split = tmp_path / "train"
    split.mkdir()
    (split / "omni_rl_format_train.json").write_text("[" + big + "]")
    with pytest.raises(DataError, match="cannot be read as JSON"):
        scan_split(split)


def test_a_reward_function_that_raises_is_named_in_one_line(tiny_model_dir, synth_dir, tmp_path, capsys):
    """A user's reward with the wrong signature ended the run in its own traceback at step 1."""
    from echoink_lite.rewards import RewardError, compute_rewards, resolve_rewards

    with pytest.raises(RewardError, match=r"reward 'json:loads' failed: TypeError: .* fix the function"):
        compute_rewards(resolve_rewards({"json:loads": 1.0}), ["a"], solution=["A"])
    recipe = str(RECIPES_DIR / "tiny_cpu.yaml")
    assert main(["train", recipe, f"model.name_or_path={tiny_model_dir}", f"data.train={synth_dir / 'train'}",
                 "data.valid=null", f"checkpoint.output_dir={tmp_path / 'run'}", "schedule.max_steps=1",
                 "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.micro_batch_size=2", "grpo.rollout_batch_size=2",
                 "generation.max_completion_tokens=4", "grpo.rewards={json:loads: 1.0}", "logging.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "echoink-lite train: error: reward 'json:loads' failed: TypeError" in err and "Traceback" not in err


def test_a_model_folder_without_tokenizer_files_is_one_line(tiny_model_dir, tmp_path):
    from echoink_lite.modeling import ModelLoadError, load_processor

    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    with pytest.raises(ModelLoadError, match="cannot load the processor of"):
        load_processor(str(folder))
