"""Ask a (trained) thinker one audio + image question: `echoink-lite infer`.

The question goes through the same prompt path as training and evaluation: with `--options` the text is
the paper's prompt (question, options, reasoning instruction), built by `answer_protocol.build_prompt_text`; without
options the question is sent as written. Media get the training caps (16 kHz mono, first 10 s; pixel cap).
The completion streams to the terminal as it is generated, then a panel shows the reasoning (`<think>`)
and the answer (`<answer>`, parsed strictly against the option letters when options are given).

Model choice works as in `eval`: without `--model` an adapter's base is the one its adapter_config.json
names, the base is quantized as the adapter was trained (`--quantization` overrides), and the adapter is
checked against the base before it is attached. Media paths are checked before the model loads; a single
`--options` value draws a warning (the model could only answer A).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .answer_protocol import build_prompt_text, extract_answer, extract_think, option_letters, parse_answer
from .data import DataError
from .eval_model import load_model, resolve_base_model, resolve_quantization
from .eval_protocols import PAPER_TEMPERATURE, PAPER_TOP_P, EvalError
from .flag_ranges import check_flags
from .media import (ImageAspectRatioError, audio_limit_problem, audio_sample_problem, image_limit_problem, load_audio,
                    load_image)
from .modeling import default_device, multimodal_token_ids
from .prompting import collate, completion_mask, decode_completions, encode_text_prompt, generation_kwargs, to_device

_LETTERED = re.compile(r"^[A-Z]\. ")


def _normalise_options(options: list[str]) -> list[str]:
    """Options as "A. ...", "B. ...": given that way, or lettered here when none carries a letter."""
    lettered = [bool(_LETTERED.match(o)) for o in options]
    if all(lettered):
        return list(options)
    if not any(lettered):
        if len(options) > 26:
            raise DataError(f"at most 26 options, got {len(options)}")
        return [f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options)]
    raise DataError(
        f"options {options!r} mix lettered and unlettered entries; write all as \"A. ...\", \"B. ...\" or none"
    )


def _check_media_path(kind: str, path) -> None:
    """One line naming what `path` is when it is not a file we can read."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"--{kind} {path} is a folder, not a file; pass one {kind} file inside it")
    if not p.exists():
        raise DataError(f"{kind} file {path} does not exist; check the --{kind} path")
    if not p.is_file():
        raise DataError(f"--{kind} {path} is not a regular file (a device or pipe?); pass an {kind} file")


def _load_media(audio_path, image_path, max_audio_seconds: float, max_pixels: int):
    for kind, path in (("audio", audio_path), ("image", image_path)):
        _check_media_path(kind, path)
    try:
        audio = load_audio(audio_path, max_seconds=max_audio_seconds)
    except Exception as err:
        raise DataError(f"audio file {audio_path} cannot be decoded ({err}); pass a WAV/FLAC/OGG file") from err
    if audio.size == 0:
        raise DataError(f"audio file {audio_path} holds no samples")
    problem = audio_sample_problem(audio)
    if problem:
        raise DataError(f"audio file {audio_path} {problem}; pass another file")
    problem = audio_limit_problem(audio.size)
    if problem:
        raise DataError(f"audio file {audio_path} {problem}; pass a longer clip")
    try:
        image = load_image(image_path, max_pixels=max_pixels)
    except ImageAspectRatioError as err:
        raise DataError(f"image file {image_path} {err}; crop or pad the image") from err
    except Exception as err:
        raise DataError(f"image file {image_path} cannot be decoded ({err}); pass a JPEG/PNG file") from err
    problem = image_limit_problem(*image.size)
    if problem:
        raise DataError(f"image file {image_path} {problem}; crop or pad the image")
    return audio, image


def infer(
    model,
    processor,
    audio_path: str | Path,
    image_path: str | Path,
    question: str,
    options: list[str] | None = None,
    max_new_tokens: int = 768,
    do_sample: bool = False,
    temperature: float = PAPER_TEMPERATURE,
    top_p: float = PAPER_TOP_P,
    stream: bool = True,
    console=None,
    max_audio_seconds: float = 10.0,
    max_pixels: int = 256 * 28 * 28,
) -> dict[str, Any]:
    """Generate one completion. Returns completion, think, answer, prompt_tokens, new_tokens.

    `answer` is the strictly parsed option letter when options are given (None if the model gave none of
    them), else the `<answer>` text as written. With `stream`, text is printed to stdout as it comes.
    """
    from transformers import TextStreamer

    check_flags(max_new_tokens=max_new_tokens)
    audio, image = _load_media(audio_path, image_path, max_audio_seconds, max_pixels)
    opts = _normalise_options(options) if options else None
    text = build_prompt_text(question, opts) if opts else question
    tokenizer = processor.tokenizer
    enc = encode_text_prompt(processor, text, image, audio)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    param = next(model.parameters())
    float_dtype = param.dtype if param.is_floating_point() else None
    if float_dtype is not None and float_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        float_dtype = None
    batch = to_device(collate([enc], pad_token_id=pad_id), param.device, float_dtype)
    kw = generation_kwargs(
        tokenizer, do_sample=do_sample, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=50, suppress_ids=multimodal_token_ids(tokenizer),
    )
    if stream:
        kw["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        sequences = model.generate(**batch, **kw)
    if stream:
        print(flush=True)  # the streamer ends without a newline when max_new_tokens cuts the text
    completion_ids = sequences[:, batch["input_ids"].shape[1]:].cpu()
    mask = completion_mask(completion_ids, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    completion = decode_completions(tokenizer, completion_ids, mask)[0]
    if opts:
        answer = parse_answer(completion, option_letters(opts), lenient=False)
    else:
        answer = extract_answer(completion)
    return {
        "completion": completion,
        "think": extract_think(completion),
        "answer": answer,
        "prompt_tokens": enc.length,
        "new_tokens": int(mask.sum()),
    }


def option_warnings(options: list[str] | None) -> list[str]:
    """Warnings about --options that are probably a mistake (the command still runs)."""
    if options is not None and len(options) == 1:
        return [f"--options got a single option ({options[0]!r}): the model can only answer A. Pass each option "
                'as its own argument, e.g. --options "A. a dog" "B. a car"']
    return []


def run_infer(audio, image, question: str, *, model: str | None = None, adapter: str | None = None,
              merged: str | None = None, options: list[str] | None = None, max_new_tokens: int = 768,
              do_sample: bool = False, stream: bool = True, quantization: str = "auto", dtype: str | None = None,
              console=None) -> dict:
    """Load the model as `eval` would (the adapter's own base and training quantization) and answer one
    question; raises EvalError, DataError or ModelLoadError with a one-line message."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    check_flags(max_new_tokens=max_new_tokens)  # before minutes of model loading
    if adapter and merged:
        raise EvalError("--adapter and --merged are alternatives: pass one of them")
    for kind, path in (("audio", audio), ("image", image)):  # before minutes of model loading
        _check_media_path(kind, path)
    dtype = dtype or ("bfloat16" if default_device().type == "cuda" else "float32")
    base, source = resolve_base_model(model, adapter, merged)
    quant, description = resolve_quantization(quantization, None if merged else adapter)
    if base and source != "--model":
        console.print(f"base model: {escape(base)} (from {escape(source)}; --model overrides)", highlight=False)
    if adapter:
        console.print(f"base quantization: {escape(description)}", highlight=False)
    loaded, processor = load_model(base, adapter=adapter, merged=merged, dtype=dtype, quantization=quant)
    return infer(loaded, processor, audio, image, question, options=options, max_new_tokens=max_new_tokens,
                 do_sample=do_sample, stream=stream, console=console)
