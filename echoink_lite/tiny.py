"""An offline tiny Qwen2.5-Omni, saved in the layout of the real `Qwen/Qwen2.5-Omni-7B` Hub checkpoint.

No machine of this project can reach the Hugging Face Hub, yet the demo and the tests must go through the
same loading code as the real 7B model, on the same files. So we build, offline and in seconds, a complete
`Qwen2_5OmniForConditionalGeneration` (thinker + talker + token2wav, tiny widths, about 1 M thinker
parameters) and write it the way the Hub repository holds it (`build_tiny_omni`, `echoink-lite tiny OUT`):

- `config.json` with model_type `qwen2_5_omni` and `thinker_config`, `talker_config`, `token2wav_config`;
  weights sharded as `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`, keys under
  `thinker.`, `talker.` and `token2wav.`; the talker's speaker embeddings in `spk_dict.pt`;
- the Qwen2 byte-level BPE: the same pre-tokenizer regex, NFC normalizer and byte-level decoder as the
  real `tokenizer.json`, trained on the kit's prompt text only. The 14 Omni special tokens come after the
  ordinary vocabulary in the real order (`<|endoftext|>` first, then `<|im_start|>`, `<|im_end|>`,
  `<|AUDIO|>`, ... `<|VIDEO|>`: ids 151643-151656 in the real tokenizer), and the model's vocabulary is
  padded past the tokenizer (152,064 rows for 151,665 tokens in the real one). `<think>`, `</think>`,
  `<answer>` and `</answer>` are NOT tokens: they are spelled with several ordinary ones, as the real Qwen2
  BPE spells them;
- the tokenizer files the real repository ships (`tokenizer.json`, `vocab.json`, `merges.txt`,
  `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`), with the processor's token
  attributes (`image_token`, `audio_token`, ...) as top-level keys of `tokenizer_config.json`;
- `preprocessor_config.json` with the real processor settings: a Whisper feature extractor that pads every
  clip to 300 s (`chunk_length` 300, `n_samples` 4,800,000, `nb_max_frames` 30,000) and the Qwen2-VL image
  processor's (`min_pixels` 3136, `max_pixels` 12845056); and `chat_template.json` (not
  `processor_config.json` / `chat_template.jinja`, which transformers 5 writes when it saves a processor).

`preprocessor_config.json` holds the values of Qwen/Qwen2.5-Omni-7B's file, key for key; the special tokens'
order follows that repository's `added_tokens.json` (151643-151656). The Hub is not reachable from the
machines this was written on, so both were taken from public copies of those files. The token attributes
of `tokenizer_config.json` are top-level keys, a form transformers 5 reads (`extra_special_tokens` is the
other; `modeling.load_processor` refuses a file with neither).

The thinker-only layout stays available (`build_tiny_thinker`, `echoink-lite tiny OUT --thinker-only`):
what `merge --format thinker` writes and what transformers' `save_pretrained` gives for a thinker and a
processor (`processor_config.json`, `chat_template.jinja`). Both builders give the same thinker weights
for the same seed. The tiny checkpoint is saved in fp32 (the real one is bf16) so that CPU training works.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .answer_protocol import PROMPT_INSTRUCTION

# The Omni special tokens in the real tokenizer's order (ids 151643-151656 there; here right after the
# ordinary vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
]
# The tokenizer attributes `Qwen2_5OmniProcessor` reads (top-level keys of the real tokenizer_config.json).
OMNI_TOKEN_ATTRIBUTES = {
    "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}
# The answer-format tags: ordinary text, several tokens each (tests/test_hub_layout.py holds this).
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# preprocessor_config.json of Qwen/Qwen2.5-Omni-7B: one file for the Whisper feature extractor (audio padded
# to 300 s) and the Qwen2-VL image processor.
HUB_PREPROCESSOR_CONFIG = {
    "chunk_length": 300,
    "dither": 0.0,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056,
    "merge_size": 2,
    "min_pixels": 3136,
    "n_fft": 400,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "padding_side": "right",
    "padding_value": 0.0,
    "patch_size": 14,
    "processor_class": "Qwen2_5OmniProcessor",
    "return_attention_mask": True,
    "sampling_rate": 16000,
    "temporal_patch_size": 2,
}
WHISPER_KEYS = ("chunk_length", "dither", "feature_size", "hop_length", "n_fft", "padding_side", "padding_value",
                "return_attention_mask", "sampling_rate")

# The public Qwen2.5-Omni chat template (the real chat_template.json holds it under "chat_template").
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
VOCAB_MULTIPLE = 128  # the model's vocabulary is padded past the tokenizer, as the real one's is
SHARD_SIZE = "2MB"  # a few shards and an index, like the Hub's five


def _tokenizer_corpus(keep_tags: bool = False) -> list[str]:
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
    if not keep_tags:  # no merge may join the tags' pieces into one token: the real BPE has none
        lines = [re.sub(r"</?(think|answer)>", " ", line) for line in lines]
    return lines * 20


def build_tiny_tokenizer(vocab_size: int = 1024, merge_tags: bool = False):
    """Train a Qwen2-style byte-level BPE offline; the Omni special tokens follow the ordinary vocabulary.
    `merge_tags` also learns merges inside the answer tags (fewer tokens for the prompt's instruction; for
    benchmarks/bench_grpo.py, which matches the paper's prompt length in tokens, never for the tiny model)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    # The pipeline of the real tokenizer.json, as transformers' Qwen2Converter builds it (convert_slow_tokenizer.py).
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress bars print only blank lines when stdout is not a terminal
    )
    bpe.train_from_iterator(_tokenizer_corpus(keep_tags=merge_tags), trainer)
    bpe.add_special_tokens(SPECIAL_TOKENS)
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=dict(OMNI_TOKEN_ATTRIBUTES),  # the processor reads these attributes
    )
    tok.chat_template = OMNI_CHAT_TEMPLATE
    tok.model_max_length = 32768
    return tok


