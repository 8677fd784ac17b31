"""Every `model.attn_implementation` the recipe accepts is exact in the engine; every other value is refused in
one line, by recipe validation (train, plan, recipes validate) and by model loading (eval, infer, merge checks).

Exactness itself is checked per accepted backend by the tests that take conftest's `backend_setup`:
test_engine.py (loss-pass log-probs and LoRA gradients equal the full forward; rollout log-probs equal the
loss pass's) and test_rollout.py (greedy rollouts are token-identical to `generate`).
"""

from pathlib import Path
from typing import get_args

import pytest
import torch

from conftest import accepted_attention_backends
from echoink_lite.attention import EXACT_BACKENDS, UnsupportedAttentionError, layer_mask
from echoink_lite.cli import main
from echoink_lite.recipe import ModelSection, RecipeError, load_recipe

TINY = str(Path(__file__).parent.parent / "recipes" / "tiny_cpu.yaml")
SCHEMA_VALUES = get_args(ModelSection.model_fields["attn_implementation"].annotation)


def test_every_value_the_schema_lists_is_either_proven_exact_or_refused():
    accepted = accepted_attention_backends()
    assert set(accepted) == set(EXACT_BACKENDS) & set(SCHEMA_VALUES)
    assert "sdpa" in accepted and "eager" in accepted  # backend_setup runs the exactness tests over these
    for name in set(SCHEMA_VALUES) - set(accepted):
        with pytest.raises(RecipeError) as err:
            load_recipe(None, [f"model.attn_implementation={name}"])
        msg = str(err.value)
        assert "\n" not in msg and f"model.attn_implementation={name} is not supported" in msg
        assert "model.attn_implementation=sdpa" in msg  # the fix


def test_train_refuses_flash_attention_in_one_line_before_loading_anything(capsys):
    assert main(["train", TINY, "model.attn_implementation=flash_attention_2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flash_attention_2 is not supported" in err and "Traceback" not in err


def test_model_loading_refuses_untested_backends_in_one_line(tiny_model_dir):
    """eval and infer load through load_thinker (with sdpa); any other caller asking for an untested backend
    is refused there too."""
    from echoink_lite.modeling import ModelLoadError, load_thinker

    for name in ("flash_attention_2", "flex_attention"):
        with pytest.raises(ModelLoadError) as err:
            load_thinker(str(tiny_model_dir), dtype="float32", attn_implementation=name, device="cpu")
        assert "\n" not in str(err.value) and f"attn_implementation={name} is not supported" in str(err.value)


class _LM:
    def __init__(self, impl, layer_types=("full_attention",)):
        self.config = type("C", (), {"_attn_implementation": impl, "layer_types": list(layer_types)})()


def test_layer_mask_gives_each_backend_its_form():
    hidden = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    allowed = torch.tensor([[True, False, True, True]]).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    assert layer_mask(_LM("sdpa"), None, hidden) is None  # SDPA's own is_causal
    assert layer_mask(_LM("sdpa"), allowed, hidden) is allowed
    eager = layer_mask(_LM("eager"), allowed, hidden)  # additive, in the hidden states' dtype
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager == 0, allowed) and torch.all(eager[~allowed] == torch.finfo(torch.bfloat16).min)
    causal = layer_mask(_LM("eager"), None, hidden)
    assert causal.shape == (1, 1, 3, 3) and torch.equal(causal == 0, torch.ones(3, 3, dtype=torch.bool).tril()[None, None])
    for lm in (_LM("flash_attention_2"), _LM("flex_attention"), _LM("sdpa", ["full_attention", "sliding_attention"])):
        with pytest.raises(UnsupportedAttentionError):
            layer_mask(lm, None, hidden)
