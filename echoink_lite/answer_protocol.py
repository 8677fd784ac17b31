"""The answer protocol of EchoInk-R1: what the model is asked, and how its reply is read.

Training (rewards), evaluation and inference must agree on every byte of this, so it lives in one
module and nothing else defines any of it:

- ``PROMPT_INSTRUCTION`` and ``build_prompt_text``: the user-turn text for a multiple-choice question;
- ``extract_answer`` / ``extract_think``: the text inside the first ``<answer>`` / ``<think>`` block;
- ``FORMAT_PATTERN`` / ``format_ok``: whether a reply is ``<think>...</think><answer>...</answer>``
  and nothing else (the format reward, and the "format failures" of an evaluation);
- ``parse_answer``: the option letter the kit's own evaluation scores (strict by default; a lenient
  fallback modelled on the original's on request);
- ``build_eval_prompt_text``, ``EVAL_SYSTEM_MESSAGE``, ``extract_choice`` and ``original_gold``: the
  original evaluation's prompts (which differ from its training prompt) and its parser, for the
  ``echoink-base`` / ``echoink-rl`` evaluation protocols (``eval_protocols``).

The source of each is the original repository, HarryHsing/EchoInk (commit 3f6d16a), files
``src/r1-v/src/open_r1/grpo.py`` (training prompt and rewards) and ``src/omniInstruct-v1_eval_valid.py``
(its evaluation prompts and parser). Chat messages and processor tensors are built in ``prompting``, which
uses this module's text.
"""

from __future__ import annotations

import re
from typing import Iterable

# --------------------------------------------------------------------------------------------
# Prompt text
# --------------------------------------------------------------------------------------------

# EchoInk's QUESTION_TEMPLATE after its "{Question}\n", verbatim, including the missing period after
# "thought expressions" (HarryHsing/EchoInk, src/r1-v/src/open_r1/grpo.py; the same text in the RL branch of
# src/omniInstruct-v1_eval_valid.py).
REASONING_INSTRUCTION = (
    "Please think about this question as if you were a human pondering deeply. "
    "Make sure to carefully consider both the visual and audio information before answering. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', "
    "'oh, I see', 'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your "
    "final answer between the <answer> </answer> tags."
)
# TYPE_TEMPLATE["multiple choice"], leading space included (the same in grpo.py and the evaluation script).
MULTIPLE_CHOICE_SENTENCE = " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
# QUESTION_TEMPLATE followed by TYPE_TEMPLATE["multiple choice"]: the training instruction.
PROMPT_INSTRUCTION = REASONING_INSTRUCTION + MULTIPLE_CHOICE_SENTENCE


def build_prompt_text(problem: str, options: Iterable[str]) -> str:
    """The user-turn text: question, " Options:", the options one per line, then the instruction.

    The original builds ``problem + " Options:\\n" + "\\n".join(options)`` and puts it in front of
    ``"\\n" + instruction`` (``make_conversation_image_and_video_and_audio`` in its grpo.py).
    """
    return f"{problem} Options:\n" + "\n".join(options) + "\n" + PROMPT_INSTRUCTION


# The original's evaluation (HarryHsing/EchoInk, src/omniInstruct-v1_eval_valid.py) asks differently from its
# training: `question_text = ex["problem"] + "\n" + "\n".join(ex["options"])` (no " Options:"), then
# `QUESTION_TEMPLATE.format(Question=question_text) + TYPE_TEMPLATE["multiple choice"]`, where the base model's
# QUESTION_TEMPLATE is "{Question}\n" + EVAL_BASE_INSTRUCTION and the RL model's is "{Question}\n" +
# REASONING_INSTRUCTION. The base model also gets an explicit system message (EVAL_SYSTEM_MESSAGE).
EVAL_BASE_INSTRUCTION = "Please answer the following question based on the given image and audio."
EVAL_SYSTEM_MESSAGE = "You are a helpful assistant."


def build_eval_prompt_text(problem: str, options: Iterable[str], model: str) -> str:
    """The user-turn text of the original's evaluation for `model` "rl" (the trained model) or "base"."""
    instruction = {"rl": REASONING_INSTRUCTION, "base": EVAL_BASE_INSTRUCTION}[model]
    return problem + "\n" + "\n".join(options) + "\n" + instruction + MULTIPLE_CHOICE_SENTENCE


def option_letters(options: Iterable[str]) -> tuple[str, ...]:
    """The letters of options written "A. ...", "B. ...": ("A", "B", ...)."""
    return tuple(option[0] for option in options)


# --------------------------------------------------------------------------------------------
# Reading a reply
# --------------------------------------------------------------------------------------------

