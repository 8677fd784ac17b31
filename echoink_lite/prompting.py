"""One prompt path for training, evaluation, inference and the demo.

An `Example` becomes chat messages (user turn = [image, audio, text], no system message, so the template's
default "You are a helpful assistant." turn is used, exactly as the original), then processor tensors for
that single prompt. Each prompt is processed once; batches for `generate` and for the loss forward are
built by repeating and left-padding those tensors (`collate`), which keeps the Whisper feature extraction
out of the per-completion path.

Audio features are cut to the clip (`processor_call`). The Hub checkpoint's Whisper extractor pads every
clip to 300 s (`n_samples` 4,800,000 in its preprocessor_config.json): 30,000 feature frames for a 1 s clip,
most of the encoding time of a row. The thinker never reads the padding: `get_audio_features`
(transformers models/qwen2_5_omni/modeling_qwen2_5_omni.py) keeps only the frames `feature_attention_mask`
marks, and the audio tower chunks those by their lengths. So the extractor pads only to the clip plus
`n_fft + hop_length` samples of silence (the windows that overlap the clip's end then see the same zeros as
with 300 s of padding, not the reflection at the array's end) and the frames past the mask are dropped.
The kept frames are bit-identical to the 300-s ones (tests/test_audio_trim.py checks the features, the audio
tower's output and the thinker's logits); batches pad them again to their longest clip (`stack_audio`).

Messages carry only the keys the template needs: rows from a `datasets.Dataset` carry `audio=None` keys on
text parts, and the official Qwen2.5-Omni chat template (its `chat_template.json`) renders any content part
with an `audio` key (`content['type'] == 'audio' or 'audio' in content`) as an audio placeholder.

`encode_row` is the one way training and evaluation turn a row into model inputs: it loads the media with
the caps and limits of `row_media.load_example` and encodes the prompt, and any failure of either is a
`data.RowEncodeError` that names the row, so callers skip the row and count it by its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import ENCODE_FAILED, NONFINITE_AUDIO, PROMPT_TOO_LONG, Row, RowEncodeError
from .row_media import Example, load_example


class PromptTooLongError(RowEncodeError):
    """A prompt that does not fit the recipe's caps (reason ``prompt_too_long``); the message names the row
    and the knobs."""


def build_messages(question_text: str, system: str | None = None) -> list[dict[str, Any]]:
    """User turn = [image, audio, text]. `system`: an explicit system turn, built as the original's evaluation
    builds it for the base model (`{"role": "system", "content": [{"type": "text", "text": ...}]}`)."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": question_text}]}
    if system is None:
        return [user]
    return [{"role": "system", "content": [{"type": "text", "text": system}]}, user]


def render_prompt(processor, question_text: str, system: str | None = None) -> str:
    return processor.apply_chat_template(build_messages(question_text, system), add_generation_prompt=True, tokenize=False)


