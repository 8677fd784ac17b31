"""No noise that looks like breakage: no deprecation warnings from the kit's own calls into transformers /
peft / bitsandbytes, no misleading bitsandbytes install hint, no blank lines from the tokenizer build.

pyproject.toml's pytest settings no longer hide DeprecationWarning / FutureWarning wholesale, but a warning
raised inside a library (the usual case: `warnings.warn` without a stacklevel) is attributed to that
library, whoever made the deprecated call. So these tests run the kit's main call paths (processor load with
pixel caps and encoding a row, LoRA with checkpointing, the warm start, one GRPO step) under a filter that
records every warning, and fail on any FutureWarning or DeprecationWarning. Each failure names the warning
and where it was raised.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from contextlib import contextmanager

import pytest

DEPRECATIONS = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)

# Deprecations a library raises about its own code, whoever calls it; the kit cannot act on them. Keep this
# list short, give each its origin, and keep pyproject.toml's `filterwarnings` in step with it.
THIRD_PARTY_INTERNAL = {
    # torch 2.13 torch/utils/mkldnn.py decorates its own classes with it, at import (lazily, mid-run).
    "`torch.jit.script_method` is deprecated": "torch",
}


@contextmanager
def no_deprecation_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    found = [w for w in caught if issubclass(w.category, DEPRECATIONS)
             and not any(str(w.message).startswith(m) for m in THIRD_PARTY_INTERNAL)]
    assert not found, "deprecation warnings from the kit's calls:\n" + "\n".join(
        f"{w.category.__name__} at {w.filename}:{w.lineno}: {str(w.message)[:200]}" for w in found
    )


def test_the_collector_sees_a_library_warning_raised_from_a_kit_call(tiny_model_dir):
    """The check is not vacuous: a deprecated transformers call made here is caught."""
    from echoink_lite.modeling import load_thinker

    model = load_thinker(str(tiny_model_dir), dtype="float32", device="cpu")
    with pytest.raises(AssertionError, match="gradient_checkpointing_enable"):
        with no_deprecation_warnings():
            model.gradient_checkpointing_enable()


def test_processor_with_pixel_caps_encodes_a_row_without_warnings(tiny_model_dir, synth_dir):
    from echoink_lite.data import scan_split
    from echoink_lite.modeling import load_processor
    from echoink_lite.prompting import encode_example
    from echoink_lite.row_media import load_example

    row = scan_split(synth_dir / "train").rows[0]
    with no_deprecation_warnings():
        processor = load_processor(str(tiny_model_dir), max_pixels=64 * 28 * 28, min_pixels=4 * 28 * 28)
        enc = encode_example(processor, load_example(row, max_audio_seconds=1.0))
    assert enc.pixel_values.shape[0] > 0


def test_pixel_caps_still_bound_the_visual_tokens(tiny_model_dir):
    """The caps set through `size` take effect: a large image is brought under max_pixels."""
    import numpy as np
    from PIL import Image

    from echoink_lite.modeling import load_processor

    processor = load_processor(str(tiny_model_dir), max_pixels=16 * 28 * 28)
    big = Image.fromarray(np.zeros((560, 560, 3), dtype=np.uint8))
    out = processor.image_processor(images=[big], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert h * w * 14 * 14 <= 16 * 28 * 28


def test_lora_with_checkpointing_and_a_backward_without_warnings(tiny_model_dir, synth_dir):
    from echoink_lite.data import scan_split
    from echoink_lite.modeling import add_lora, load_processor, load_thinker
    from echoink_lite.prompting import collate, encode_example
    from echoink_lite.recipe import LoraSection
    from echoink_lite.row_media import load_example

    row = scan_split(synth_dir / "train").rows[0]
    with no_deprecation_warnings():
        processor = load_processor(str(tiny_model_dir), max_pixels=256 * 28 * 28)
        model = add_lora(load_thinker(str(tiny_model_dir), dtype="float32", device="cpu"), LoraSection(r=4, alpha=8),
                         gradient_checkpointing=True, seed=0)
        model.train()
        batch = collate([encode_example(processor, load_example(row, max_audio_seconds=1.0))])
        model(**batch, labels=batch["input_ids"]).loss.backward()
    assert model.get_base_model().is_activation_checkpointing


def test_warm_start_step_without_warnings(tiny_model_dir, synth_dir, tmp_path):
    from echoink_lite.warmstart import warm_start

    with no_deprecation_warnings():
        out = warm_start(tiny_model_dir, synth_dir / "train", tmp_path / "warm", steps=1, batch_size=2)
    assert list(out.glob("*.safetensors")) and (out / "spk_dict.pt").is_file()  # the Hub layout, like its base


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_grpo_step_without_warnings(tiny_model_dir, synth_dir, tmp_path, checkpointing):
    from echoink_lite.grpo import train
    from echoink_lite.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32", "gradient_checkpointing": checkpointing},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(synth_dir / "train"), "valid": str(synth_dir / "valid"), "max_audio_seconds": 1.0},
        "grpo": {"prompts_per_step": 2, "group_size": 2, "micro_batch_size": 4, "rollout_batch_size": 4},
        "generation": {"max_completion_tokens": 4},
        "schedule": {"max_steps": 1, "seed": 0},
        "checkpoint": {"output_dir": str(tmp_path / "run")},
        "logging": {"progress": False},
    })
    with no_deprecation_warnings():
        result = train(recipe)
    assert result.steps_done == 1


def test_the_bitsandbytes_kernels_hint_is_dropped_and_its_other_records_kept(caplog):
    import echoink_lite  # noqa: F401  (importing the package installs the filter)
    from bitsandbytes.backends.cpu import ops

    hint = "Failed to load CPU gemm_4bit_forward from kernels-community"
    # The message is the one this bitsandbytes logs (CPUs with AVX512-BF16, no `kernels` package).
    assert hint in inspect.getsource(ops)
    logger = logging.getLogger(ops.__name__)
    with caplog.at_level(logging.WARNING, logger=ops.__name__):
        logger.warning(hint + ": %s. Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
                       "No module named 'kernels'")
        logger.warning("another bitsandbytes CPU message")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes CPU message"]


def test_tiny_tokenizer_build_prints_nothing(capfd):
    from echoink_lite.tiny import build_tiny_tokenizer

    build_tiny_tokenizer()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
