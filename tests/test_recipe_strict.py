"""Recipes are strict: a repeated key is an error naming its lines, a boolean or a string is not a number, and
`1e-6` is a number (on the command line and in files)."""

import pytest

from echoink_lite import strict_yaml
from echoink_lite.recipe import RecipeError, load_recipe, recipe_from_dict

BASE = "grpo:\n  group_size: 8\n  micro_batch_size: 8\n  rollout_batch_size: 16\n"


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_a_second_section_block_is_refused_naming_both_lines(tmp_path):
    """The issue's case: a second `schedule:` pasted at the end silently replaced the first (and its lr)."""
    text = ("schedule:\n  learning_rate: 1.0e-5\n  warmup_steps: 2\n" + BASE
            + "schedule:\n  learning_rate: 0.003\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text))
    msg = str(err.value)
    assert "r.yaml: line 8: duplicate key 'schedule' (first at line 1)" in msg
    assert "\n" not in msg and "merge" in msg


def test_a_repeated_key_inside_a_section_is_refused(tmp_path):
    text = BASE + "schedule:\n  learning_rate: 1.0e-5\n  seed: 3\n  learning_rate: 0.003\n"
    with pytest.raises(RecipeError, match=r"line 8: duplicate key 'learning_rate' \(first at line 6\)"):
        load_recipe(write(tmp_path, text))
    text = BASE + "  rewards: {accuracy: 1.0, format: 0.5, accuracy: 2.0}\n"
    with pytest.raises(RecipeError, match="duplicate key 'accuracy'"):
        load_recipe(write(tmp_path, text))


def test_a_repeated_key_in_an_override_value_is_refused():
    with pytest.raises(RecipeError, match=r"override 'grpo.rewards=\{accuracy: 1, accuracy: 2\}': duplicate key 'accuracy'"):
        load_recipe(None, ["grpo.rewards={accuracy: 1, accuracy: 2}"])


def test_merge_keys_may_still_override_what_they_merge():
    data = strict_yaml.load("a: &x {lr: 1, seed: 2}\nb:\n  <<: *x\n  lr: 3\n")
    assert data["b"] == {"lr": 3, "seed": 2}
    with pytest.raises(strict_yaml.DuplicateKeyError):
        strict_yaml.load("b:\n  <<: {lr: 1}\n  lr: 3\n  lr: 4\n")


@pytest.mark.parametrize("text, overrides, key", [
    ("lora:\n  r: true\n", [], "lora.r"),
    ("", ["lora.r=true"], "lora.r"),
    ("", ["schedule.learning_rate=false"], "schedule.learning_rate"),
    ("", ["grpo.rewards={accuracy: true}"], "grpo.rewards.accuracy"),
    ("", ["schedule.max_steps=yes"], "schedule.max_steps"),
])
def test_booleans_are_not_numbers(tmp_path, text, overrides, key):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, BASE + text), overrides)
    assert f"{key}: expects a number, not a boolean" in str(err.value)


@pytest.mark.parametrize("data, key, words", [
    ({"lora": {"r": True}}, "lora.r", "not a boolean"),
    ({"lora": {"r": 16.5}}, "lora.r", "expects a whole number, got 16.5"),
    ({"lora": {"r": "16"}}, "lora.r", "not the string '16'"),
    ({"schedule": {"learning_rate": "0.1"}}, "schedule.learning_rate", "not the string '0.1'"),
    ({"model": {"gradient_checkpointing": 1}}, "model.gradient_checkpointing", "valid boolean"),
    ({"model": {"gradient_checkpointing": "false"}}, "model.gradient_checkpointing", "expects true or false"),
    ({"logging": {"run_name": 7}}, "logging.run_name", "put it in quotes"),
])
def test_plain_dicts_are_strict_too(data, key, words):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data)
    assert key in str(err.value) and words in str(err.value)


def test_an_int_is_still_a_float_and_1e_minus_6_is_a_number(tmp_path):
    r = recipe_from_dict({"schedule": {"learning_rate": 1, "epochs": 2}})
    assert r.schedule.learning_rate == 1.0 and isinstance(r.schedule.learning_rate, float)
    r = load_recipe(None, ["schedule.learning_rate=1e-6", "grpo.beta=5E-3", "generation.temperature=1e+0"])
    assert (r.schedule.learning_rate, r.grpo.beta, r.generation.temperature) == (1e-6, 5e-3, 1.0)
    r = load_recipe(write(tmp_path, BASE + "schedule:\n  learning_rate: 3e-4\n  max_grad_norm: 1_0e-1\n"))
    assert (r.schedule.learning_rate, r.schedule.max_grad_norm) == (3e-4, 1.0)
    assert strict_yaml.load("x: 1e3\ny: '1e3'\nz: 10\n") == {"x": 1000.0, "y": "1e3", "z": 10}


def test_a_recipe_nested_too_deeply_is_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, "description: " + "[" * 20000 + "]" * 20000 + "\n"))
    assert "r.yaml" in str(err.value) and "nested too deeply" in str(err.value)
