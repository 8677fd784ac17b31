"""Rewards with spread on a random tiny model (whose completions are noise), loaded by dotted path."""


def char_diversity(completions, **_):
    return [len(set(c)) / 10.0 for c in completions]


def not_a_number(completions, **_):
    return [float("nan") for _ in completions]
