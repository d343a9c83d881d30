"""Multi-digit addition and subtraction: 'What is 47 + 385?' → '432'. Difficulty: digits of the longer number."""

from __future__ import annotations

import random
import re

from raytrain.tasks import verifier

DIFFICULTIES = (1, 2, 3)
PROBLEMS = 10000  # level 2 has 19,800: a small model sees each few times, so it must learn to add
ANSWER_FORMAT = "the result alone, as an integer (e.g. 432 or -38)"
PATTERN = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def problem(rng: random.Random, digits: int) -> str:
    """One number has `digits` digits, the other at most as many (either may be the longer)."""
    low = 10 ** (digits - 1) if digits > 1 else 0
    a, b = rng.randrange(low, 10**digits), rng.randrange(10**digits)
    if rng.random() < 0.5:
        a, b = b, a
    return f"What is {a} {rng.choice('+-')} {b}?"


def solve(prompt: str) -> str | None:
    found = PATTERN.findall(prompt)
    if not found:
        return None
    a, sign, b = found[-1]
    return str(int(a) + int(b) if sign == "+" else int(a) - int(b))


reward = verifier(solve)
