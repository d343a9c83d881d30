"""Verifiable tasks (raytrain/tasks/): generators, verifiers, the split every stage shares, pass@k, and a task as
a data source and as PPO's prompts (no Ray here; `raytrain eval --task` and GRPO on a task: test_task_chain.py)."""

import random

import pytest

from raytrain.data.chat_data import task_examples
from raytrain.data.sources import iter_local_documents, resolve_sources
from raytrain.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from raytrain.errors import DataError
from raytrain.rlhf.prompts import load_prompts
from raytrain.tasks import builtin_tasks, is_verifier, load_task
from raytrain.tasks.evaluate import majority_baseline, pass_at_k


@pytest.mark.parametrize("name", builtin_tasks())
def test_each_task_generates_seeded_disjoint_splits_whose_answers_its_verifier_accepts(name):
    task = load_task(name)
    problems = task.problems()
    assert [p.prompt for p in problems] == [p.prompt for p in load_task(name).problems()]  # seeded: same again
    train, held_out = task.split(held_out=False), task.split(held_out=True)
    assert {p.prompt for p in train}.isdisjoint(p.prompt for p in held_out)
    assert len({p.prompt for p in problems}) == len(problems)  # distinct problems
    assert 0.05 < len(held_out) / len(problems) < 0.15
    assert {p.level for p in held_out} == set(task.levels)  # every level is held out in part
    # The verifier accepts each reference answer (surrounding whitespace aside) and nothing else.
    prompts = [f"<|user|>{p.prompt}<|assistant|>" for p in problems[:200]]
    assert task.module.reward(prompts, [f" {p.answer}\n" for p in problems[:200]]) == [1.0] * 200
    wrong = [p.answer + "0" for p in problems[:200]]
    assert task.module.reward(prompts, wrong) == [0.0] * 200
    assert is_verifier(task.module.reward)
    assert task.module.reward(["What does os.path.join do?"], ["joins"]) == [0.0]  # not a problem of the task


def test_arith_answers_are_the_arithmetic_and_levels_are_digits():
    task = load_task("task:arith")
    assert task.module.solve("What is 47 + 385?") == "432" and task.module.solve("What is 12 - 30?") == "-18"
    for p in task.problems()[:300]:
        a, sign, b = p.prompt.removeprefix("What is ").removesuffix("?").split()
        assert max(len(a), len(b)) == p.level and int(p.answer) == eval(f"{a}{sign}{b}")  # noqa: S307
    assert load_task("task:arith:1,2").levels == (1, 2)
    assert {p.level for p in load_task("arith:2").problems()} == {2}
    # A level's split does not depend on which other levels are asked for.
    assert [p for p in load_task("arith:2").split(True)] == [p for p in task.split(True) if p.level == 2]


def test_sort_is_a_multi_step_answer():
    sort = load_task("sort:5")
    assert sort.module.solve("Sort: 42 7 19 7 100") == "7 7 19 42 100"
    p = sort.problems()[0]
    assert len(p.answer.split()) == 5 and p.answer.split() == sorted(p.answer.split(), key=int)


def test_bad_task_names_and_levels_are_refused_with_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no task 'nosuch'.*arith, sort"):
        load_task("task:nosuch")
    with pytest.raises(DataError, match="level 9 is not one of arith's"):
        load_task("task:arith:9")
    with pytest.raises(DataError, match="levels must be numbers"):
        load_task("task:arith:one")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "half_task.py").write_text("DIFFICULTIES = (1,)\n")
    with pytest.raises(DataError, match="lacks PROBLEMS, ANSWER_FORMAT, problem, solve, reward"):
        load_task("task:half_task")


def test_a_users_task_is_one_file_beside_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "count_a.py").write_text(
        '"""How many letters a in a word."""\n'
        "from raytrain.tasks import verifier\n"
        "DIFFICULTIES = (4,)\nPROBLEMS = 50\nANSWER_FORMAT = 'a number'\n"
        "def problem(rng, n):\n    return 'Count a in ' + ''.join(rng.choice('ab') for _ in range(n))\n"
        "def solve(prompt):\n    return str(prompt.split()[-1].count('a')) if 'Count a in' in prompt else None\n"
        "reward = verifier(solve)\n")
    task = load_task("task:count_a")
    assert len(task.problems()) == 16  # 2^4 distinct words: a small level yields what it has
    assert task.module.reward(["Count a in abab"], ["2"]) == [1.0]


def test_a_task_is_pretraining_text_sft_pairs_and_ppo_prompts_with_one_split(tmp_path):
    task = load_task("task:arith:1,2")
    held_out = {p.prompt for p in task.split(True)}
    (source,) = resolve_sources(["task:arith:1,2"])
    texts = [text for text, _ in iter_local_documents([source])]
    assert len(texts) == len(task.split(False)) and not any(t.split("\n")[0] in held_out for t in texts)
    examples = task_examples("task:arith:1,2")
    assert {e[0][0][0]["content"] for e in examples if e[1]} == held_out  # the SFT val split is the held-out set
    assert all(e[2].startswith("level ") for e in examples)

    save_tokenizer(train_tokenizer(texts, 300, split_digits=True), tmp_path, {})
    prompts = load_prompts("task:arith:1,2", load_tokenizer(tmp_path), seed=5, val_fraction=0.5)
    assert len(prompts.val) == len(held_out)  # the task's own split, whatever the config's fraction or seed


def test_split_digits_makes_every_digit_a_token():
    texts = [p.text for p in load_task("arith:3").split(False)]
    split = train_tokenizer(texts, 400, split_digits=True).encode("What is 622 + 674?").tokens
    assert [t for t in split if t.isdigit()] == list("622674")
    merged = train_tokenizer(texts, 400).encode("What is 622 + 674?").tokens
    assert any(len(t.strip("Ġ")) > 1 and t.strip("Ġ").isdigit() for t in merged)


def test_pass_at_k_and_the_majority_baseline():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - (7 * 6) / (10 * 9))
    answer, accuracy = majority_baseline(load_task("arith"))
    assert answer.lstrip("-").isdigit() and 0 <= accuracy < 0.05
    rng = random.Random(0)
    assert load_task("arith").module.problem(rng, 2) == load_task("arith").module.problem(random.Random(0), 2)
