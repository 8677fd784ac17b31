"""Tests for echoink_lite.answer_protocol (prompt text, reply parsing, the format pattern) and the rewards
built on it, pinned against EchoInk-R1's own code (HarryHsing/EchoInk, src/r1-v/src/open_r1/grpo.py)."""

from __future__ import annotations

import re

import pytest

from echoink_lite import answer_protocol, data, evaluate, infer, prompting, rewards
from echoink_lite.answer_protocol import (
    FORMAT_PATTERN,
    build_prompt_text,
    extract_answer,
    extract_think,
    format_ok,
    option_letters,
    parse_answer,
)
from echoink_lite.rewards import accuracy_reward, format_reward

OPTIONS = ["A. Playing the violin", "B. Singing", "C. Playing the piano", "D. Drumming"]
LETTERS = ("A", "B", "C", "D")

# The original's code, copied verbatim from HarryHsing/EchoInk src/r1-v/src/open_r1/grpo.py, to compare with.
ORIGINAL_ANS_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)
ORIGINAL_FORMAT_PATTERN = re.compile(
    r'^(?!.*<think>.*<think>)'
    r'(?!.*<answer>.*<answer>)'
    r'<think>[\s\S]+?</think>\s*<answer>[\s\S]+?</answer>$'
)


def original_format_reward(text: str) -> float:
    return 1.0 if ORIGINAL_FORMAT_PATTERN.fullmatch(text.strip()) else 0.0


def original_extract_answer(text: str) -> str:
    m = ORIGINAL_ANS_TAG.search(text)
    return m.group(1).strip() if m else ""


# ------------------------------------------------------------------------------------------
# prompt text
# ------------------------------------------------------------------------------------------


def test_prompt_text_is_pinned_byte_for_byte():
    # Written out independently of the module constant: any drift from the original fails here.
    expected = (
        "What is the man in the picture doing? Options:\n"
        "A. Playing the violin\n"
        "B. Singing\n"
        "C. Playing the piano\n"
        "D. Drumming\n"
        "Please think about this question as if you were a human pondering deeply. Make sure to "
        "carefully consider both the visual and audio information before answering. Engage in an "
        "internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
        "'let's break it down', etc, or other natural language thought expressions It's encouraged "
        "to include self-reflection or verification in the reasoning process. Provide your detailed "
        "reasoning between the <think> </think> tags, and then give your final answer between the "
        "<answer> </answer> tags. Please provide only the single option letter (e.g., A, B, C, D, "
        "etc.) within the <answer> </answer> tags."
    )
    assert build_prompt_text("What is the man in the picture doing?", OPTIONS) == expected
    assert option_letters(OPTIONS) == LETTERS


def test_one_definition_every_user_imports_it():
    # Training (rewards, rows), evaluation, inference and prompting use the protocol's own objects; no module
    # keeps a copy of the instruction, the tag patterns or the parsers.
    assert data.build_prompt_text is answer_protocol.build_prompt_text
    assert rewards.extract_answer is answer_protocol.extract_answer
    assert rewards.format_ok is answer_protocol.format_ok
    assert evaluate.parse_answer is answer_protocol.parse_answer
    assert evaluate.format_ok is answer_protocol.format_ok
    assert infer.parse_answer is answer_protocol.parse_answer and infer.extract_think is answer_protocol.extract_think
    for module in (data, rewards, evaluate, infer, prompting):
        assert not hasattr(module, "PROMPT_INSTRUCTION") or module.PROMPT_INSTRUCTION is answer_protocol.PROMPT_INSTRUCTION
        assert not hasattr(module, "FORMAT_PATTERN") and not hasattr(module, "_FORMAT_RE")
        assert not hasattr(module, "_ANSWER_RE") and not hasattr(module, "_THINK_RE")


