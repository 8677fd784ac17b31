"""Zero warnings on the checkpoint layout users load: train, eval, infer, merge (both formats) and export
on the Hub-layout tiny checkpoint log no library warning and raise no Python warning.

tests/test_warnings.py catches Python deprecation warnings. Library warnings also come through logging:
transformers logged seven "Model config: tts_text_start_token_id must be `None` or an integer within the
vocabulary ..." lines on every load and save of a complete Omni config (see echoink_lite/
omni_config_warnings.py). transformers logs many of its warnings once per process (`warning_once`, an
lru_cache), so the collector below empties that cache first: a message an earlier test already triggered
shows again here.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

from rich.console import Console
from test_warnings import THIRD_PARTY_INTERNAL

LIBRARY_LOGGERS = ("transformers", "peft", "bitsandbytes", "huggingface_hub", "accelerate", "torch")


@contextmanager
def collect_warnings():
    """Yields a list that ends up holding every Python warning (any category, except the known third-party
    ones of tests/test_warnings.py) and every WARNING-or-worse record of the libraries' loggers."""
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process messages show again
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(f"log {record.name}: {record.getMessage()[:200]}")

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found.extend(f"{w.category.__name__} at {w.filename}:{w.lineno}: {str(w.message)[:200]}" for w in caught
                     if not any(str(w.message).startswith(m) for m in THIRD_PARTY_INTERNAL))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_the_collector_sees_a_config_warning_the_filter_must_keep():
    """Not vacuous: the same transformers message about a config other than the talker still shows, also
    for an id name the talker filter knows."""
    from transformers import Qwen2Config

    with collect_warnings() as found:
        Qwen2Config(vocab_size=10, pad_token_id=50, vision_start_token_id=60)
    assert any("pad_token_id must be `None`" in f for f in found), found
    assert any("vision_start_token_id must be `None`" in f for f in found), found


def test_main_commands_on_the_hub_layout_warn_nothing(tiny_model_dir, synth_dir, tmp_path):
    from echoink_lite.evaluate import EvalConfig, run_eval
    from echoink_lite.export import export_adapter
    from echoink_lite.grpo import train
    from echoink_lite.infer import infer
    from echoink_lite.merge import merge_adapter
    from echoink_lite.modeling import load_processor, load_thinker, resolve_thinker_config
    from echoink_lite.recipe import recipe_from_dict

    quiet = Console(quiet=True)
    row = sorted((synth_dir / "valid" / "audios").iterdir())[0], sorted((synth_dir / "valid" / "images").iterdir())[0]
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32", "gradient_checkpointing": True},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(synth_dir / "train"), "valid": str(synth_dir / "valid"), "max_audio_seconds": 1.0},
        "grpo": {"prompts_per_step": 2, "group_size": 2, "micro_batch_size": 4, "rollout_batch_size": 4},
        "generation": {"max_completion_tokens": 4},
        "schedule": {"max_steps": 1, "seed": 0},
        "checkpoint": {"output_dir": str(tmp_path / "run")},
        "logging": {"progress": False},
    })
    with collect_warnings() as found:
        assert resolve_thinker_config(str(tiny_model_dir))[1] is True  # a complete Omni config
        result = train(recipe, console=quiet)  # 4-bit thinker, LoRA, checkpointing, one GRPO step
        adapter = str(result.adapter_dir)
        run_eval(EvalConfig(adapter=adapter, data=str(synth_dir / "valid"), out=str(tmp_path / "eval" / "p.jsonl"),
                            limit=2, max_new_tokens=4, max_audio_seconds=1.0, dtype="float32", device="cpu"), console=quiet)
        model = load_thinker(str(tiny_model_dir), dtype="float32", device="cpu")
        infer(model, load_processor(str(tiny_model_dir)), row[0], row[1], "Which one?", ["A. a", "B. b"],
              max_new_tokens=4, stream=False, console=quiet, max_audio_seconds=1.0)
        for fmt in ("full", "thinker"):
            merge_adapter(adapter, tmp_path / f"merged-{fmt}", format=fmt, dtype="fp32", verify=True, console=quiet)
        export_adapter(adapter, tmp_path / "export")
    assert result.steps_done == 1
    assert not found, "warnings on the Hub layout:\n" + "\n".join(found)
