"""Built-in tasks: checkers accept worked solutions and reject wrong answers; eval split held out; determinism."""

import argparse
import json
import random

import pytest

from daulat.data import tasks as tasks_command
from daulat.data.tasks import (
    BUILTIN_TASKS, TASKS, Example, default_corpus, eval_examples, extract_answer, get_task, load_jsonl_task,
    register_task, task_conversations,
)
from daulat.errors import DaulatError


def wrong_answer(name, example):
    if name == "sorting":
        numbers = example.answer.split(", ")
        return ", ".join(numbers[::-1]) if len(numbers) > 1 else str(int(numbers[0]) + 1)
    if name == "reverse":
        return example.answer + "x"
    if name == "countdown":
        return example.answer + " + 1"
    return str(int(example.answer) + 1)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_checker_accepts_own_solution_and_rejects_wrong(name):
    task, rng = TASKS[name], random.Random(1)
    for difficulty in range(task.min_difficulty, task.default_difficulty + 2):
        for _ in range(150):
            example = task.sample(rng, difficulty)
            assert example.solution_text.splitlines()[-1] == f"Answer: {example.answer}"
            assert task.check(example.solution_text, example), example
            assert task.check(f"Some reasoning.\n**Answer:** {example.answer}.\n", example)
            wrong = example.solution_text.rsplit("Answer:", 1)[0] + f"Answer: {wrong_answer(name, example)}"
            assert not task.check(wrong, example), (example, wrong)
            assert not task.check("no final answer here", example)
            assert not task.check(example.solution_text.replace("Answer:", "Result:"), example)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_eval_split_is_disjoint_from_training_and_fixed(name):
    task = TASKS[name]
    evaluation = eval_examples(name, 40)
    assert len(evaluation) == 40 and len({e.prompt for e in evaluation}) == 40
    assert all(task.is_eval(e.prompt) for e in evaluation)
    assert eval_examples(name, 40) == evaluation  # the same list every time
    train = {e.prompt for e in task.train_examples(8000, seed=123)}
    assert not train & {e.prompt for e in evaluation}
    assert not any(task.is_eval(p) for p in train)


def test_default_corpus_is_deterministic_and_holds_no_eval_prompt():
    docs = list(default_corpus(3000, seed=7))
    assert docs == list(default_corpus(3000, seed=7)) and docs != list(default_corpus(3000, seed=8))
    first_lines = {d.split("\n", 1)[0] for d in docs}
    for name in BUILTIN_TASKS:
        assert not first_lines & {e.prompt for e in eval_examples(name, 40)}
    assert sum("\nAnswer: " in d for d in docs) > 2000 and sum("\n" not in d for d in docs) > 300  # tasks and prose


def test_determinism_and_difficulty():
    task = get_task("addition")
    assert task.train_examples(50, seed=3) == task.train_examples(50, seed=3)
    assert task.train_examples(50, seed=3) != task.train_examples(50, seed=4)
    long = task.train_examples(100, seed=0, difficulty=8)
    assert max(len(e.answer) for e in long) >= 8
    assert all(len(e.answer) <= 2 for e in task.train_examples(100, seed=0, difficulty=1))
    with pytest.raises(DaulatError, match="difficulty"):
        task.sample(random.Random(0), 0)
    with pytest.raises(DaulatError, match="difficulty"):
        get_task("countdown").sample(random.Random(0), 1)


def test_extract_answer_is_robust():
    assert extract_answer("work\nAnswer: 42") == "42"
    assert extract_answer("answer: 1\nmore\n**Answer:** 1,234.") == "1,234"
    assert extract_answer("Answer:   `abc`  \n trailing text") == "abc"
    assert extract_answer("The final ANSWER: $7$") == "7"
    assert extract_answer("nothing") is None and extract_answer("Answer: ") is None
    example = Example("What is 1000 + 234?", "1234", "Answer: 1234")
    assert get_task("addition").check("Answer: 1,234", example)
    assert not get_task("addition").check("Answer: 1234 or 1235", example)


def test_countdown_accepts_any_valid_expression():
    task = get_task("countdown")
    example = Example("Use the numbers 2, 3, 4 to make 10. You may use +, - and *, each number at most once.", "2 * 3 + 4", "")
    for good in ("2 * 3 + 4", "4 + 3 * 2", "(2 * 3) + 4", "4 + 2 * 3 = 10", "3*2+4"):
        assert task.check(f"Answer: {good}", example), good
    for bad in ("10", "4 + 4 + 2", "2 ** 3 + 2", "2 * 3 + 4 + 0", "(2 + 3) * 2", "__import__('os')", "2 * 3 +", "4 + 3 * 2 = 11"):
        assert not task.check(f"Answer: {bad}", example), bad