def hub_feature_extractor():
    """The Whisper feature extractor exactly as Qwen/Qwen2.5-Omni-7B configures it (pads to 300 s)."""
    from transformers import WhisperFeatureExtractor

    cfg = HUB_PREPROCESSOR_CONFIG
    return WhisperFeatureExtractor(**{k: cfg[k] for k in WHISPER_KEYS})


def build_tiny_processor(tokenizer, max_pixels: int = 256 * 28 * 28, min_pixels: int = 4 * 28 * 28):
    from .modeling import OmniProcessorNoVideo, pil_image_processor_class

    image_processor = pil_image_processor_class()(min_pixels=min_pixels, max_pixels=max_pixels)
    return OmniProcessorNoVideo(
        image_processor=image_processor, feature_extractor=hub_feature_extractor(), tokenizer=tokenizer,
        chat_template=OMNI_CHAT_TEMPLATE,
    )


def padded_vocab_size(tokenizer) -> int:
    """The model's vocabulary: the tokenizer's length rounded up, with at least a few unused rows (the talker's
    `tts_text_*` ids live there, as 151859-151861 do in the real 152,064-row vocabulary)."""
    return -(-(len(tokenizer) + 3) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def tiny_thinker_config(tokenizer):
    from transformers import Qwen2_5OmniThinkerConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    user = tokenizer.convert_tokens_to_ids("user")
    cfg = Qwen2_5OmniThinkerConfig(
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        user_token_id=user if isinstance(user, int) else 0,
        text_config=dict(
            **TINY_TEXT, vocab_size=padded_vocab_size(tokenizer), max_position_embeddings=8192, tie_word_embeddings=False,
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


def _model_folder(out_dir: str | Path):
    """The folder is written aside and swapped in, over nothing but an earlier `tiny` output (`safe_output`)."""
    from .safe_output import replacing_folder

    return replacing_folder(out_dir, "tiny", "tiny OUT")


def tiny_full_omni_config(tokenizer):
    """A tiny complete Qwen2.5-Omni config: the tiny thinker plus a tiny talker and token2wav."""
    from transformers import Qwen2_5OmniConfig

    thinker = tiny_thinker_config(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = thinker.text_config.vocab_size
    talker = dict(
        # The talker's own vocabulary is its speech codec's; its tts_text_* ids index the THINKER's vocabulary
        # (unused rows past the tokenizer, as in the real checkpoint).
        vocab_size=64, embedding_size=TINY_TEXT["hidden_size"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        tts_text_pad_token_id=vocab - 3, tts_text_start_token_id=vocab - 2, tts_text_end_token_id=vocab - 1,
        tts_codec_start_token_id=60, tts_codec_end_token_id=61, tts_codec_pad_token_id=62, tts_codec_mask_token_id=63,
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


def _tiny_omni_model(tokenizer, seed: int):
    from transformers import Qwen2_5OmniForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5OmniForConditionalGeneration(tiny_full_omni_config(tokenizer)).float()


def build_tiny_omni(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny complete Qwen2.5-Omni to `out_dir` in the Hub repository's layout; returns the path."""
    tokenizer = build_tiny_tokenizer()
    model = _tiny_omni_model(tokenizer, seed)
    with _model_folder(out_dir) as out:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=SHARD_SIZE)
        # The real checkpoint ships speaker embeddings for the talker beside the weights (read back by
        # transformers with torch.load(weights_only=True): tensors and ints only).
        torch.save({"Chelsie": {"cond": torch.randn(1, 16), "ref_mel": torch.randn(1, 8, 16), "bos_token": 0}},
                   out / "spk_dict.pt")
        write_hub_processor_files(tokenizer, out)
    return Path(out_dir)


def build_tiny_thinker(out_dir: str | Path, seed: int = 0) -> Path:
    """Save the tiny thinker alone (`model_type qwen2_5_omni_thinker`) with a processor saved by transformers;
    the same thinker weights as `build_tiny_omni(seed=seed)`. Returns the path."""
    tokenizer = build_tiny_tokenizer()
    thinker = _tiny_omni_model(tokenizer, seed).thinker
    _set_generation_defaults(thinker, tokenizer)
    with _model_folder(out_dir) as out:
        thinker.save_pretrained(out, safe_serialization=True)
        build_tiny_processor(tokenizer).save_pretrained(out)
    return Path(out_dir)


# The builder's name before the Hub layout became the default: the same complete model.
build_tiny_full_omni = build_tiny_omni


def _set_generation_defaults(model, tokenizer) -> None:
    gc = model.generation_config
    gc.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gc.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = True, 1.0, 0.95, 50
    gc.use_cache = True


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hub_processor_files(tokenizer, out: str | Path) -> None:
    """The tokenizer and processor files of the Hub repository, in its format (the one transformers 4.5x
    wrote, which transformers 5 reads but no longer writes)."""
    out = Path(out)
    backend = tokenizer.backend_tokenizer
    backend.save(str(out / "tokenizer.json"))
    backend.model.save(str(out))  # vocab.json, merges.txt
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    additional = SPECIAL_TOKENS[1:]  # every special but <|endoftext|> (the pad token)
    spec = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    _write_json(out / "added_tokens.json", {t: ids[t] for t in sorted(SPECIAL_TOKENS)})
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": additional,
        "eos_token": {"content": "<|im_end|>", **spec},
        "pad_token": {"content": "<|endoftext|>", **spec},
    })
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): {"content": t, **spec, "special": True} for t in SPECIAL_TOKENS},
        "additional_special_tokens": additional,
        **OMNI_TOKEN_ATTRIBUTES,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2_5OmniProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", dict(sorted(config.items())))
    _write_json(out / "preprocessor_config.json", HUB_PREPROCESSOR_CONFIG)
    _write_json(out / "chat_template.json", {"chat_template": OMNI_CHAT_TEMPLATE})
