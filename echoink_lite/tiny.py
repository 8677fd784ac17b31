"""An offline tiny Qwen2.5-Omni: tokenizer, processor and thinker built with the real classes.

No machine of this project can reach the Hugging Face Hub, yet the demo and the tests must go through the
same loading code as the real 7B model. So we build, offline and in seconds:

- a byte-level BPE tokenizer (a few hundred tokens) trained on the prompt text, carrying the Omni special
  tokens and the `<think>`/`<answer>` tags as single tokens;
- the Qwen2.5-Omni chat template (reconstructed from the public template: default system turn, image then
  audio placeholders), saved as `chat_template.jinja`;
- a `Qwen2_5OmniThinkerForConditionalGeneration` with tiny widths (about 1 M parameters);
- optionally a complete tiny `Qwen2_5OmniForConditionalGeneration` (thinker + talker + token2wav and a
  `spk_dict.pt`), so merge/export of the full format is tested on the real class.

Everything is saved as a normal model folder that `modeling.load_thinker` reads like a Hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .answer_protocol import PROMPT_INSTRUCTION

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>",
]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# The public Qwen2.5-Omni chat template (same rendering for the parts this kit uses).
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Widths of the tiny thinker. head_dim = 128 / 4 = 32, so mrope_section must sum to 16.
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
TINY_AUDIO = dict(d_model=64, encoder_layers=2, num_hidden_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128)
TINY_VISION = dict(depth=2, hidden_size=64, embed_dim=64, intermediate_size=128, num_heads=2)


def _tokenizer_corpus() -> list[str]:
    from .synth import SYNTH_OPTIONS, SYNTH_QUESTION

    colours = ["red", "blue", "green", "yellow"]
    lines = [
        PROMPT_INSTRUCTION,
        SYNTH_QUESTION + " Options:\n" + "\n".join(SYNTH_OPTIONS) + "\n",
        "system\nYou are a helpful assistant.\nuser\nassistant\n",
        "let me think. wait, Hmm, oh, I see. let's break it down. The picture is " + " or ".join(colours) + ".",
        "The sound is low. The sound is high. A B C D E F",
        "red\nblue\nlow\nhigh\n",
    ]
    return lines * 20


def build_tiny_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE offline and wrap it as a Qwen2 tokenizer with the Omni token attributes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress bars print only blank lines when stdout is not a terminal
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # The processor reads these attributes, exactly as from the real Omni tokenizer_config.json.
        extra_special_tokens={
            "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
        },
    )
    tok.add_tokens(TAG_TOKENS)
    tok.chat_template = OMNI_CHAT_TEMPLATE
    tok.model_max_length = 32768
    return tok


def build_tiny_processor(tokenizer, max_pixels: int = 256 * 28 * 28, min_pixels: int = 4 * 28 * 28):
    from transformers import WhisperFeatureExtractor

    from .modeling import OmniProcessorNoVideo, pil_image_processor_class

    image_processor = pil_image_processor_class()(min_pixels=min_pixels, max_pixels=max_pixels)
    feature_extractor = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    return OmniProcessorNoVideo(
        image_processor=image_processor, feature_extractor=feature_extractor, tokenizer=tokenizer,
        chat_template=OMNI_CHAT_TEMPLATE,
    )


def tiny_thinker_config(tokenizer):
    from transformers import Qwen2_5OmniThinkerConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2_5OmniThinkerConfig(
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        user_token_id=0,
        text_config=dict(
            **TINY_TEXT, vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=False,
            rope_scaling={"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"},
        ),
        audio_config=dict(**TINY_AUDIO, num_mel_bins=128, output_dim=TINY_TEXT["hidden_size"], max_source_positions=1500, n_window=100),
        vision_config=dict(
            **TINY_VISION, out_hidden_size=TINY_TEXT["hidden_size"], fullatt_block_indexes=[1], patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        ),
    )
    # Qwen2_5OmniThinkerConfig does not declare these (in transformers 5.23 only the talker config does), but
    # the thinker's get_rope_index reads config.vision_start_token_id (transformers'
    # models/qwen2_5_omni/modeling_qwen2_5_omni.py), so they are set by hand at the tiny tokenizer's ids.
    cfg.vision_start_token_id = ids["<|vision_bos|>"]
    cfg.vision_end_token_id = ids["<|vision_eos|>"]
    return cfg


def build_tiny_thinker(out_dir: str | Path, seed: int = 0):
    """Save a tiny thinker + tokenizer + processor to `out_dir`; returns the path."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_thinker_config(tokenizer)).float()
    _set_generation_defaults(model, tokenizer)
    with _model_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def _model_folder(out_dir: str | Path):
    """The folder is written aside and swapped in, over nothing but an earlier `tiny` output (`safe_output`)."""
    from .safe_output import replacing_folder

    return replacing_folder(out_dir, "tiny", "tiny OUT")


def _set_generation_defaults(model, tokenizer) -> None:
    gc = model.generation_config
    gc.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gc.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = True, 1.0, 0.95, 50
    gc.use_cache = True


def tiny_full_omni_config(tokenizer):
    """A tiny complete Qwen2.5-Omni config: the tiny thinker plus a tiny talker and token2wav."""
    from transformers import Qwen2_5OmniConfig

    thinker = tiny_thinker_config(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    talker = dict(
        vocab_size=64, embedding_size=TINY_TEXT["hidden_size"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        tts_text_start_token_id=ids["<|im_start|>"], tts_text_end_token_id=ids["<|im_end|>"],
        tts_text_pad_token_id=ids["<|endoftext|>"], tts_codec_start_token_id=60, tts_codec_end_token_id=61,
        tts_codec_pad_token_id=62, tts_codec_mask_token_id=63,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        rope_scaling={"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"},
    )
    token2wav = dict(
        dit_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, ff_mult=2, emb_dim=16,
            num_embeds=64, mel_dim=16, enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 32],
            enc_attention_channels=8, enc_se_channels=8, look_ahead_layers=[1], look_backward_layers=[0],
        ),
        bigvgan_config=dict(
            mel_dim=16, upsample_initial_channel=16, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]],
            upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
        ),
    )
    return Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), talker_config=talker, token2wav_config=token2wav)


def build_tiny_full_omni(out_dir: str | Path, seed: int = 0):
    """Save a tiny complete Qwen2.5-Omni (thinker + talker + token2wav + spk_dict.pt) to `out_dir`."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(tiny_full_omni_config(tokenizer)).float()
    with _model_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        # The real checkpoint ships speaker embeddings for the talker beside the weights (a torch file that
        # transformers reads with weights_only=True); only tensors and plain values are in it.
        torch.save({"Chelsie": {"cond": torch.randn(1, 16), "ref_mel": torch.randn(1, 8, 16), "bos_token": 0}},
                   tmp / "spk_dict.pt")
    return Path(out_dir)
