"""Held-out exact-match accuracy of a model on a verifiable task: greedy, and pass@1 / pass@k over k sampled
replies, by level. A fine-tuned model answers the problem as a user turn; a pre-trained one continues the
problem's line, as its text showed it (`Problem.text`)."""

from __future__ import annotations

import math
from collections import defaultdict

from raytrain.inference import generate_texts
from raytrain.tasks import Problem, Task

CHUNK = 128  # prompts per generate call (bounds the KV cache)


def task_accuracy(model, tokenizer, task: Task, *, chat: bool, problems: int = 0, samples: int = 0,
                  temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """{'greedy': …, 'pass@1': …, f'pass@{samples}': …, and each per level as 'level N/greedy' …} over the first
    `problems` held-out problems (0: all); the sampled figures only with samples > 0."""
    held_out = task.split(held_out=True)[: problems or None]
    max_new_tokens = 2 + max(len(tokenizer.encode(p.answer, add_special_tokens=False).ids) for p in held_out)

    def replies(temp: float, salt: int) -> list[str]:
        prompts = [p.prompt if chat else p.prompt + "\n" for p in held_out]
        out = []
        for start in range(0, len(prompts), CHUNK):
            out += generate_texts(model, tokenizer, prompts[start:start + CHUNK], chat=chat,
                                  max_new_tokens=max_new_tokens, temperature=temp, top_k=0, top_p=1.0,
                                  seed=seed + salt + start)
        return out

    correct = {"greedy": score(task, held_out, replies(0.0, 0))}
    if samples:
        draws = [score(task, held_out, replies(temperature, (k + 1) * len(held_out))) for k in range(samples)]
        per_problem = [round(sum(d[i] for d in draws)) for i in range(len(held_out))]
        correct["pass@1"] = [c / samples for c in per_problem]
        correct[f"pass@{samples}"] = [pass_at_k(samples, c, samples) for c in per_problem]
    result = {name: mean(values) for name, values in correct.items()}
    levels = defaultdict(list)
    for i, p in enumerate(held_out):
        levels[p.level].append(i)
    for level, rows in sorted(levels.items()):
        result.update({f"level {level}/{name}": mean([values[i] for i in rows]) for name, values in correct.items()})
        result[f"level {level}/problems"] = len(rows)
    result["problems"] = len(held_out)
    return result


def score(task: Task, problems: list[Problem], replies: list[str]) -> list[float]:
    return task.module.reward([p.prompt for p in problems], replies)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. (2021): the chance that k of n samples, c of them correct, hold one."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def majority_baseline(task: Task) -> tuple[str, float]:
    """The train problems' most common answer and its held-out accuracy: what a model that ignores the question
    scores at best."""
    counts: dict[str, int] = defaultdict(int)
    for p in task.split(held_out=False):
        counts[p.answer] += 1
    answer = max(counts, key=counts.get)
    held_out = task.split(held_out=True)
    return answer, mean([float(p.answer == answer) for p in held_out])


def print_accuracy(result: dict[str, float], levels: tuple[int, ...], samples: int) -> None:
    """One line per level and one for all: greedy, and pass@1 / pass@k where sampled."""
    names = ["greedy"] + (["pass@1", f"pass@{samples}"] if samples else [])
    print(f"  {'level':<8}{'problems':>9}" + "".join(f"{name:>9}" for name in names))
    for label, prefix, count in [*((str(level), f"level {level}/", result.get(f"level {level}/problems", 0))
                                   for level in levels), ("all", "", result["problems"])]:
        print(f"  {label:<8}{count:>9}" + "".join(f"{result[prefix + name]:>9.1%}" for name in names))
