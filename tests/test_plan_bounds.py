"""Absurd sizes are refused in one line before anything runs: in the recipe (recipe_bounds.py), in `plan`'s
flags, in the planner's search, and on a CPU whose memory cannot hold the run (preflight.py)."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest

import echoink_lite.memory_suggestions as suggestions
from echoink_lite.cli import main
from echoink_lite.plan import estimate_memory
from echoink_lite.recipe import RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("override, words", [
    ("grpo.group_size=1000000000000", "grpo.group_size=1,000,000,000,000 is over its limit 1,024"),
    ("grpo.group_size=100000", "grpo.group_size=100,000 is over its limit 1,024"),
    ("grpo.rollout_batch_size=10000000", "grpo.rollout_batch_size=10,000,000 is over its limit 65,536"),
    ("lora.r=100000", "lora.r=100,000 is over its limit 4,096"),
    ("data.max_audio_seconds=0.001", "data.max_audio_seconds=0.001 is under its limit 0.0200625"),
    ("schedule.seed=-1", "schedule.seed=-1 is under its limit 0"),
    ("schedule.epochs=1000000", "schedule.epochs=1,000,000.0 is over its limit 1,000"),
    ("schedule.learning_rate=10", "schedule.learning_rate=10.0 is over its limit 1, the peak learning rate"),
    ("generation.max_completion_tokens=32768", "over the model's 32768-token context"),
])
def test_absurd_values_are_refused_naming_the_limit_and_the_fix(override, words):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "paper_24gb.yaml", [override])
    msg = str(err.value)
    assert words in msg and ("lower" in msg or "raise" in msg) and "\n" not in msg


def test_divisors_are_found_without_counting_to_n():
    assert suggestions.divisors_below(10**12, 10**12)[:3] == [5 * 10**11, 25 * 10**10, 2 * 10**11]
    for n in (1, 2, 12, 16, 97, 360, 1024):
        assert suggestions.divisors_below(n, n) == sorted((d for d in range(1, n) if n % d == 0), reverse=True)


def test_the_suggestion_search_tries_a_bounded_number_of_recipes(monkeypatch):
    """A decode batch of 65536 rows over groups of 2 used to try every multiple of 2 below it, one estimate
    each (32,767 of them, a minute); the paper recipes' short lists are still tried whole."""
    calls = {"n": 0}
    real = suggestions.estimate_memory

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(suggestions, "estimate_memory", counting)
    recipe = load_recipe(RECIPES / "paper_24gb.yaml", ["grpo.group_size=2", "grpo.micro_batch_size=2",
                                                        "grpo.rollout_batch_size=65536", "grpo.prompts_per_step=4096"])
    est = estimate_memory(recipe, 40.0)
    assert not est.fits and est.suggestions and est.suggestions[0].total_gb <= est.budget_gb
    assert calls["n"] < 300
    assert suggestions.rollout_batch_sizes(load_recipe(RECIPES / "paper_24gb.yaml")) == [
        112, 96, 80, 64, 48, 32, 16, 8, 4, 2, 1]


