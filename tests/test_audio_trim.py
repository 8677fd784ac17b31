"""Audio features cut to the clip give exactly what the Hub processor's 300-s padding gives.

The Hub checkpoint's Whisper extractor pads every clip to 300 s (30,000 feature frames); `prompting` pads
only a little past the clip and keeps the clip's frames. These tests run the tiny model with the Hub's
extractor settings (tests/conftest.py `tiny_model_dir`) on clips of several lengths, and compare the
features, the audio tower's output and the thinker's logits with and without the cut.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from echoink_lite.modeling import load_processor, load_thinker
from echoink_lite.prompting import Encoded, collate, processor_call, render_prompt, stack_audio
from echoink_lite.thinker_forward import encode_prompts

# Clip lengths in samples at 16 kHz: whole and odd numbers of hops, and one past the 300-s cap.
CLIPS = [8000, 16000, 21_937, 116_819]
OVER_CAP = 300 * 16000 + 4321


def clip(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * (300 + 200 * seed) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(str(tiny_model_dir), max_pixels=16 * 28 * 28)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))


def encoded(processor, image, audio, trim: bool) -> Encoded:
    out = processor_call(processor, render_prompt(processor, "Which one?"), image, audio, trim_audio=trim)
    return Encoded(out["input_ids"][0], out["pixel_values"], out["image_grid_thw"], out["input_features"],
                   out["feature_attention_mask"])


@pytest.mark.parametrize("n", CLIPS + [OVER_CAP])
def test_cut_features_are_the_padded_features_of_the_clip(processor, image, n):
    audio = clip(n, seed=1)
    padded, cut = encoded(processor, image, audio, trim=False), encoded(processor, image, audio, trim=True)
    assert padded.input_features.shape[-1] == 30000  # the Hub extractor's padding
    frames = int(padded.feature_attention_mask.sum())
    assert frames == min(-(-n // 160), 30000)
    assert cut.input_features.shape[-1] == frames and bool(cut.feature_attention_mask.all())
    assert torch.equal(cut.input_features, padded.input_features[:, :frames])
    assert torch.equal(cut.input_ids, padded.input_ids)  # the same number of audio placeholders


def test_thinker_outputs_are_unchanged_by_the_cut(tiny_model_dir, processor, image):
    """A batch of clips of different lengths: audio tower output, prompt embeddings and logits with the cut
    features (padded to the batch's longest clip) equal those with 300 s of padding."""
    model = load_thinker(str(tiny_model_dir), dtype="float32", device="cpu").eval()
    audios = [clip(n, seed=i) for i, n in enumerate(CLIPS)]
    padded = [encoded(processor, image, a, trim=False) for a in audios]
    cut = [encoded(processor, image, a, trim=True) for a in audios]
    f_pad, m_pad = stack_audio(padded)
    f_cut, m_cut = stack_audio(cut)
    assert f_pad.shape[-1] == 30000 and f_cut.shape[-1] == max(e.input_features.shape[-1] for e in cut) < 1000
    inner = model.model
    with torch.no_grad():
        tower_pad = inner.get_audio_features(f_pad, m_pad, return_dict=True).last_hidden_state
        tower_cut = inner.get_audio_features(f_cut, m_cut, return_dict=True).last_hidden_state
        assert tower_pad.shape[0] == sum(int((e.input_ids == inner.config.audio_token_id).sum()) for e in cut)
        assert torch.equal(tower_pad, tower_cut)
        for a, b in zip(encode_prompts(model, padded, "cpu", torch.float32), encode_prompts(model, cut, "cpu", torch.float32)):
            assert torch.equal(a.embeds, b.embeds) and torch.equal(a.positions, b.positions)
        pad_id = processor.tokenizer.pad_token_id
        logits_pad = model(**collate(padded, pad_token_id=pad_id)).logits
        logits_cut = model(**collate(cut, pad_token_id=pad_id)).logits
    assert torch.equal(logits_pad, logits_cut)