def test_register_task_and_unknown_name():
    def sample(rng):
        n = rng.randint(0, 10_000)
        return Example(f"Echo {n}", str(n), f"Answer: {n}")

    task = register_task("echo_test", sample, description="repeat a number")
    try:
        assert get_task("echo_test") is task
        example = task.sample(random.Random(0))
        assert task.check(example.solution_text, example) and not task.check("Answer: -1", example)
        assert len(task.eval_examples(5)) == 5
    finally:
        del TASKS["echo_test"]
    with pytest.raises(DaulatError, match="unknown task 'nope'.*addition.*countdown"):
        get_task("nope")


def test_jsonl_task(tmp_path):
    rows = [{"prompt": f"Capital of country {i}?", "answer": f"City {i}"} for i in range(30)]
    rows[0]["split"] = "eval"
    rows[1]["solution"] = "Worked out."
    path = tmp_path / "capitals.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = get_task(str(path))
    assert task.name == "capitals"
    evaluation = task.eval_examples(100)
    assert evaluation[0].prompt == rows[0]["prompt"]
    train = {e.prompt for e in task.train_examples(500, seed=0)}
    assert not train & {e.prompt for e in evaluation} and len(train) == 30 - len(evaluation)
    example = evaluation[0]
    assert task.check("Answer: City 0", example) and task.check("Answer:  City   0 ", example)
    assert not task.check("Answer: City 01", example)
    assert any(e.solution_text == "Worked out.\nAnswer: City 1" for e in task.train_examples(200, seed=0))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "answer": 1}\n{"prompt": 3}\n')
    with pytest.raises(DaulatError, match="bad.jsonl:2"):
        load_jsonl_task(tmp_path / "bad.jsonl")
    with pytest.raises(DaulatError, match="task file not found"):
        load_jsonl_task(tmp_path / "missing.jsonl")


def test_task_conversations():
    conversations = task_conversations("reverse", 5, seed=1, system="Be brief.")
    assert len(conversations) == 5 and conversations == task_conversations("reverse", 5, seed=1, system="Be brief.")
    roles = [m["role"] for m in conversations[0]["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert conversations[0]["messages"][2]["content"].splitlines()[-1].startswith("Answer: ")


def run_command(argv):
    parser = argparse.ArgumentParser()
    tasks_command.add_arguments(parser)
    return tasks_command.run(parser.parse_args(argv))


def test_command_lists_and_shows_tasks(capsys):
    assert run_command([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUILTIN_TASKS)
    assert run_command(["sorting", "-n", "2", "--eval"]) == 0
    assert capsys.readouterr().out.count("Answer: ") == 2
    with pytest.raises(DaulatError, match="unknown task"):
        run_command(["nope"])


def test_addition_is_a_column_by_column_sum_with_a_held_out_split_that_separates_stages():
    import re

    task = get_task("addition")
    held_out = task.eval_examples(500)
    assert len(held_out) == 500 and len({e.answer for e in held_out}) > 300  # no small answer space to memorise
    for e in held_out + task.train_examples(200, seed=1):
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", e.prompt).groups())
        assert max(len(str(a)), len(str(b))) == 3  # the default difficulty: 3 columns at least
        lines = e.solution_text.splitlines()
        assert lines[0] == f"Columns: {a:03d} + {b:03d}" and lines[-1] == f"Answer: {a + b}"
        carry = 0
        for column, line in enumerate(lines[1:-1], 1):  # right to left: two digits, the carry, the sum
            x, y = (a // 10 ** (column - 1)) % 10, (b // 10 ** (column - 1)) % 10
            assert line == f"{x}+{y}+{carry}={x + y + carry:02d}"
            carry = (x + y + carry) // 10
        assert len(lines) == 5 and len({len(line) for line in lines[1:-1]}) == 1  # one width: fixed offsets
        assert task.check(e.solution_text, e) and not task.check(e.solution_text.replace(f"Answer: {a + b}", f"Answer: {a + b + 1}"), e)


def test_the_builtin_corpus_leans_towards_a_task_without_its_held_out_problems():
    addition = get_task("addition")
    plain = list(default_corpus(2000, seed=3))
    leaning = list(default_corpus(2000, seed=3, task="addition", task_share=0.6))
    def share(docs):
        return sum(d.startswith("What is ") and " + " in d.split("\n")[0] for d in docs) / len(docs)
    assert share(plain) < 0.2 and 0.6 < share(leaning) < 0.75  # 0.6 of it, plus the mixed rest's share
    prompts = {d.split("\n")[0] for d in leaning}
    assert not prompts & {e.prompt for e in addition.eval_examples(500)}
    assert leaning == list(default_corpus(2000, seed=3, task="addition", task_share=0.6))  # deterministic
    with pytest.raises(DaulatError, match="unknown task"):
        next(default_corpus(10, task="nope"))
