"""Rewards with spread on a random tiny model (whose completions are noise), loaded by dotted path."""


def char_diversity(completions, **_):
    return [len(set(c)) / 10.0 for c in completions]


def not_a_number(completions, **_):
    return [float("nan") for _ in completions]


def tied_on_even_ids(completions, problem_id, **_):
    """Every completion of an even-numbered prompt gets 1.0 (a group with advantage 0); the others spread."""
    return [1.0 if int(pid) % 2 == 0 else len(set(c)) / 10.0 for c, pid in zip(completions, problem_id)]
