"""The evaluation protocols of `echoink-lite eval --protocol`: what is asked, how it is decoded, how it is read.

A number is only comparable with another measured under the same protocol, so every evaluation names
its protocol in its summary:

- ``kit`` (the default): the training prompt (question, " Options:", the reasoning instruction), no system
  message, greedy decoding (``--sample`` for the paper's sampling), and the strict parser
  (``answer_protocol.parse_answer``: only ``<answer>X</answer>`` with X one of the row's letters counts).
- ``echoink-base``: the original's evaluation of the base model (its 80.53%), and
- ``echoink-rl``: the original's evaluation of the trained model (its 85.77%), both as in
  HarryHsing/EchoInk, commit 3f6d16a, ``src/omniInstruct-v1_eval_valid.py``:

  =============  ==========================================  ==========================================
                 echoink-base (``BASE_MODEL = True``)        echoink-rl (``BASE_MODEL = False``)
  =============  ==========================================  ==========================================
  user text      problem, options one per line (no           the same question text, then the training
                 " Options:"), "Please answer the following  instruction ("Please think about this
                 question based on the given image and       question as if you were a human..."), then
                 audio.", the multiple-choice sentence       the multiple-choice sentence
  system turn    explicit "You are a helpful assistant."     none (the chat template's default turn)
  decoding       greedy (``thinker_do_sample=False``,        sampled: ``do_sample=True, top_p=0.95,
                 ``repetition_penalty=1.0``)                 temperature=1``; the rest from the
                                                             generation config (see below)
  budget         1024 new tokens: ``Qwen2_5OmniForConditionalGeneration.generate``'s
                 ``thinker_max_new_tokens`` default (the script passes none)
  parsing        ``extract_choice`` on the whole decoded sequence (``answer_protocol.extract_choice``);
                 gold ``GT_RE.search(solution).group(1)``
  =============  ==========================================  ==========================================

  The user turn is [image, audio, text] in both, as in training. The original suppresses no token; these
  protocols do not either (the kit's own protocol suppresses the multimodal markers, as its rollouts do).

**What the generation config supplies (echoink-rl).** The original passes only ``do_sample``, ``top_p`` and
``temperature``; ``top_k`` and ``repetition_penalty`` come from the generation config. The kit reads the
evaluated checkpoint's ``generation_config.json`` (of ``--merged``, else of ``--model`` or the adapter's
base) when there is one and applies its ``top_k`` and ``repetition_penalty``; otherwise transformers'
defaults (top_k 50, repetition_penalty 1.0). The summary says which values were used and where they came
from. Caveat, stated in docs/reproduction.md: inside ``Qwen2_5OmniForConditionalGeneration`` the thinker
generates with its own generation config, which transformers builds from the thinker's model config, not
from the checkpoint's top-level ``generation_config.json``; whether that file's values reached the
original's thinker depends on the transformers version it ran, which its repository does not pin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .answer_protocol import EVAL_SYSTEM_MESSAGE, build_eval_prompt_text, build_prompt_text

PAPER_TEMPERATURE, PAPER_TOP_P = 1.0, 0.95
KIT_MAX_NEW_TOKENS = 768  # the paper's training budget (--max_completion_length 768)
# `thinker_max_new_tokens: int = 1024` in Qwen2_5OmniForConditionalGeneration.generate: the budget the original's
# evaluation ran with, since src/omniInstruct-v1_eval_valid.py passes none.
ORIGINAL_EVAL_MAX_NEW_TOKENS = 1024
# transformers' GenerationConfig defaults (GenerationConfig._get_default_generation_params).
TRANSFORMERS_TOP_K, TRANSFORMERS_REPETITION_PENALTY = 50, 1.0


class EvalError(ValueError):
    """Evaluation settings that cannot work together; the message says what to change."""


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str  # one line for the console and the summary
    prompt_text: Callable[[str, Sequence[str]], str]  # (problem, options) -> user-turn text
    system_message: str | None  # an explicit system turn, or None for the template's default one
    sampled: bool | None  # True: always sampled, False: always greedy, None: --sample decides
    parse_rule: str  # "strict" / "lenient" (kit) or "extract_choice" (the original's)
    max_new_tokens: int  # the default completion budget
    suppress_markers: bool  # suppress the multimodal marker tokens while decoding
    differences: tuple[str, ...] = ()  # what still differs from the protocol it reproduces


_COMMON_DIFFERENCES = (
    "decoding: the kit's rollout engine in batches (greedy picks the same tokens as transformers' generate, "
    "sampling draws from the same filtered distribution); the original calls generate one row at a time",
    "end of reply: the kit stops at <|im_end|>; the original at the eos_token_id of the thinker's generation "
    "config",
    "numerics: the original ran bf16 with flash_attention_2; the kit runs --dtype (bfloat16 on CUDA) with sdpa, "
    "so logits differ by rounding and near-ties can flip",
    "media: the same image sizes, pixels and audio samples as the original's fetch_image and librosa.load for RGB "
    "images and files soundfile reads; images with transparency in modes other than RGBA are laid on white (the "
    "original drops their alpha)",
    "bad rows: the original stops at a row it cannot read; the kit skips it and counts it (bad_rows)",
    "an adapter is evaluated on the base quantized as it was trained (NF4 for QLoRA); the paper's model is a "
    "full bf16 fine-tune",
)

PROTOCOLS: dict[str, Protocol] = {
    "kit": Protocol(
        name="kit",
        description="the kit's own: the training prompt, no system message, greedy unless --sample, strict parsing "
                    "(only <answer>X</answer> with X one of the row's letters counts)",
        prompt_text=build_prompt_text, system_message=None, sampled=None, parse_rule="strict",
        max_new_tokens=KIT_MAX_NEW_TOKENS, suppress_markers=True,
    ),
    "echoink-base": Protocol(
        name="echoink-base",
        description="the original's evaluation of the base model (80.53%; src/omniInstruct-v1_eval_valid.py, "
                    "BASE_MODEL = True): 'Please answer the following question...' prompt, explicit system message, "
                    "greedy, extract_choice",
        prompt_text=lambda problem, options: build_eval_prompt_text(problem, options, "base"),
        system_message=EVAL_SYSTEM_MESSAGE, sampled=False, parse_rule="extract_choice",
        max_new_tokens=ORIGINAL_EVAL_MAX_NEW_TOKENS, suppress_markers=False, differences=_COMMON_DIFFERENCES,
    ),
    "echoink-rl": Protocol(
        name="echoink-rl",
        description="the original's evaluation of the trained model (85.77%; src/omniInstruct-v1_eval_valid.py, "
                    "BASE_MODEL = False): the reasoning prompt, no system message, sampled at temperature 1, "
                    "top_p 0.95, extract_choice",
        prompt_text=lambda problem, options: build_eval_prompt_text(problem, options, "rl"),
        system_message=None, sampled=True, parse_rule="extract_choice",
        max_new_tokens=ORIGINAL_EVAL_MAX_NEW_TOKENS, suppress_markers=False,
        differences=_COMMON_DIFFERENCES + (
            "top_k and repetition_penalty: read from the checkpoint's generation_config.json when it has them, else "
            "transformers' defaults (50, 1.0); the original's thinker takes them from its own generation config",
            "one sampled pass over 1,911 items has a standard error of about 0.8 points: compare means over "
            "--samples K passes",
        ),
    ),
}
PROTOCOL_CHOICES = tuple(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise EvalError(f"--protocol must be one of {', '.join(PROTOCOL_CHOICES)}, not {name!r}")
    return PROTOCOLS[name]


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """How an evaluation picks each token, resolved from the protocol, the flags and the checkpoint."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    suppress_markers: bool
    source: str  # where top_k / repetition_penalty came from

    def describe(self) -> str:
        if not self.do_sample:
            text = "greedy"
            if self.repetition_penalty != 1.0:
                text += f", repetition_penalty {self.repetition_penalty:g}"
        else:
            text = (f"sampled: temperature {self.temperature:g}, top_p {self.top_p:g}, top_k {self.top_k}, "
                    f"repetition_penalty {self.repetition_penalty:g}")
        return f"{text}; at most {self.max_new_tokens} new tokens"