@dataclass
class Encoded:
    """Processor output for one prompt (batch dimension 1 for ids, features; pixel rows for the image)."""

    input_ids: torch.Tensor  # [L]
    pixel_values: torch.Tensor  # [patches, dim]
    image_grid_thw: torch.Tensor  # [1, 3]
    input_features: torch.Tensor  # [mel, frames] (the clip's frames only: see the module docstring)
    feature_attention_mask: torch.Tensor  # [frames]
    problem_id: Any = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def audio_padding_samples(feature_extractor, n_samples: int) -> int | None:
    """Samples to pad a clip of `n_samples` to so that its feature frames equal those of the extractor's full
    padding (None when the extractor is not Whisper-like: then it pads as configured)."""
    n_fft, hop, limit = (getattr(feature_extractor, k, None) for k in ("n_fft", "hop_length", "n_samples"))
    if not all(isinstance(v, int) and v > 0 for v in (n_fft, hop, limit)):
        return None
    return min(limit, -(-(n_samples + n_fft + hop) // hop) * hop)  # a whole number of hops, never past the cap


def processor_call(processor, text: str, image, audio, trim_audio: bool = True):
    """The processor on one prompt; audio features cut to the clip (module docstring). `trim_audio=False`
    gives the extractor's own padding (300 s for the Hub checkpoint), for tests and benchmarks."""
    kw: dict[str, Any] = {}
    pad_to = audio_padding_samples(getattr(processor, "feature_extractor", None), len(audio)) if trim_audio else None
    if pad_to is not None:
        kw["audio_kwargs"] = {"max_length": pad_to}
    out = processor(text=[text], images=[image], audio=[audio], return_tensors="pt", padding=False, **kw)
    features, mask = out["input_features"][0], out["feature_attention_mask"][0]
    frames = int(mask.sum())
    if trim_audio and bool(mask[:frames].all()):  # the extractor pads on the right: the clip's frames come first
        features, mask = features[:, :frames], mask[:frames]
    out["input_features"], out["feature_attention_mask"] = features, mask
    return out


def encode_example(processor, example: Example, max_prompt_tokens: int | None = None, question_text: str | None = None,
                   system: str | None = None) -> Encoded:
    text = render_prompt(processor, question_text if question_text is not None else example.row.prompt_text, system)
    out = processor_call(processor, text, example.image, example.audio)
    enc = Encoded(
        input_ids=out["input_ids"][0],
        pixel_values=out["pixel_values"],
        image_grid_thw=out["image_grid_thw"],
        input_features=out["input_features"],
        feature_attention_mask=out["feature_attention_mask"],
        problem_id=example.row.problem_id,
    )
    # load_example refuses the media that give non-finite features; this catches any other way to get them,
    # since one such prompt makes its whole step's loss and gradients non-finite.
    for what, tensor, reason in (("audio features", enc.input_features, NONFINITE_AUDIO),
                                 ("image pixel values", enc.pixel_values, ENCODE_FAILED)):
        if not bool(torch.isfinite(tensor).all()):
            row = example.row
            raise RowEncodeError(reason, f"row {row.index} (problem_id {row.problem_id!r}): the processor's {what} of "
                                 f"{row.audio_path.name} + {row.image_path.name} are not finite; replace the media or "
                                 "remove the row", problem_id=row.problem_id, index=row.index)
    if max_prompt_tokens is not None and enc.length > max_prompt_tokens:
        row = example.row
        raise PromptTooLongError(
            PROMPT_TOO_LONG,
            f"row problem_id={row.problem_id} ({row.audio_path.name}, {row.image_path.name}) "
            f"has a {enc.length}-token prompt, over generation.max_prompt_tokens={max_prompt_tokens}. "
            "Fix: raise generation.max_prompt_tokens, or lower data.max_audio_seconds (25 tokens/s) or "
            "data.max_pixels (28*28 pixels per token).",
            problem_id=row.problem_id,
            index=row.index,
        )
    return enc


def encode_row(
    processor, row: Row, *, max_audio_seconds: float, max_pixels: int, max_prompt_tokens: int | None = None,
    question_text: str | None = None, system: str | None = None,
) -> Encoded:
    """Load a row's media and encode its prompt for the thinker, exactly as training and evaluation use it.
    `question_text` / `system` replace the training prompt's text and add a system turn (evaluation protocols).

    Raises ``RowEncodeError`` (and only that) when the row cannot be used; ``err.reason`` is one of
    ``data.REASONS`` for media (a ``MediaError``), ``prompt_too_long`` (a ``PromptTooLongError``) or
    ``encode_failed`` (any other processor failure); ``err.problem_id`` / ``err.index`` say which row and
    ``str(err)`` is one line naming it and the fix.
    """
    example = load_example(row, max_audio_seconds=max_audio_seconds, max_pixels=max_pixels)
    try:
        return encode_example(processor, example, max_prompt_tokens=max_prompt_tokens, question_text=question_text,
                              system=system)
    except RowEncodeError:
        raise
    except Exception as err:  # the processor raises ValueError, RuntimeError, IndexError, ... on odd inputs
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise RowEncodeError(
            ENCODE_FAILED,
            f"row {row.index} (problem_id {row.problem_id!r}): the processor cannot encode "
            f"{row.audio_path.name} + {row.image_path.name} ({type(err).__name__}: {first_line}); "
            "replace the media or remove the row",
            problem_id=row.problem_id,
            index=row.index,
        ) from err


def encode_text_prompt(processor, question_text: str, image, audio) -> Encoded:
    """Encode a free question (used by `infer`), same template and processor as training."""
    text = render_prompt(processor, question_text)
    out = processor_call(processor, text, image, audio)
    return Encoded(out["input_ids"][0], out["pixel_values"], out["image_grid_thw"], out["input_features"], out["feature_attention_mask"])


def stack_audio(encoded: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, mel, frames] features, [B, frames] mask) of prompts whose clips differ in length: right-padded
    with zeros to the longest, mask 0 there (frames the thinker never reads)."""
    frames = max(int(e.input_features.shape[-1]) for e in encoded)
    features = encoded[0].input_features.new_zeros((len(encoded), encoded[0].input_features.shape[0], frames))
    mask = encoded[0].feature_attention_mask.new_zeros((len(encoded), frames))
    for i, e in enumerate(encoded):
        n = int(e.input_features.shape[-1])
        features[i, :, :n], mask[i, :n] = e.input_features, e.feature_attention_mask
    return features, mask


def collate(encoded: list[Encoded], repeats: int = 1, pad_token_id: int = 0, completions: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Batch prompts for the thinker: each prompt repeated `repeats` times, left-padded.

    With `completions` (one 1-D tensor per batch row, already padded to a common length), the sequences
    are prompt + completion, for the log-prob forward.
    """
    items = [e for e in encoded for _ in range(repeats)]
    width = max(e.length for e in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        ids[i, width - e.length:] = e.input_ids
        mask[i, width - e.length:] = 1
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.cat([e.pixel_values for e in items]),
        "image_grid_thw": torch.cat([e.image_grid_thw for e in items]),
    }
    batch["input_features"], batch["feature_attention_mask"] = stack_audio(items)
    if completions is not None:
        comp = torch.stack(completions)
        batch["input_ids"] = torch.cat([ids, comp], dim=1)
        batch["attention_mask"] = torch.cat([mask, torch.ones_like(comp)], dim=1)
    return batch


def to_device(batch: dict[str, torch.Tensor], device, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device)
        if float_dtype is not None and v.is_floating_point():
            v = v.to(float_dtype)
        out[k] = v
    return out


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for tokens up to and including the first EOS (`<|im_end|>`), 0 after it."""
    is_eos = completion_ids == eos_token_id
    seen_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (seen_before == 0).long()


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    texts = []
    for ids, m in zip(completion_ids, mask):
        texts.append(tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True))
    return texts


def generation_kwargs(tokenizer, *, do_sample: bool, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, suppress_ids: list[int] | None = None) -> dict[str, Any]:
    """Keyword arguments for `thinker.generate`: EOS = `<|im_end|>`, multimodal markers suppressed."""
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    if suppress_ids:
        kw["suppress_tokens"] = suppress_ids
    return kw
