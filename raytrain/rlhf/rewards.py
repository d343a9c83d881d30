"""Verifiable rewards for `raytrain ppo --reward python:raytrain.rlhf.rewards:NAME`, and examples of the
signature a user's own function has: (prompts, responses) → one number per response."""

from __future__ import annotations

BREVITY_CHARS = 40


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for an empty answer, falling linearly to 0 at BREVITY_CHARS characters: rewards short answers."""
    return [1.0 - min(len(r), BREVITY_CHARS) / BREVITY_CHARS for r in responses]


def mentions_return(prompts: list[str], responses: list[str]) -> list[float]:
    """1 when the answer says what the function returns (the word 'return'), else 0."""
    return [float("return" in r.lower()) for r in responses]


def verbosity(prompts: list[str], responses: list[str]) -> list[float]:
    """brevity's opposite, a reward that is easy to hack: longer answers score more, up to BREVITY_CHARS
    characters (what the health monitors' length_blowup is there to catch)."""
    return [min(len(r), BREVITY_CHARS) / BREVITY_CHARS for r in responses]