def checkpoint_generation_config(weights: str | None) -> tuple[dict, str | None]:
    """(the checkpoint's generation_config.json as a dict, where it was read) or ({}, None) when it has none.

    A local folder is read directly; a Hub id through transformers' cache (the file is a few hundred bytes,
    and the model download that follows fetches it anyway). JSON only: nothing in it is executed.
    """
    if not weights:
        return {}, None
    folder = Path(weights).expanduser()
    if folder.is_dir():
        path = folder / "generation_config.json"
        found = str(path) if path.is_file() else None
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(weights, "generation_config.json", _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except OSError:  # an unknown repository: the model load that follows names it
            found = None
    if not found:
        return {}, None
    try:
        data = json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalError(f"{found} is not readable JSON ({err}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise EvalError(f"{found} holds a JSON {type(data).__name__}, not an object; fix or delete the file")
    return data, found


def _generation_value(data: dict, key: str, found: str, default, kind):
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise EvalError(f"{found}: '{key}' is {value!r}, not a {kind.__name__}; fix the file")
    return kind(value)


def resolve_decoding(protocol: Protocol, *, do_sample: bool, temperature: float, top_p: float, top_k: int,
                     max_new_tokens: int | None, weights: str | None) -> Decoding:
    """The decoding of an evaluation. `weights`: the checkpoint whose generation_config.json echoink-rl reads
    (the merged folder, else the base)."""
    budget = max_new_tokens if max_new_tokens is not None else protocol.max_new_tokens
    if protocol.sampled is None:  # kit: the flags decide
        if not do_sample:
            return Decoding(False, 1.0, 1.0, 0, 1.0, budget, protocol.suppress_markers, "greedy")
        return Decoding(True, temperature, top_p, top_k, 1.0, budget, protocol.suppress_markers, "--temperature/--top-p")
    if not protocol.sampled:  # echoink-base: generate(thinker_do_sample=False, repetition_penalty=1.0)
        return Decoding(False, 1.0, 1.0, 0, 1.0, budget, protocol.suppress_markers,
                        "greedy, repetition_penalty 1.0 (passed by the original)")
    data, found = checkpoint_generation_config(weights)
    if found is None:
        top_k, penalty = TRANSFORMERS_TOP_K, TRANSFORMERS_REPETITION_PENALTY
        source = "transformers' defaults (top_k 50, repetition_penalty 1.0): the checkpoint has no generation_config.json"
    else:
        top_k = _generation_value(data, "top_k", found, TRANSFORMERS_TOP_K, int)
        penalty = _generation_value(data, "repetition_penalty", found, TRANSFORMERS_REPETITION_PENALTY, float)
        if top_k < 0 or not penalty > 0:
            raise EvalError(f"{found}: top_k {top_k} / repetition_penalty {penalty} are out of range "
                            "(top_k >= 0, repetition_penalty > 0); fix the file")
        source = f"top_k {top_k}, repetition_penalty {penalty:g} from {found} (missing keys: transformers' defaults)"
    return Decoding(True, PAPER_TEMPERATURE, PAPER_TOP_P, top_k, penalty, budget, protocol.suppress_markers, source)