# ------------------------------------------------------------------------------------------
# extracting <answer> and <think>
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>C</answer>", "C"),
        ("<answer>  B \n</answer>", "B"),
        ("<think>hmm</think>\n<answer>\nA\n</answer>", "A"),
        ("<answer>A</answer> then <answer>B</answer>", "A"),
        ("<answer></answer>", ""),
        ("<answer>two\nlines</answer>", "two\nlines"),
        ("the answer is C", None),
        ("<answer>C", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected
    # The original returns "" where there is no block; otherwise the same text.
    assert original_extract_answer(text) == (expected if expected is not None else "")


def test_extract_think():
    assert extract_think("<think>\n red low \n</think><answer>A</answer>") == "red low"
    assert extract_think("<think>line one\nline two</think>") == "line one\nline two"
    assert extract_think("<answer>A</answer>") is None


# ------------------------------------------------------------------------------------------
# the format pattern: the original's, without re.DOTALL
# ------------------------------------------------------------------------------------------


def test_format_pattern_is_the_originals_text_and_flags():
    assert FORMAT_PATTERN == ORIGINAL_FORMAT_PATTERN.pattern
    assert answer_protocol.FORMAT_RE.flags == ORIGINAL_FORMAT_PATTERN.flags
    assert not answer_protocol.FORMAT_RE.flags & re.DOTALL


# Completions where re.DOTALL changes the verdict (a tag repeated on a later line: the original's look-aheads
# stop at the first newline and miss it) and completions where it does not.
DOTALL_CASES = [
    # (completion, the original's format reward)
    ("<think>a\n</think>\n<think>b</think><answer>C</answer>", 1.0),  # second <think> after a newline
    ("<think>a</think>\n<answer>A</answer><answer>B</answer>", 1.0),  # second <answer> after a newline
    ("<think>let me think\nwait</think><answer>C</answer><answer>D</answer>", 1.0),
    ("<think>a</think><think>b</think><answer>C</answer>", 0.0),  # both on the first line: caught
    ("<think>a</think><answer>A</answer><answer>B</answer>", 0.0),
    ("<think>Hmm.\nThe picture is red.\n\nThe sound is low.</think>\n<answer>\nA\n</answer>", 1.0),
    ("\n  <think>x</think>\n\n<answer>A</answer>\n", 1.0),  # stripped first
    ("<think>x\n</think><answer>A</answer>\ntrailing", 0.0),
    ("<answer>A</answer>", 0.0),
    ("<think></think><answer>A</answer>", 0.0),  # an empty block is not a block
]


@pytest.mark.parametrize("completion, original", DOTALL_CASES)
def test_format_reward_matches_the_original_where_dotall_matters(completion, original):
    assert original_format_reward(completion) == original  # the table above is the original's behaviour
    assert format_reward([completion]) == [original]
    assert format_ok(completion) == (original == 1.0)


def test_dotall_would_change_the_reward():
    # The deviation the kit does NOT make: with DOTALL, repeated tags on later lines score 0.
    with_dotall = re.compile(FORMAT_PATTERN, re.DOTALL)
    changed = [c for c, _ in DOTALL_CASES if bool(with_dotall.fullmatch(c.strip())) != format_ok(c)]
    assert changed == [c for c, _ in DOTALL_CASES[:3]]


# ------------------------------------------------------------------------------------------
# accuracy reward against the original's
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        "<think>a</think><answer>C</answer>",
        "<think>a\nb</think>\n<answer>\n C \n</answer>",
        "<think>a</think><answer>c</answer>",
        "<think>a</think><answer>C.</answer>",
        "<answer>A</answer><answer>C</answer>",
        "<answer>C</answer><answer>A</answer>",
        "<think>C</think>",
        "",
        "<answer></answer>",
    ],
)
def test_accuracy_reward_matches_the_original_on_tagged_solutions(completion):
    solution = "<answer>C</answer>"
    original = 1.0 if original_extract_answer(completion) == original_extract_answer(solution) else 0.0
    assert accuracy_reward([completion], solution=[solution]) == [original]


def test_accuracy_reward_bare_letter_solution():
    # A deviation on data the original never had: a bare-letter solution is compared as written, where the
    # original compares against "" and would reward the completion that gives no answer.
    assert accuracy_reward(["<answer>B</answer>", "no tag", "<answer></answer>"], solution=[" B "] * 3) == [1.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------
# parse_answer (evaluation and inference)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, strict, lenient",
    [
        ("<think>red low</think><answer>A</answer>", "A", "A"),
        ("<think>x</think><answer>  C \n</answer>", "C", "C"),
        ("<think>x</think><answer>\nB\n</answer>", "B", "B"),
        ("<think>x</think><answer>b</answer>", None, "B"),  # lowercase: strict rejects, fallback finds "b"
        ("<think>x</think><answer>(B)</answer>", None, "B"),
        ("<think>x</think><answer>B.</answer>", None, "B"),
        ("The answer is B", None, "B"),
        ("I see a cat", None, "A"),  # the documented trap: the word "a" counts as A when lenient
        ("<think>x</think><answer>E</answer>", None, None),  # not among the options
        ("The answer is E", None, None),
        ("no letter here", None, None),
        ("<answer>D</answer><answer>A</answer>", "D", "D"),  # the first tag counts, as in the reward
    ],
)
def test_parse_answer_strict_and_lenient(completion, strict, lenient):
    assert parse_answer(completion, LETTERS, lenient=False) == strict
    assert parse_answer(completion, LETTERS, lenient=True) == lenient


def test_parse_answer_lenient_is_limited_to_the_rows_letters():
    assert parse_answer("The answer is C", ("A", "B"), lenient=True) is None
    assert parse_answer("maybe c, or b", ("A", "B", "C"), lenient=True) == "C"
