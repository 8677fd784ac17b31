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
