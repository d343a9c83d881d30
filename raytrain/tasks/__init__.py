"""Verifiable tasks: generated problems whose answers a program checks, so that every stage of a chain can be
measured by exact-match accuracy on problems it never trained on (`raytrain demo --task arith`,
`raytrain eval --task NAME`).

A task is one module (raytrain/tasks/NAME.py, or a user's own importable NAME.py) with:
  DIFFICULTIES   the levels its generator knows, easiest first (arith: digits per number)
  PROBLEMS       distinct problems generated per level (fewer where a level has fewer)
  ANSWER_FORMAT  what a correct reply is, in words
  problem(rng, difficulty) -> str    one random problem: the user's question
  solve(prompt) -> str | None        the correct reply, read from the prompt alone (None: no problem in it)
  reward = verifier(solve)           `python:raytrain.tasks.NAME:reward`: 1 for the correct reply, else 0
                                     (0 too for a prompt that holds no problem of the task)

The source `task:NAME` (or `task:NAME:LEVELS`, e.g. `task:arith:1,2`) is the task's text for
`raytrain data tokenizer|prepare` (train problems with their answers), its question–answer pairs for
`raytrain data sft` and its prompts for `raytrain ppo --prompts`. Problems and their split are a pure
function of the task and level (no config seed), so every stage and `raytrain eval` agree on which problems
are held out, and no held-out answer is ever trained on.
"""

from __future__ import annotations

import functools
import importlib
import os
import random
import sys
from dataclasses import dataclass
from types import ModuleType

from raytrain.data.packing import is_val_document
from raytrain.errors import DataError

TASK_SOURCE = "task:"
HELD_OUT = 0.1  # share of each level's problems held out (by a hash of the problem)
SPLIT_SEED = 27  # the split's salt: fixed, so a task's held-out problems never depend on a run's config
ATTEMPTS = 20  # draws per wanted problem before a level is taken as exhausted
BUILTIN = ("arith", "sort")  # raytrain/tasks/NAME.py
REQUIRED = ("DIFFICULTIES", "PROBLEMS", "ANSWER_FORMAT", "problem", "solve", "reward")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    level: int
    held_out: bool

    @property
    def text(self) -> str:
        """The problem and its answer as pre-training text."""
        return f"{self.prompt}\n{self.answer}"


@dataclass(frozen=True)
class Task:
    name: str
    module: ModuleType
    levels: tuple[int, ...]

    @property
    def answer_format(self) -> str:
        return self.module.ANSWER_FORMAT

    def problems(self) -> list[Problem]:
        """Every level's problems, levels interleaved (so the first held-out prompts cover every level)."""
        by_level = [self._level(level) for level in self.levels]
        longest = max(len(problems) for problems in by_level)
        return [problems[i] for i in range(longest) for problems in by_level if i < len(problems)]

    def split(self, held_out: bool) -> list[Problem]:
        return [p for p in self.problems() if p.held_out == held_out]

    @functools.cache  # noqa: B019 (a Task is frozen and few are made: the cache is what keeps them cheap)
    def _level(self, level: int) -> list[Problem]:
        rng = random.Random(f"{self.name}:{level}")
        prompts: dict[str, None] = {}
        for _ in range(self.module.PROBLEMS * ATTEMPTS):
            prompts[self.module.problem(rng, level)] = None
            if len(prompts) == self.module.PROBLEMS:
                break
        return [Problem(prompt, self.module.solve(prompt), level, is_val_document(prompt, SPLIT_SEED, HELD_OUT))
                for prompt in prompts]


def verifier(solve):
    """A task's reward: 1.0 where the reply, stripped of surrounding whitespace, is the correct answer."""
    return functools.partial(exact_match, solve)


def is_verifier(function) -> bool:
    """Whether a reward function is a task's verifier (its scores are 1 or 0: their mean is an accuracy)."""
    return isinstance(function, functools.partial) and function.func is exact_match


def exact_match(solve, prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 per reply that is its prompt's answer; 0.0 also for a prompt that holds no problem of the task."""
    answers = [solve(prompt) for prompt in prompts]
    return [float(answer is not None and response.strip() == answer)
            for answer, response in zip(answers, responses, strict=True)]


def is_task_source(item: str) -> bool:
    return item.startswith(TASK_SOURCE)


def load_task(spec: str) -> Task:
    """`task:NAME[:LEVELS]` or `NAME[:LEVELS]`: a built-in task (raytrain/tasks/NAME.py) or an importable module
    NAME (a user's NAME.py beside the command), at the levels given (default: all of the task's)."""
    name, _, levels = spec.removeprefix(TASK_SOURCE).partition(":")
    module = _import(name)
    missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
    if missing:
        raise DataError(f"task '{name}' ({module.__file__}) lacks {', '.join(missing)}; a task module defines "
                        f"{', '.join(REQUIRED)} (raytrain/tasks/__init__.py says what each is)")
    known = tuple(module.DIFFICULTIES)
    try:
        chosen = tuple(int(level) for level in levels.split(",")) if levels else known
    except ValueError:
        raise DataError(f"task '{spec}': levels must be numbers separated by commas, e.g. "
                        f"task:{name}:{','.join(map(str, known[:2]))}") from None
    unknown = [level for level in chosen if level not in known]
    if unknown:
        raise DataError(f"task '{spec}': level {unknown[0]} is not one of {name}'s ({', '.join(map(str, known))})")
    return Task(name, module, chosen)


def _import(name: str) -> ModuleType:
    if not name.isidentifier():
        raise DataError(f"task '{name}' is not a module name; name a built-in task ({', '.join(builtin_tasks())}) "
                        "or your task module's file name without .py")
    if name in BUILTIN:
        return importlib.import_module(f"{__name__}.{name}")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.append(here)
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f"no task '{name}': built-in tasks are {', '.join(builtin_tasks())}; a task of your own is a "
                        f"module {name}.py in the working folder or on PYTHONPATH") from None


def builtin_tasks() -> tuple[str, ...]:
    return BUILTIN
