"""Recipes: shipped ones validate, each kind of bad recipe fails with a message that names the fix."""

from pathlib import Path

import pytest
import yaml

from echoink_lite.recipe import RecipeError, apply_overrides, changed_math_fields, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate_and_start_with_a_header(path):
    r = load_recipe(path)
    assert path.read_text().startswith("#"), "each recipe starts with a comment saying what it is for"
    assert "echoink-lite" in path.read_text().split("description:")[0], "the header says how to run it"
    assert r.derived()["completions_per_step"] == r.grpo.prompts_per_step * r.grpo.group_size


def test_paper_recipes_give_the_paper_schedule():
    for name in ("paper_24gb.yaml", "paper_48gb.yaml"):
        r = load_recipe(Path(__file__).parent.parent / "recipes" / name)
        d = r.derived(n_train_rows=4490)
        assert d["total_steps"] == 562 and r.grpo.prompts_per_step == 8
        assert (r.grpo.beta, r.generation.temperature, r.generation.top_p) == (0.001, 1.0, 0.95)
        assert r.generation.max_completion_tokens == 768 and r.schedule.max_grad_norm == 5.0


def test_demo_recipe_matches_the_shipped_tiny_recipe_but_not_its_folders():
    """Same training values; the runbook's recipe and the demo never share a run folder."""
    from echoink_lite.demo import DEMO_RECIPE, demo_recipe
    from echoink_lite.recipe import flatten

    folders = {"model.name_or_path", "data.train", "data.valid", "checkpoint.output_dir", "logging.run_name"}

    def values(r):
        return {k: v for k, v in flatten(r.model_dump(mode="json")).items() if k not in folders}

    shipped = recipe_from_dict(yaml.safe_load((Path(__file__).parent.parent / "recipes" / "tiny_cpu.yaml").read_text()))
    demo = recipe_from_dict(DEMO_RECIPE)
    assert values(shipped) == values(demo)
    demo_run = Path(demo_recipe(Path("demo_runs/demo")).checkpoint.output_dir)
    assert Path(shipped.checkpoint.output_dir).parent != demo_run.parent
    assert not Path(shipped.model.name_or_path).is_relative_to(demo_run.parent)


def test_derived_numbers():
    r = recipe_from_dict({"grpo": {"prompts_per_step": 8, "group_size": 4, "micro_batch_size": 8, "rollout_batch_size": 8}})
    d = r.derived(n_train_rows=100, world_size=2)
    assert d["completions_per_step"] == 32 and d["completions_per_process"] == 16
    # a micro-batch holds completions of one group: 4 prompts per process -> 4 micro-batches of 4
    assert d["micro_batches_per_step"] == 4 and d["decode_batches_per_step"] == 2
    assert d["total_steps"] == 13 and d["steps_per_epoch"] == 13


@pytest.mark.parametrize(
    "data, message",
    [
        ({"grpo": {"prompts_per_step": 8, "group_size": 16, "micro_batch_size": 5}}, "micro_batch_size=5 does not divide group_size=16"),
        ({"grpo": {"group_size": 16, "rollout_batch_size": 12}}, "rollout_batch_size=12 must be a multiple or a divisor"),
        ({"grpo": {"group_size": 1}}, "group_size"),
        ({"grpo": {"rewards": {}}}, "grpo.rewards is empty"),
        ({"grpo": {"beta": -1}}, "grpo.beta"),
        ({"generation": {"top_p": 1.5}}, "generation.top_p"),
        ({"model": {"dtype": "int8"}}, "model.dtype"),
        ({"schedule": {"warmup_steps": 10, "max_steps": 5}}, "lower warmup_steps or raise max_steps"),
        ({"grpo": {"group_sise": 8}}, "unknown key 'grpo.group_sise' (did you mean 'grpo.group_size'?)"),
        ({"modle": {}}, "unknown key 'modle' (did you mean 'model'?)"),
        ({"quantization": {"load_in_4bit": False, "quantize_lm_head": True}}, "quantize_lm_head needs"),
    ],
)
def test_bad_recipes_fail_with_their_message(data, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data)
    assert message in str(err.value)