# The original's ANS_TAG (re.S is re.DOTALL), used by its accuracy reward for completion and solution.
ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
THINK_RE = re.compile(r"<think>\s*(.*?)\s*</think>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """Text inside the first ``<answer>...</answer>``, stripped; None when there is no such block.

    The original returns "" for a missing block; None keeps "no tag" apart from an empty tag, and every
    caller treats None as "no answer", so rewards are the same on the original's data.
    """
    match = ANSWER_RE.search(text)
    return match.group(1).strip() if match else None


def extract_think(text: str) -> str | None:
    """Text inside the first ``<think>...</think>``, stripped; None when there is no such block."""
    match = THINK_RE.search(text)
    return match.group(1).strip() if match else None


# The original's _FORMAT_PATTERN, compiled as it is there: WITHOUT re.DOTALL. The two look-aheads forbid a
# repeated <think> or <answer> tag, but their "." stops at a newline, so they only see the reply's first
# line: a tag repeated on a later line is not caught (the [\s\S] parts do cross newlines). Adding DOTALL
# would enforce what the look-aheads seem to intend, but would change the reward the paper trained with.
FORMAT_PATTERN = r"^(?!.*<think>.*<think>)(?!.*<answer>.*<answer>)<think>[\s\S]+?</think>\s*<answer>[\s\S]+?</answer>$"
FORMAT_RE = re.compile(FORMAT_PATTERN)


def format_ok(completion: str) -> bool:
    """The paper's format condition: the stripped reply fully matches ``FORMAT_PATTERN``."""
    return FORMAT_RE.fullmatch(completion.strip()) is not None


def parse_answer(completion: str, letters: tuple[str, ...], lenient: bool = False) -> str | None:
    """The option letter a completion gives, or None.

    Strict (default): the text inside the first ``<answer>...</answer>`` (stripped), accepted only if it is
    exactly one of ``letters`` ("B" yes; "b", "(B)", "B." and "B. red high" no).

    Lenient (modelled on the original evaluation's ``extract_choice`` in its omniInstruct-v1_eval_valid.py,
    which falls back to the first standalone A-D letter when no ``<answer>X</answer>`` is found): when the
    first tag does not hold one of ``letters``, the first standalone option letter anywhere in the
    completion, case-insensitively, upper-cased. Beware: the English word "a" then counts as answer A
    ("I see a cat" -> "A"), which is why lenient is opt-in.
    """
    inside = extract_answer(completion)
    if inside is not None and inside in letters:
        return inside
    if not lenient or not letters:
        return None
    pattern = r"\b([" + "".join(re.escape(letter) for letter in letters) + r"])\b"
    match = re.search(pattern, completion, re.IGNORECASE)
    if match is None:
        return None
    letter = match.group(1).upper()
    return letter if letter in letters else None


# --------------------------------------------------------------------------------------------
# The original evaluation's parser
# --------------------------------------------------------------------------------------------

# `extract_choice` and `GT_RE` of HarryHsing/EchoInk, src/omniInstruct-v1_eval_valid.py, verbatim.
CHOICE_TAG_RE = re.compile(r"<answer>\s*([A-D])\s*</answer>", re.I)
CHOICE_LETTER_RE = re.compile(r"\b([A-D])\b", re.I)


def extract_choice(reply: str) -> str:
    """The original evaluation's letter: "A"-"D", or "?" when it finds none.

    `reply` is what the original parses: the whole decoded sequence, prompt included
    (`processor.batch_decode(out_ids, skip_special_tokens=True)[0]`). It keeps the text after the first
    "\nassistant", then takes the first `<answer>X</answer>` with X in A-D, else the first standalone A-D
    letter, both case-insensitive and upper-cased: the English word "a" counts as A, and
    `<think>I see a man</think><answer>c</answer>` is C (the tag is tried first).
    """
    if "\nassistant" in reply:
        reply = reply.split("\nassistant", 1)[1].strip()
    match = CHOICE_TAG_RE.search(reply)
    if match:
        return match.group(1).upper()
    match = CHOICE_LETTER_RE.search(reply)
    if match:
        return match.group(1).upper()
    return "?"


def original_gold(solution: str) -> str | None:
    """The gold letter as the original evaluation reads it: `GT_RE.search(solution).group(1)`, not upper-cased
    (a solution "<answer>c</answer>" gives "c", which no upper-cased prediction equals). None where the
    original would fail (no `<answer>` tag holding one of A-D)."""
    match = CHOICE_TAG_RE.search(solution)
    return match.group(1) if match else None