@pytest.mark.parametrize("flags, words", [
    (["--text-tokens", "-100000"], "--text-tokens -100000: the text tokens per prompt must be between 1 and"),
    (["--text-tokens", "0"], "--text-tokens 0:"),
    (["--headroom", "-5"], "--headroom -5.0: the fraction of the GPU kept free must be at least 0 and under 1"),
    (["--headroom", "1"], "--headroom 1.0:"),
])
def test_plan_refuses_impossible_flags_in_one_line(capsys, flags, words):
    assert main(["plan", str(RECIPES / "paper_24gb.yaml"), *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_available_host_memory_honours_ulimit_v():
    """Under `ulimit -v`, what the process may still allocate is the limit less what it maps."""
    code = (
        "import resource, sys\n"
        "from echoink_lite.preflight import available_host_memory\n"
        "mapped = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (mapped + 300 * 2**20, resource.RLIM_INFINITY))\n"
        "free, why = available_host_memory()\n"
        "print(free / 2**20, why)\n"
    )
    if not Path("/proc/self/status").exists() or resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
        pytest.skip("needs Linux /proc and no address-space limit already set")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mib, why = float(out.split()[0]), out.split(maxsplit=1)[1]
    assert 200 < mib <= 300 and "ulimit -v" in why


def test_train_on_a_cpu_refuses_a_run_the_memory_cannot_hold(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    """The issue's group_size=100000 under a memory limit ended in DefaultCPUAllocator's traceback at step 1.
    Now the estimate is compared with what the process may allocate, before the model loads."""
    import echoink_lite.preflight as preflight
    from echoink_lite.grpo import TrainingError, train

    loaded = []
    monkeypatch.setattr(preflight, "available_host_memory", lambda: (64 * 2**20, "a test limit"))
    monkeypatch.setattr("echoink_lite.run_setup.load_thinker_from_recipe", lambda *a, **k: loaded.append(1))
    out = tmp_path / "run"
    recipe = load_recipe(RECIPES / "tiny_cpu.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={synth_dir / 'train'}", "data.valid=null",
        f"checkpoint.output_dir={out}", "grpo.group_size=1024", "grpo.rollout_batch_size=8192",
        "generation.max_completion_tokens=2048", "logging.progress=false"])
    with pytest.raises(TrainingError) as err:
        train(recipe)
    msg = str(err.value)
    assert "GiB of host memory" in msg and "a test limit" in msg and "lower grpo.rollout_batch_size=8192" in msg
    assert "--force" in msg and not loaded and not out.exists()


@pytest.mark.parametrize("override, words", [
    ("lora.target_modules=[]", "lora.target_modules is empty; list some of the language model's projections"),
    ("lora.target_modules=[q_proj, audio_tower]", "lora.target_modules names 'audio_tower', which are not"),
    ("grpo.rewards={accuracy: 0, format: 0}", "every weight in grpo.rewards is 0"),
])
def test_recipes_that_would_train_nothing_are_refused(override, words):
    """An empty or unknown LoRA target ended in PEFT's traceback after the model loaded; all-zero reward weights
    trained on advantages that are all 0."""
    with pytest.raises(RecipeError, match=words):
        load_recipe(RECIPES / "tiny_cpu.yaml", [override])


def test_a_schedule_of_zero_steps_is_refused_before_anything_is_written(synth_dir, tmp_path, capsys):
    """`schedule.epochs=1e-9` gave "done: 0 steps", exit 0 and an untrained adapter."""
    over = [f"data.train={synth_dir / 'train'}", "schedule.epochs=1e-9", f"checkpoint.output_dir={tmp_path / 'run'}"]
    assert main(["recipes", "validate", str(RECIPES / "tiny_cpu.yaml"), *over]) == 1
    assert "tiny_cpu.yaml: schedule.epochs=1e-09 of 16 training rows at 8 prompts per step makes 0 optimizer steps" \
        in " ".join(capsys.readouterr().out.split())
    assert main(["train", str(RECIPES / "tiny_cpu.yaml"), *over]) == 2
    assert "makes 0 optimizer steps; raise schedule.epochs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_device_is_not_a_recipe_file(capsys):
    assert main(["recipes", "validate", "/dev/null"]) == 1
    assert "recipe file /dev/null is not a regular file" in capsys.readouterr().out


@pytest.mark.parametrize("key, value, words", [
    ("num_attention_heads", 0, "the model config's text_config.num_attention_heads is 0; sizes are whole numbers"),
    ("vocab_size", -5, "text_config.vocab_size is -5"),  # used to "fit"
    ("num_hidden_layers", -3, "cannot read the config of"),  # transformers' own check (huggingface_hub's error type)
])
def test_plan_on_a_corrupted_model_config_is_an_error_not_a_traceback(tiny_model_dir, tmp_path, capsys, key, value, words):
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())  # the Hub layout: the thinker's config inside
    cfg["thinker_config"]["text_config"][key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", str(RECIPES / "tiny_cpu.yaml"), f"model.name_or_path={folder}"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_more_prompts_per_step_than_rows_is_refused(synth_dir, capsys):
    """16 rows at 64 prompts per step gave steps of 16 prompts (each row once per step) under a plan of 64."""
    assert main(["recipes", "validate", str(RECIPES / "tiny_cpu.yaml"), f"data.train={synth_dir / 'train'}",
                 "grpo.prompts_per_step=64"]) == 1
    assert "grpo.prompts_per_step=64 is more than the 16 usable training rows; lower it to at most 16" in \
        " ".join(capsys.readouterr().out.split())