def test_overrides_parse_values_and_refuse_typos(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("grpo:\n  group_size: 16\n")
    r = load_recipe(p, ["grpo.group_size=8", "schedule.max_steps=3", "model.gradient_checkpointing=false",
                        "logging.report_to=[tensorboard]"])
    assert (r.grpo.group_size, r.schedule.max_steps, r.model.gradient_checkpointing) == (8, 3, False)
    assert r.logging.report_to == ["tensorboard"]
    with pytest.raises(RecipeError, match="did you mean 'grpo.group_size'"):
        load_recipe(p, ["grpo.gruop_size=8"])
    with pytest.raises(RecipeError, match="did you mean 'grpo.group_size'"):
        load_recipe(p, ["group_size=8"])
    with pytest.raises(RecipeError, match="not key=value"):
        apply_overrides({}, ["grpo.group_size"])


def test_yaml_is_read_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_math_fields_and_resume_hash():
    a = recipe_from_dict({})
    b = recipe_from_dict({"logging": {"run_name": "x"}, "checkpoint": {"output_dir": "elsewhere", "keep_last": 9}})
    c = recipe_from_dict({"grpo": {"beta": 0.0}})
    assert a.math_hash() == b.math_hash()
    assert changed_math_fields(a.math_dict(), b) == []
    assert a.math_hash() != c.math_hash()
    assert changed_math_fields(a.math_dict(), c) == ["grpo.beta: 0.001 -> 0.0"]


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ("schedule:\n  learning_rate: .inf\n", [], "schedule.learning_rate"),
        ("grpo:\n  beta: .nan\n", [], "grpo.beta"),
        ("grpo:\n  rewards: {accuracy: .inf, format: 1.0}\n", [], "grpo.rewards.accuracy"),
        ("grpo:\n  group_size: 8\n", ["schedule.max_grad_norm=inf"], "schedule.max_grad_norm"),
        ("grpo:\n  group_size: 8\n", ["data.max_audio_seconds=nan"], "data.max_audio_seconds"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, text, overrides, key):
    """`learning_rate: .inf` used to validate, then the loss was NaN at step 2."""
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(p, overrides)
    assert f"{key}: Input should be a finite number" in str(err.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n"])
def test_an_empty_recipe_file_is_an_error(tmp_path, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match="the recipe is empty; start from one in recipes/"):
        load_recipe(p)


def test_a_non_utf8_recipe_is_a_one_line_error(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("description: \"caf\xe9\"\ngrpo:\n  group_size: 8\n".encode("latin-1"))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    assert str(err.value) == f"{p}: not UTF-8 text (byte 0xe9 at offset 17); save the recipe as UTF-8"


def test_a_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match="is a folder, not a recipe file"):
        load_recipe(tmp_path)


@pytest.mark.parametrize(
    "name, message",
    [
        ("accuraccy", "grpo.rewards['accuraccy']: unknown reward 'accuraccy' (did you mean 'accuracy'?); "
                      "the built-ins are accuracy, format"),
        ("no_such_package.rewards:fn", "cannot import reward 'no_such_package.rewards:fn'"),
        ("rewards_for_tests:no_such_function", "cannot import reward 'rewards_for_tests:no_such_function'"),
        ("math:pi", "reward 'math:pi' is not callable"),
    ],
)
def test_unusable_reward_names_fail_when_the_recipe_is_validated(name, message):
    """Not after the model has loaded: the recipe itself names the key and the fix."""
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"grpo": {"rewards": {name: 1.0}}}, "r.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rewards_of_ones_own_resolve_and_the_check_can_be_skipped():
    r = recipe_from_dict({"grpo": {"rewards": {"rewards_for_tests:char_diversity": 1.0, "format": 0.5}}})
    assert list(r.grpo.rewards) == ["rewards_for_tests:char_diversity", "format"]
    skipped = recipe_from_dict({"grpo": {"rewards": {"gone_package:fn": 1.0}}}, check_rewards=False)
    assert skipped.grpo.rewards == {"gone_package:fn": 1.0}


def test_every_key_names_its_trl_grpo_config_equivalent():
    """Checked against the installed TRL (pinned in pyproject.toml), not from memory."""
    import dataclasses

    from trl import GRPOConfig

    from echoink_lite.recipe_reference import TRL_GRPO_CONFIG, explain

    assert set(TRL_GRPO_CONFIG) == {key for key, *_ in explain()}
    config_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    for key, (fields, text) in TRL_GRPO_CONFIG.items():
        assert set(fields) <= config_fields, key
        assert all(name in text for name in fields), key
        assert fields or text.startswith("none"), f"{key}: a key without a GRPOConfig field says so"
    assert TRL_GRPO_CONFIG["grpo.group_size"][1] == "num_generations"
    assert TRL_GRPO_CONFIG["generation.max_completion_tokens"][1] == "max_completion_length"
    assert "max_prompt_length" not in config_fields  # why generation.max_prompt_tokens has none


def test_the_readme_lists_the_same_trl_equivalents():
    from echoink_lite.recipe_reference import TRL_GRPO_CONFIG

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [key for key, (_, text) in TRL_GRPO_CONFIG.items() if f"| `{key}` | {text} |" not in readme]
    assert missing == []
