"""benchmarks/bench_grpo.py on CPU (--tiny): the same code path as the GPU measurement, tiny widths.

The GPU numbers themselves cannot be produced here; this keeps the benchmark runnable so that whoever has a
GPU gets a report (and tests/test_plan.py then holds the planner to it)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_grpo", ROOT / "benchmarks" / "bench_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_grpo"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    import torch

    import echoink_lite.run_setup as run_setup

    bench = _bench()
    tmp = tmp_path_factory.mktemp("bench")
    eos_hook = run_setup.multimodal_token_ids
    out = tmp / "tiny.json"
    rc = bench.main(["--tiny", "--steps", "1", "--baselines", "--recipe", str(ROOT / "recipes" / "paper_24gb.yaml"),
                     "--out", str(out), "--workdir", str(tmp / "work")])
    assert run_setup.multimodal_token_ids is eos_hook  # the measurement hooks are undone
    step = torch.optim.AdamW.step
    while step is not None:  # torch wraps the step of every optimizer class it builds; ours must be gone
        assert not getattr(step, "echoink_bench_timer", False)
        step = getattr(step, "__wrapped__", None)
    return rc, json.loads(out.read_text()), tmp / "work"


def test_tiny_run_reports_every_phase(tiny_report):
    rc, rep, _ = tiny_report
    assert rc == 0
    assert rep["schema"] == "echoink-lite-bench/1" and rep["device"] == "cpu"
    for key in ("card", "versions", "command", "date", "recipe_file", "prompt_tokens", "runs", "ratios"):
        assert key in rep
    assert rep["versions"]["torch"] and rep["versions"]["transformers"]
    kit = rep["runs"][0]
    assert kit["name"] == "kit-qlora" and kit["kind"] == "kit" and kit["status"] == "ok", kit.get("error")
    assert kit["steps"] == 1
    assert kit["forced_full_length"] and kit["completion_length"] == 8  # EOS suppressed: the whole budget
    for key in ("rollout_time_s", "logprob_time_s", "optimizer_time_s", "step_time_s", "rollout_tokens_per_s"):
        assert kit[key] > 0, key
    assert kit["projected_full_run_steps"] == 562
    assert kit["projected_full_run_h"] == pytest.approx(kit["step_time_s"] * 8 * 562 / 3600)  # 1 of the recipe's 8 prompts
    assert kit["planner_estimate_gb"] > 0 and "measured_total_gb" not in kit  # no GPU, no GPU numbers


def test_tiny_run_feeds_the_planner_comparison(tiny_report):
    """The fields tests/test_plan.py reads from a GPU report exist and rebuild the recipe."""
    from echoink_lite.plan import estimate_memory
    from echoink_lite.recipe import recipe_from_dict

    _, rep, _ = tiny_report
    kit = rep["runs"][0]
    recipe = recipe_from_dict(kit["recipe"])
    assert recipe.generation.max_completion_tokens == 8 and recipe.grpo.prompts_per_step == 1
    est = estimate_memory(recipe, 24.0, config=_bench().bench_config(True), prompt_tokens=kit["prompt_tokens"], suggest=False)
    assert est.total_gb == pytest.approx(kit["planner_estimate_gb"])


def test_tiny_baselines_run(tiny_report):
    _, rep, _ = tiny_report
    by_name = {r["name"]: r for r in rep["runs"]}
    bf16 = by_name["kit-bf16-lora"]
    assert bf16["status"] == "ok", bf16.get("error")
    assert bf16["recipe"]["quantization"]["load_in_4bit"] is False
    trl = by_name["trl-grpo-qlora-images"]
    assert trl["status"] == "ok", trl.get("error")
    assert trl["kind"] == "trl" and trl["steps"] == 1 and trl["completion_length"] == 8
    assert trl["step_time_s"] > 0 and trl["rollout_tokens_per_s"] > 0
    assert set(rep["ratios"]) == {"kit-bf16-lora / kit-qlora", "trl-grpo-qlora-images / kit-qlora"}
    assert all("measured_total_gb_ratio" not in r for r in rep["ratios"].values())  # memory ratios are GPU-only


def test_question_is_padded_to_the_paper_prompt_length(tiny_report, tmp_path):
    """The full-size run's data: 10 s audio + 448x448 image + a question grown to ~706 prompt tokens."""
    from echoink_lite.modeling import load_processor
    from echoink_lite.plan import Dims, prompt_token_estimate
    from echoink_lite.recipe import load_recipe

    _, _, work = tiny_report
    bench = _bench()
    recipe = load_recipe(ROOT / "recipes" / "paper_24gb.yaml")
    target = prompt_token_estimate(recipe, Dims.from_config(bench.bench_config(False)))["prompt"]
    assert target == 706
    split = bench.write_bench_data(tmp_path / "data", 1, 448, recipe.data.max_audio_seconds, bench.BASE_QUESTION)
    processor = load_processor(str(work / "tiny-model"), max_pixels=recipe.data.max_pixels)
    question, predicted = bench.paper_length_question(processor, recipe, split, target)
    split = bench.write_bench_data(tmp_path / "data", 1, 448, recipe.data.max_audio_seconds, question)
    measured = bench.prompt_length(processor, recipe, split)
    assert measured == predicted and target <= measured <= target + 4
    assert question.startswith(bench.BASE_QUESTION)


def test_tokenizer_uses_the_real_special_token_ids():
    bench = _bench()
    tok = bench.bench_tokenizer()
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.convert_tokens_to_ids("<|AUDIO|>") == 151646 and tok.convert_tokens_to_ids("<|IMAGE|>") == 151655
    assert tok.pad_token_id == 151643
    cfg = bench.bench_config(tiny=False)
    assert cfg["text_config"]["vocab_size"] == 152064 and len(tok) <= 152064
    ids = tok("<|im_start|>user\nhello there<|im_end|>").input_ids
    assert ids[0] == 151644 and ids[-1] == 151645 and max(ids[1:-1]) < 151643


def test_prompts_per_step_auto_fills_one_decode_batch_and_one_micro_batch():
    from echoink_lite.recipe import load_recipe

    bench = _bench()
    for name in ("paper_24gb.yaml", "paper_48gb.yaml"):  # decode batch 128 = the step's 8 groups of 16
        assert bench.auto_prompts_per_step(load_recipe(ROOT / "recipes" / name)) == 8
    assert bench.auto_prompts_per_step(load_recipe(ROOT / "recipes" / "paper_24gb.yaml", ["grpo.rollout_batch_size=32"])) == 2


def test_trl_config_matches_the_installed_trl():
    """The GPU baseline's GRPOConfig fields exist in the installed TRL (checked on CPU: use_cpu=True)."""
    from trl import GRPOConfig

    from echoink_lite.recipe import load_recipe

    bench = _bench()
    recipe = load_recipe(ROOT / "recipes" / "paper_24gb.yaml", ["grpo.prompts_per_step=1"])
    kw = bench.trl_config_kwargs(recipe, "cpu", 3, "/tmp/unused")
    args = GRPOConfig(**kw, generation_kwargs={"suppress_tokens": [1]})
    assert args.num_generations == 16 and args.max_completion_length == 768
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16


def test_no_gpu_means_a_clear_refusal(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _bench().main(["--steps", "1"]) == 2
    assert "--tiny" in capsys.readouterr().out
