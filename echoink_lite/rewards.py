"""The paper's rewards, and a registry so a recipe can name them or a user's own function.

A reward function takes the decoded completions and keyword arguments with the rows' fields
(`solution`, `answer`, `options`, `problem_id`, `problem`) and returns one float per completion, in the same
calling convention as TRL's reward functions. A recipe lists rewards by name with weights:

    grpo:
      rewards: {accuracy: 1.0, format: 1.0, "my_pkg.my_rewards:length_penalty": 0.1}

Built-ins reproduce EchoInk-R1's `accuracy_reward` and `format_reward` (HarryHsing/EchoInk,
src/r1-v/src/open_r1/grpo.py, the "multiple choice" case): accuracy compares the text inside
`<answer>...</answer>` of the completion and of the solution; format requires the stripped completion to be
`<think>...</think><answer>...</answer>` and nothing else. Both read the reply through `answer_protocol`,
the one definition shared with evaluation and inference. `reward_problem` says why a name cannot be used;
validating a recipe calls it, so a typo fails before the model loads.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable

from .answer_protocol import extract_answer, format_ok

RewardFn = Callable[..., list[float]]


def accuracy_reward(completions: list[str], solution: list[str], **_) -> list[float]:
    """1.0 when the completion's <answer> text equals the solution's, else 0.0 (no tag -> 0.0).

    A solution without tags (a bare letter, which `data check` accepts) is compared as written; the original
    would compare against "" there and reward completions that give no answer at all.
    """
    out = []
    for completion, sol in zip(completions, solution):
        got = extract_answer(completion)
        want = extract_answer(sol)
        if want is None:
            want = sol.strip()
        out.append(1.0 if got is not None and got == want else 0.0)
    return out


def format_reward(completions: list[str], **_) -> list[float]:
    """1.0 iff the stripped completion fully matches the paper's think/answer pattern (`format_ok`)."""
    return [1.0 if format_ok(c) else 0.0 for c in completions]


BUILTIN_REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


class RewardError(ValueError):
    pass


def resolve_reward(name: str) -> RewardFn:
    """A built-in name, or 'package.module:function' / 'package.module.function' of the user's own."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        raise RewardError(
            f"unknown reward '{name}': built-ins are {sorted(BUILTIN_REWARDS)}; "
            "a reward of your own is written 'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"cannot import reward '{name}': {err}. Check the module is importable (PYTHONPATH).") from None
    if not callable(fn):
        raise RewardError(f"reward '{name}' is not callable")
    return fn


def reward_problem(name: str) -> str | None:
    """Why a reward name cannot be used in a run, or None when it resolves to a callable.

    Checked when the recipe is validated, so a typo fails in `recipes validate` and before the model loads,
    not after minutes of loading. A user's own reward is imported here, as training would import it.
    """
    if name in BUILTIN_REWARDS:
        return None
    builtins = ", ".join(BUILTIN_REWARDS)
    if ":" not in name and "." not in name:
        close = difflib.get_close_matches(name, list(BUILTIN_REWARDS), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return (f"unknown reward '{name}'{hint}; the built-ins are {builtins}, "
                "and a reward of your own is written 'package.module:function'")
    try:
        resolve_reward(name)
    except RewardError as err:
        return " ".join(str(err).split())
    except Exception as err:  # the user's module raised while importing (a SyntaxError, a failing import)
        return f"importing reward '{name}' failed: {type(err).__name__}: {' '.join(str(err).split())}; fix that module"
    return None


def resolve_rewards(spec: dict[str, float]) -> list[tuple[str, RewardFn, float]]:
    return [(name, resolve_reward(name), float(weight)) for name, weight in spec.items()]


def compute_rewards(rewards: list[tuple[str, RewardFn, float]], completions: list[str], **columns) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per completion, each reward's raw values by name)."""
    per_name: dict[str, list[float]] = {}
    total = [0.0] * len(completions)
    for name, fn, weight in rewards:
        try:
            values = [float(v) for v in fn(completions, **columns)]
        except Exception as err:  # the user's own function: name it, do not end the run in its traceback
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise RewardError(
                f"reward '{name}' failed: {type(err).__name__}: {first}. A reward is called as fn(completions, "
                f"{', '.join(f'{k}=...' for k in columns)}) and returns one number per completion; fix the function"
            ) from None
        if len(values) != len(completions):
            raise RewardError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions")
        per_name[name] = values
        total = [t + weight * v for t, v in zip(total, values)]
    return total, per_name
