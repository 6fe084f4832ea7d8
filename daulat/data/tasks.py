"""Built-in verifiable tasks: procedurally generated problems with worked solutions and exact checkers.

Post-training needs problems whose answers a program can check: SFT learns the format from worked
solutions, GRPO is rewarded by the checker, eval measures accuracy on a held-out split. Each task has

    sample(rng, difficulty) -> Example(prompt, answer, solution_text)   a training example
    check(completion_text, example) -> bool                            exact, after extracting the final answer
    eval_examples(n, difficulty) -> [Example]                          the fixed held-out split

Every solution ends in a line `Answer: ...`; checkers read the last such line. Train and eval never overlap:
a prompt belongs to the eval split when a hash of (task, prompt) falls in one bucket out of EVAL_BUCKETS;
`sample` rejects those prompts and `eval_examples` keeps only them. The split is a property of the prompt
text, so it holds whatever the seed, the difficulty, or the number of examples drawn; pretraining on
`default_corpus` never sees an eval prompt either.

    daulat tasks                   list the tasks with an example each
    daulat tasks countdown -n 3    show three worked examples
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import random
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from daulat.errors import DaulatError

EVAL_BUCKETS = 20  # 1 prompt in 20 is reserved for evaluation
_MAX_TRIES = 10_000


@dataclass(frozen=True)
class Example:
    """One problem: what the model is asked, the reference final answer, and a worked solution that ends
    in the line `Answer: <answer>` (what SFT trains on and what a checker accepts)."""

    prompt: str
    answer: str
    solution_text: str

    def render(self) -> str:
        """Plain-text form for pretraining: the prompt, then the worked solution."""
        return f"{self.prompt}\n{self.solution_text}"

    def to_dict(self) -> dict:
        return asdict(self)


def in_eval_bucket(task_name: str, prompt: str) -> bool:
    """The hash split: a prompt is held out for evaluation when sha256(task, prompt) falls in bucket 0."""
    digest = hashlib.sha256(f"{task_name}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0


@dataclass
class Task:
    """A named task: a generator, a checker, a difficulty knob and a held-out eval split."""

    name: str
    description: str
    sample_fn: Callable  # (rng) or (rng, difficulty) -> Example
    check_fn: Callable[[str, Example], bool]
    default_difficulty: int | None = None
    difficulty_help: str = ""
    min_difficulty: int = 1
    eval_prompts: frozenset | None = None  # a fixed eval split (JSONL tasks); None: split by hash bucket
    fixed_eval: list | None = None

    def is_eval(self, prompt: str) -> bool:
        """True if `prompt` belongs to the held-out eval split of this task."""
        return prompt in self.eval_prompts if self.eval_prompts is not None else in_eval_bucket(self.name, prompt)

    def _difficulty(self, difficulty: int | None) -> int | None:
        if self.default_difficulty is None:
            return None
        difficulty = self.default_difficulty if difficulty is None else difficulty
        if not isinstance(difficulty, int) or difficulty < self.min_difficulty:
            raise DaulatError(f"task {self.name}: difficulty ({self.difficulty_help}) must be an integer >= {self.min_difficulty}, got {difficulty!r}")
        return difficulty

    def _draw(self, rng: random.Random, difficulty: int | None, want_eval: bool) -> Example:
        difficulty = self._difficulty(difficulty)
        for _ in range(_MAX_TRIES):
            example = self.sample_fn(rng) if difficulty is None else self.sample_fn(rng, difficulty)
            if self.is_eval(example.prompt) == want_eval:
                return example
        split = "eval" if want_eval else "train"
        raise DaulatError(f"task {self.name}: no {split} example found in {_MAX_TRIES} draws (too few distinct prompts?)")

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Example:
        """A training example (never one of the eval split), drawn with `rng`."""
        return self._draw(rng, difficulty, want_eval=False)

    def check(self, completion: str, example: Example) -> bool:
        """Whether the final answer in `completion` is correct for `example` (False on any parse failure)."""
        try:
            return bool(self.check_fn(completion, example))
        except (ValueError, TypeError, ArithmeticError, RecursionError, SyntaxError):
            return False

    def train_examples(self, n: int, seed: int = 0, difficulty: int | None = None) -> list[Example]:
        rng = random.Random(seed)
        return [self.sample(rng, difficulty) for _ in range(n)]

    def eval_examples(self, n: int, difficulty: int | None = None) -> list[Example]:
        """The first `n` distinct examples of the held-out split: the same list on every call and machine.

        Drawn from their own seed space. A task with few distinct prompts at this difficulty (one-digit
        addition has 100) may give fewer: drawing stops after 300 draws in a row bring nothing new.
        """
        if self.fixed_eval is not None:
            return self.fixed_eval[:n]
        rng = random.Random(f"daulat-eval:{self.name}:{self._difficulty(difficulty)}")
        examples, seen, misses = [], set(), 0
        while len(examples) < n and misses < 300:
            example = self._draw(rng, difficulty, want_eval=True)
            misses = misses + 1 if example.prompt in seen else 0
            if example.prompt not in seen:
                seen.add(example.prompt)
                examples.append(example)
        return examples

    def example(self, seed: int | str | None = None, difficulty: int | None = None) -> Example:
        """One training example (by default the same one every time: the task's showcase)."""
        return self.sample(random.Random(self.name if seed is None else seed), difficulty)


# --------------------------------------------------------------------------- reading answers


def extract_answer(completion: str) -> str | None:
    """The text after the last `Answer:` in `completion` (to the end of that line), without decoration:
    surrounding spaces, markdown bold/code, `$`, a trailing period. None if there is no such line."""
    found = re.findall(r"\banswer\s*\**\s*:\s*\**([^\n]*)", completion, flags=re.IGNORECASE)
    if not found:
        return None
    return found[-1].strip().strip("*`$ ").rstrip(".").strip() or None


def _int_answer(completion: str) -> int | None:
    """The final answer as an integer (`1,234` allowed), or None if it is not exactly one integer."""
    answer = extract_answer(completion)
    if answer is None or not re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+|[-+]?\d+", answer):
        return None
    return int(answer.replace(",", ""))


def _int_list(text: str | None) -> list[int] | None:
    """`3, 5, 9`, `[3, 5, 9]` or `3 5 9` as a list of integers; None if it is anything else."""
    if text is None or not re.fullmatch(r"\[?\s*-?\d+(\s*[,\s]\s*-?\d+)*\s*\]?", text):
        return None
    return [int(x) for x in re.findall(r"-?\d+", text)]


def check_int(completion: str, example: Example) -> bool:
    return _int_answer(completion) == int(example.answer)


def check_exact(completion: str, example: Example) -> bool:
    """Exact match of the final answer, ignoring surrounding whitespace and runs of spaces."""
    answer = extract_answer(completion)
    return answer is not None and " ".join(answer.split()) == " ".join(example.answer.split())


# --------------------------------------------------------------------------- the built-in tasks


def _number(rng: random.Random, max_digits: int) -> int:
    """A non-negative integer whose number of digits is uniform in 1..max_digits (so short ones are common)."""
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def sample_addition(rng: random.Random, digits: int) -> Example:
    """One number of exactly `digits` digits plus one of 1..`digits` digits, added column by column.

    The worked solution is the one a small transformer can follow a token at a time: the numbers lined
    up to the same width first, then one line per column, right to left, each the column's two digits,
    the carry into it (0 or 1) and their two-digit sum, then the answer: the last carry (if 1) and the
    sums' last digits, read from the bottom line up. Every line has the same width, so each digit the
    model needs sits a fixed number of tokens back (the same for every problem): it learns where to
    look once, instead of following line lengths that change with the numbers.

        Columns: 478 + 056
        8+6+0=14
        7+5+1=13
        4+0+1=05
        Answer: 534
    """
    full = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
    a, b = (full, _number(rng, digits)) if rng.random() < 0.5 else (_number(rng, digits), full)
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    lines, carry = [f"Columns: {da} + {db}"], 0
    for column in range(1, width + 1):
        x, y = int(da[-column]), int(db[-column])
        lines.append(f"{x}+{y}+{carry}={x + y + carry:02d}")
        carry = (x + y + carry) // 10
    return Example(f"What is {a} + {b}?", str(a + b), "\n".join(lines + [f"Answer: {a + b}"]))


def sample_multiplication(rng: random.Random, digits: int) -> Example:
    a, b = _number(rng, digits), rng.randint(2, 9)
    parts = [int(d) * 10**i * b for i, d in enumerate(str(a)[::-1]) if d != "0"] or [0]
    lines = [f"Multiply each place of {a} by {b}, then add."]
    lines += [f"{int(d) * 10**i} * {b} = {int(d) * 10**i * b}" for i, d in enumerate(str(a)[::-1]) if d != "0"] or [f"0 * {b} = 0"]
    if len(parts) > 1:
        lines.append(f"{' + '.join(map(str, parts))} = {a * b}")
    return Example(f"What is {a} * {b}?", str(a * b), "\n".join(lines + [f"Answer: {a * b}"]))


def sample_comparison(rng: random.Random, digits: int) -> Example:
    a = b = 0
    while a == b:
        a, b = _number(rng, digits), _number(rng, digits)
    larger, sa, sb = max(a, b), str(a), str(b)
    plural = lambda s: f"{len(s)} digit{'s' if len(s) > 1 else ''}"  # noqa: E731
    if len(sa) != len(sb):
        reason = f"{a} has {plural(sa)} and {b} has {plural(sb)}, so {larger} is larger."
    else:
        i = next(i for i in range(len(sa)) if sa[i] != sb[i])
        reason = f"Both have {plural(sa)}. They first differ at digit {i + 1}: {sa[i]} against {sb[i]}, so {larger} is larger."
    return Example(f"Which is larger: {a} or {b}?", str(larger), f"{reason}\nAnswer: {larger}")


def sample_sorting(rng: random.Random, length: int) -> Example:
    numbers = rng.sample(range(100), min(length, 100))
    lines, left = ["Take the smallest remaining number each time."], list(numbers)
    while left:
        smallest = min(left)
        left.remove(smallest)
        lines.append(f"{smallest}" + (f" (left: {', '.join(map(str, left))})" if left else ""))
    answer = ", ".join(map(str, sorted(numbers)))
    return Example(f"Sort in ascending order: {', '.join(map(str, numbers))}", answer, "\n".join(lines + [f"Answer: {answer}"]))


def check_sorting(completion: str, example: Example) -> bool:
    got = _int_list(extract_answer(completion))
    return got is not None and got == _int_list(example.answer)


def sample_countdown(rng: random.Random, count: int) -> Example:
    """`count` numbers from 1..20 combined left to right with + - * into a positive target."""
    while True:
        numbers = [rng.randint(1, 20) for _ in range(count)]
        value, expression, lines, has_sum = numbers[0], str(numbers[0]), [f"Start with {numbers[0]}."], False
        for n in numbers[1:]:
            op = rng.choice("+-*" if value * n <= 999 else "+-")
            if op == "-" and value <= n:
                op = "+"
            new = value + n if op == "+" else value - n if op == "-" else value * n
            lines.append(f"{value} {op} {n} = {new}")
            expression = f"({expression}) * {n}" if op == "*" and has_sum else f"{expression} {op} {n}"
            has_sum, value = has_sum or op != "*", new
        if value not in numbers:  # a target equal to a given number would need no work
            break
    shown = sorted(numbers)
    prompt = f"Use the numbers {', '.join(map(str, shown))} to make {value}. You may use +, - and *, each number at most once."
    return Example(prompt, expression, "\n".join(lines + [f"Answer: {expression}"]))


def _eval_arithmetic(node: ast.AST, used: list[int]) -> int:
    """Value of an expression made only of non-negative integers, + - * and parentheses."""
    if isinstance(node, ast.Expression):
        return _eval_arithmetic(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
        left, right = _eval_arithmetic(node.left, used), _eval_arithmetic(node.right, used)
        return left + right if isinstance(node.op, ast.Add) else left - right if isinstance(node.op, ast.Sub) else left * right
    raise ValueError("only integers, + - * and parentheses are allowed")


def check_countdown(completion: str, example: Example) -> bool:
    """Any expression that uses each given number at most once and equals the target (`= target` allowed)."""
    match = re.search(r"numbers ([\d, ]+) to make (\d+)", example.prompt)
    answer = extract_answer(completion)
    if match is None or answer is None or len(answer) > 200:
        return False
    available, target = [int(x) for x in match.group(1).split(",")], int(match.group(2))
    expression = re.sub(rf"\s*=\s*{target}$", "", answer.replace("×", "*").replace("−", "-"))
    used: list[int] = []
    value = _eval_arithmetic(ast.parse(expression, mode="eval"), used)
    return value == target and all(used.count(n) <= available.count(n) for n in set(used))


def sample_reverse(rng: random.Random, length: int) -> Example:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
    solution = f"Letters: {' '.join(word)}\nReversed: {' '.join(word[::-1])}\nAnswer: {word[::-1]}"
    return Example(f"Reverse the word: {word}", word[::-1], solution)


TASKS: dict[str, Task] = {}


def register_task(name: str, sample_fn: Callable, check_fn: Callable | None = None, description: str = "",
                  default_difficulty: int | None = None, difficulty_help: str = "", min_difficulty: int = 1) -> Task:
    """Add a task to TASKS. `sample_fn(rng) -> Example`, or `sample_fn(rng, difficulty)` when
    `default_difficulty` is given; `check_fn(completion, example) -> bool` defaults to exact match of the
    final answer. The eval split is by prompt hash, as for the built-in tasks."""
    takes_difficulty = len(inspect.signature(sample_fn).parameters) >= 2
    if default_difficulty is not None and not takes_difficulty:
        raise DaulatError(f"task {name}: a default difficulty needs sample_fn(rng, difficulty)")
    if default_difficulty is None and takes_difficulty:
        default_difficulty = 1
    task = Task(name, description, sample_fn, check_fn or check_exact, default_difficulty, difficulty_help, min_difficulty)
    TASKS[name] = task
    return task


register_task("addition", sample_addition, check_int, "add two numbers, column by column with carries", 3, "digits per number")
register_task("multiplication", sample_multiplication, check_int, "multiply a number by a single digit, place by place", 2, "digits of the first number")
register_task("comparison", sample_comparison, check_int, "say which of two numbers is larger", 3, "digits per number")
register_task("sorting", sample_sorting, check_sorting, "sort a short list of numbers in ascending order", 5, "numbers in the list")
register_task("countdown", sample_countdown, check_countdown, "reach a target from given numbers with + - * (any valid expression counts)", 3, "numbers given", 2)
register_task("reverse", sample_reverse, check_exact, "reverse the letters of a word", 5, "letters in the word")
BUILTIN_TASKS = tuple(TASKS)


def get_task(name: str) -> Task:
    """A registered task by name, or a JSONL task from a path ending in .jsonl."""
    if name in TASKS:
        return TASKS[name]
    if name.endswith(".jsonl"):
        return load_jsonl_task(name)
    raise DaulatError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or a .jsonl file of prompt/answer)")


def eval_examples(task: str | Task, n: int, difficulty: int | None = None) -> list[Example]:
    """The held-out split of a task (see `Task.eval_examples`)."""
    return (get_task(task) if isinstance(task, str) else task).eval_examples(n, difficulty)


def load_jsonl_task(path: str | Path, name: str | None = None) -> Task:
    """A task from a JSONL of {"prompt", "answer"} (optional "solution", and "split": "train"/"eval"),
    checked by exact match of the final answer. Rows without "split" go to eval by prompt hash (1 in
    EVAL_BUCKETS), so a small file should mark its eval rows explicitly."""
    path = Path(path)
    if not path.is_file():
        raise DaulatError(f"task file not found: {path}")
    name = name or path.stem
    train, evaluation = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DaulatError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or row.get("answer") is None:
            raise DaulatError(f"{path}:{number}: needs a string 'prompt' and an 'answer'")
        answer, solution = str(row["answer"]).strip(), row.get("solution")
        if not isinstance(solution, str) or extract_answer(solution) is None:
            solution = f"{solution.rstrip()}\nAnswer: {answer}" if isinstance(solution, str) else f"Answer: {answer}"
        split = row.get("split")
        if split not in (None, "train", "eval"):
            raise DaulatError(f"{path}:{number}: split must be 'train' or 'eval', got {split!r}")
        is_eval = split == "eval" if split else in_eval_bucket(name, row["prompt"])
        (evaluation if is_eval else train).append(Example(row["prompt"], answer, solution))
    if not train and not evaluation:
        raise DaulatError(f"task file {path} has no rows")

    def sample(rng: random.Random) -> Example:
        if not train:
            raise DaulatError(f"task file {path} has no training rows (all are in the eval split)")
        return rng.choice(train)

    return Task(name, f"prompts and answers from {path.name}", sample, check_exact,
                eval_prompts=frozenset(e.prompt for e in evaluation), fixed_eval=evaluation)


# --------------------------------------------------------------------------- corpora for training

_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _prose(rng: random.Random) -> str:
    """A few templated sentences about numbers, so that a tiny model also sees plain language about them."""
    n, m = rng.randint(0, 999), rng.randint(0, 999)
    sentences = [
        f"{n} is an {'even' if n % 2 == 0 else 'odd'} number. It comes after {n - 1} and before {n + 1}.",
        f"The number {n} has {len(str(n))} digit{'s' if n > 9 else ''}: {' '.join(str(n))}.",
        f"Counting up from {n}: {', '.join(str(n + i) for i in range(5))}.",
        f"Twice {n} is {2 * n}, and {n} plus ten is {n + 10}.",
        f"{max(n, m)} is larger than {min(n, m)}, and {min(n, m)} is smaller than {max(n, m)}." if n != m else f"{n} is equal to {m}.",
        f"{_NUMBER_WORDS[n % 13].capitalize()} is written {n % 13}, and {n % 13} reversed is still {n % 13}.",
        f"The sum of {n} and {m} is {n + m}, and their difference is {abs(n - m)}.",
    ]
    return " ".join(rng.sample(sentences, rng.randint(1, 3)))


def default_corpus(n_docs: int, seed: int = 0, task: str | None = None, task_share: float = 0.6) -> Iterator[str]:
    """The built-in pretraining corpus: `n_docs` documents, deterministic for a seed.

    About 4 in 5 are worked examples of the built-in tasks (prompt + solution, difficulties from 1 up to
    each task's default; training split only), the rest templated prose about numbers. With `task`, a
    `task_share` of the documents are worked examples of that task at its default difficulty (the one
    its evaluation uses) and the rest are as before: the corpus of a run that is to learn that task, as a
    lab's pretraining mix leans towards what its model is for. Small enough to generate on the fly; it
    teaches a tiny model the formats that SFT, GRPO and eval then use.
    """
    focus = get_task(task) if task else None
    rng = random.Random(seed)
    for _ in range(n_docs):
        if focus is not None and rng.random() < task_share:
            yield focus.sample(rng).render()
        elif rng.random() < 0.8:
            other = TASKS[rng.choice(BUILTIN_TASKS)]
            difficulty = rng.randint(other.min_difficulty, other.default_difficulty)
            yield other.sample(rng, difficulty).render()
        else:
            yield _prose(rng)


def task_conversations(task: str | Task, n: int, seed: int = 0, difficulty: int | None = None,
                       system: str | None = None) -> list[dict]:
    """`n` SFT conversations {"messages": [(system,) user prompt, assistant worked solution]} from the
    training split of a task."""
    task = get_task(task) if isinstance(task, str) else task
    head = [{"role": "system", "content": system}] if system else []
    return [{"messages": head + [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.solution_text}]}
            for e in task.train_examples(n, seed, difficulty)]


# --------------------------------------------------------------------------- CLI: daulat tasks


def add_arguments(parser) -> None:
    parser.add_argument("task", nargs="?", help="show worked examples of this task (a name or a .jsonl file)")
    parser.add_argument("-n", type=int, default=3, help="how many examples to show (default: %(default)s)")
    parser.add_argument("--difficulty", type=int, help="the task's difficulty knob (default: the task's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training examples shown (default: %(default)s)")
    parser.add_argument("--eval", action="store_true", help="show examples of the held-out eval split instead")


def run(args) -> int:
    if args.task is None:
        for task in TASKS.values():
            example = task.example()
            knob = f" [difficulty: {task.difficulty_help}, default {task.default_difficulty}]" if task.difficulty_help else ""
            print(f"{task.name:<15} {task.description}{knob}")
            print(f"{'':<15} e.g. {example.prompt!r} -> {example.answer}")
        return 0
    task = get_task(args.task)
    examples = task.eval_examples(args.n, args.difficulty) if args.eval else task.train_examples(args.n, args.seed, args.difficulty)
    for i, example in enumerate(examples):
        print(f"--- {task.name} {'eval' if args.eval else 'train'} example {i + 1}")
        print(example.prompt)
        print(example.solution_text)
    return 0
