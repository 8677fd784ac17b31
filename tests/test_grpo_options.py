"""The GRPO variant keys in recipes: TRL's names and aliases, refusals, resume of older runs, explain, plan."""

from pathlib import Path

import pytest

from echoink_lite.grpo_options import VARIANT_DEFAULTS, describe, skips_zero_advantage
from echoink_lite.recipe import Recipe, RecipeError, changed_math_fields, load_recipe, recipe_from_dict

RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.mark.parametrize("old, new", [("sequence", "grpo"), ("token", "dapo")])
def test_the_old_loss_type_names_are_aliases(old, new):
    assert recipe_from_dict({"grpo": {"loss_type": old}}).grpo.loss_type == new
    assert load_recipe(None, [f"grpo.loss_type={old}"]).math_dict() == load_recipe(None, [f"grpo.loss_type={new}"]).math_dict()


def test_the_paper_recipes_keep_the_papers_update():
    for name in ("paper_24gb.yaml", "paper_48gb.yaml"):
        g = load_recipe(RECIPES / name).grpo
        assert (g.loss_type, g.importance_sampling_level, g.num_iterations, g.scale_rewards) == ("grpo", "token", 1, "group")
        assert not g.mask_truncated_completions and g.beta > 0 and not skips_zero_advantage(g)


def test_skipping_is_automatic_only_where_it_is_exact():
    assert skips_zero_advantage(recipe_from_dict({"grpo": {"beta": 0.0}}).grpo)
    assert not skips_zero_advantage(recipe_from_dict({"grpo": {"beta": 0.001}}).grpo)
    assert skips_zero_advantage(recipe_from_dict({"grpo": {"beta": 0.001, "skip_zero_advantage_groups": True}}).grpo)
    assert not skips_zero_advantage(recipe_from_dict({"grpo": {"beta": 0.0, "skip_zero_advantage_groups": False}}).grpo)
    assert "approximate" in describe(recipe_from_dict({"grpo": {"skip_zero_advantage_groups": True}}))


@pytest.mark.parametrize("grpo, message", [
    ({"epsilon": 0.2, "epsilon_high": 0.1}, "grpo.epsilon_high=0.1 is below grpo.epsilon=0.2"),
    ({"loss_type": "cispo"}, "set grpo.epsilon_high=5.0"),
    ({"loss_type": "cispo", "epsilon_high": 0.28}, "a cap below 1 scales every gradient down"),
    ({"epsilon": 1.0}, "grpo.epsilon"),
    ({"num_iterations": 0}, "grpo.num_iterations"),
    ({"scale_rewards": "global"}, "grpo.scale_rewards"),
    ({"importance_sampling_level": "seq"}, "grpo.importance_sampling_level"),
    ({"loss_type": "ppo"}, "'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo' or 'sapo'"),
    ({"sapo_temperature_neg": 0.0}, "grpo.sapo_temperature_neg"),
])
def test_nonsense_combinations_are_one_line_errors(grpo, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"grpo": grpo}, "r.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_saved_before_the_variant_keys_resumes():
    """Its saved math fields lack the new keys and say loss_type 'sequence': that is today's default math."""
    saved = {k: v for k, v in Recipe().math_dict().items() if k not in VARIANT_DEFAULTS}
    saved["grpo.loss_type"] = "sequence"
    assert changed_math_fields(saved, Recipe()) == []
    assert changed_math_fields(saved, recipe_from_dict({"grpo": {"num_iterations": 2}})) == ["grpo.num_iterations: 1 -> 2"]


def test_micro_batch_size_changes_the_math_of_bnpo_only():
    """bnpo normalises each micro-batch by its own tokens (TRL's local batch), so resuming with another size is refused."""
    a, b = load_recipe(None, ["grpo.micro_batch_size=4"]), load_recipe(None, ["grpo.micro_batch_size=8"])
    assert changed_math_fields(a.math_dict(), b) == []
    a, b = (load_recipe(None, [f"grpo.micro_batch_size={m}", "grpo.loss_type=bnpo"]) for m in (4, 8))
    assert changed_math_fields(a.math_dict(), b) == ["grpo.micro_batch_size: 4 -> 8"]


def test_several_updates_per_rollout_show_in_the_memory_plan():
    from echoink_lite.memory_estimate import estimate_memory

    one = estimate_memory(load_recipe(RECIPES / "paper_24gb.yaml"), 24)
    two = estimate_memory(load_recipe(RECIPES / "paper_24gb.yaml", ["grpo.num_iterations=2"]), 24)
    assert "train_kept_logps" not in one.components  # mu = 1: no old log-probs are computed or kept
    completions = 8 * 16  # one process: every completion's old and reference log-probs, fp32, 768 tokens
    assert two.components["train_kept_logps"] == pytest.approx(completions * 768 * 4 * 2 / 2**30)
    assert two.components["train_old_logps_forward"] == pytest.approx(one.components["train_reference_forward"])
    assert two.phases["training"] == pytest.approx(one.phases["training"] + two.components["train_kept_logps"])


def test_recipes_explain_shows_every_new_key_with_its_trl_name():
    """(tests/test_recipe.py holds the README's table to the same texts.)"""
    from echoink_lite.recipe_reference import TRL_GRPO_CONFIG, explain

    rows = {key: (default, trl) for key, default, trl, _ in explain()}
    for key in VARIANT_DEFAULTS:
        trl_name = key.split(".")[1]
        assert key in rows
        assert trl_name in rows[key][1] or key == "grpo.skip_zero_advantage_groups"
    assert "sequence = 'grpo', token = 'dapo'" in rows["grpo.loss_type"][1] and rows["grpo.loss_type"][0] == '"grpo"'
    assert set(VARIANT_DEFAULTS) <= set(TRL_GRPO_CONFIG)
