"""Sorting a short list of numbers, a multi-step answer: 'Sort: 42 7 19' → '7 19 42'. Difficulty: how many
numbers."""

from __future__ import annotations

import random
import re

from raytrain.tasks import verifier

DIFFICULTIES = (3, 4, 5)
PROBLEMS = 3000
ANSWER_FORMAT = "the numbers in ascending order, separated by single spaces (e.g. 7 19 42)"
PATTERN = re.compile(r"Sort: (\d+(?: \d+)*)")


def problem(rng: random.Random, count: int) -> str:
    return "Sort: " + " ".join(str(rng.randrange(100)) for _ in range(count))


def solve(prompt: str) -> str | None:
    found = PATTERN.findall(prompt)
    if not found:
        return None
    return " ".join(str(n) for n in sorted(int(n) for n in found[-1].split()))


reward = verifier(solve)
