"""Shared offline fixtures: a tiny Qwen2.5-Omni thinker and a small synthetic AVQA-layout data set.

Both are built once per test session with the real classes, so every test goes through the same loading
code as the real model. Nothing here touches the network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from echoink_lite.tiny import build_tiny_thinker

    return build_tiny_thinker(tmp_path_factory.mktemp("tiny-thinker"))


@pytest.fixture(scope="session")
def tiny_full_model_dir(tmp_path_factory):
    from echoink_lite.tiny import build_tiny_full_omni

    return build_tiny_full_omni(tmp_path_factory.mktemp("tiny-omni"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """OUT with train/ (16 rows) and valid/ (8 rows) in the AVQA-R1-6K layout."""
    from echoink_lite.synth import synth_command

    out = tmp_path_factory.mktemp("synth")
    assert synth_command(out, train=16, valid=8, seed=0) == 0
    return out
