"""Rewards with spread on a random tiny model (whose completions are noise), loaded by dotted path."""


def char_diversity(completions, **_):
    return [len(set(c)) / 10.0 for c in completions]


def not_a_number(completions, **_):
    return [float("nan") for _ in completions]


def solution_keyed(completions, solution, **_):
    """A reward of the completion AND its prompt's solution (a hash in [0, 1)): scoring a completion against
    another prompt's solution gives another value."""
    import zlib

    return [zlib.crc32(f"{c}|{s}".encode()) % 1000 / 1000 for c, s in zip(completions, solution)]


TIED_IDS = {2, 9, 12, 15}


def tied_on_some_ids(completions, problem_id, **_):
    """Every completion of prompts TIED_IDS gets 1.0 (a group with advantage 0); the others spread. With the
    16-row synthetic split and schedule seed 3 (tests/test_grpo.py tiny_recipe), the first three steps hold
    prompts [11, 15], [9, 1] and [12, 2]: two steps with one tied group, one step where both are tied."""
    return [1.0 if int(pid) in TIED_IDS else len(set(c)) / 10.0 for c, pid in zip(completions, problem_id)]
