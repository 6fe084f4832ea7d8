"""Evaluate a checkpoint: task accuracy (greedy), pass@k from sampled answers, answer length, perplexity.

    daulat eval runs/sft/final --task addition                    # greedy accuracy on the held-out split
    daulat eval runs/sft/final --task addition --samples 8        # + pass@1..8 from 8 samples per prompt
    daulat eval runs/sft/final --text runs/data                   # perplexity on a text set (shards' val split,
                                                                  # or files: .txt .md .jsonl .parquet)

Problems come from the task's fixed held-out split, which training never sees. Greedy accuracy is the
fraction of problems whose greedy answer the task's checker accepts; pass@k is the unbiased estimator of
Chen et al. 2021 (arXiv 2107.03374) over n samples with c correct, 1 - C(n - c, k) / C(n, k), averaged
over problems. Prints a human-readable summary, then one JSON line last.
"""

from __future__ import annotations

import json
import math
import time

import torch

from daulat.errors import DaulatError
from daulat.precision import HOLD_DTYPES, HOLD_HELP, hold
from daulat.threads import set_threads, threads_argument


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c of them correct)
    is correct: 1 - C(n-c, k) / C(n, k), computed as a product so that it never overflows."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(samples: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def load_task(spec: str):
    """A task by name: a built-in or registered one, a .jsonl file of prompt/answer rows, or
    `module:name` to import `module` (from the current directory too), whose import registers the task
    with `daulat.data.tasks.register_task`, and then take `name`."""
    from daulat.data.tasks import get_task

    if ":" in spec and not spec.endswith(".jsonl"):
        import importlib
        import sys

        module_name, _, name = spec.partition(":")
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            importlib.import_module(module_name)
        except ImportError as e:
            raise DaulatError(f"task {spec!r}: cannot import {module_name} ({e})") from None
        return get_task(name)
    return get_task(spec)


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn conversation ending in the assistant's generation prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.render_chat(messages, add_generation_prompt=True)[0]


@torch.no_grad()
def perplexity(model, tokens, seq_len: int, batch_size: int = 8, max_tokens: int | None = None) -> dict:
    """Mean next-token cross-entropy (nats) and perplexity of `model` over consecutive, non-overlapping
    windows of a 1-D token array (each predicted token counted once; at most `max_tokens` of them)."""
    import numpy as np

    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    if n_windows < 1:
        raise DaulatError(f"the text set has fewer than {seq_len + 1} tokens: nothing to measure perplexity on")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for first in range(0, n_windows, batch_size):
            starts = range(first * seq_len, min(first + batch_size, n_windows) * seq_len, seq_len)
            windows = torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts]))
            logits = model(windows[:, :-1].to(device)).float()
            targets = windows[:, 1:].to(device)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def text_tokens(path: str, tokenizer, max_documents: int = 10000):
    """A 1-D token array to measure perplexity on: the val split of a shards directory, or files read as
    a corpus (each document as <|bos|> text <|eos|>)."""
    import numpy as np
    from pathlib import Path

    if (Path(path) / "index.json").is_file():
        from daulat.data.shards import load_shards

        shards = load_shards(path, tokenizer)
        return shards.val if len(shards.val) else shards.train
    from daulat.data.corpus import Corpus

    ids: list[int] = []
    for i, document in enumerate(Corpus([path])):
        if i >= max_documents:
            break
        ids += [tokenizer.bos_id] + tokenizer.encode(document) + [tokenizer.eos_id]
    return np.asarray(ids, dtype=np.int64)


def evaluate_task(model, tokenizer, task, n: int = 200, samples: int = 0, temperature: float = 1.0,
                  top_p: float = 1.0, max_tokens: int = 256, difficulty: int | None = None,
                  system: str | None = None, seed: int = 0, engine=None, greedy: bool = True) -> dict:
    """Accuracy of `model` on the first n problems of the task's held-out split.

    greedy: one greedy answer per problem -> accuracy, mean answer length (tokens), truncated fraction.
    samples > 0: that many samples per problem at `temperature` -> pass@k for k in ks_for(samples)
    (pass@1 is the mean accuracy of a sample), from one shared prefill per problem.
    engine: an `Engine` to reuse (GRPO evaluates with its rollout engine); one is made otherwise.
    """
    from daulat.infer import Engine, SamplingParams

    task = load_task(task) if isinstance(task, str) else task
    examples = task.eval_examples(n, difficulty)
    if not examples:
        raise DaulatError(f"task {task.name} has no held-out examples")
    prompts = [chat_prompt(tokenizer, e.prompt, system) for e in examples]
    if engine is None:
        longest = max(len(p) for p in prompts)
        engine = Engine(model, tokenizer, max_num_seqs=min(256, max(len(prompts), samples or 1)),
                        max_model_len=min(model.config.max_position_embeddings, longest + max_tokens), seed=seed)
    out: dict = {"task": task.name, "difficulty": task._difficulty(difficulty), "problems": len(examples)}
    start = time.time()
    if greedy:
        results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        correct = [task.check(r.text, e) for r, e in zip(results, examples)]
        lengths = [len(r.token_ids) for r in results]
        out.update(accuracy=sum(correct) / len(correct), mean_answer_tokens=sum(lengths) / len(lengths),
                   truncated=sum(r.finish_reason == "length" for r in results) / len(results))
        out["examples"] = [{"prompt": e.prompt, "answer": e.answer, "completion": r.text, "correct": c}
                           for e, r, c in list(zip(examples, results, correct))[:3]]
    if samples:
        params = [SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 seed=seed * 1_000_003 + i) for i in range(len(prompts))]
        results = engine.generate(prompts, params)
        counts = [sum(task.check(s.text, e) for s in r.samples) for r, e in zip(results, examples)]
        out["samples"] = samples
        out["temperature"] = temperature
        out["pass@k"] = {str(k): sum(pass_at_k(samples, c, k) for c in counts) / len(counts) for k in ks_for(samples)}
        out["sampled_mean_answer_tokens"] = sum(len(s.token_ids) for r in results for s in r.samples) / (len(results) * samples)
    out["seconds"] = round(time.time() - start, 2)
    return out


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (with its tokenizer)")
    parser.add_argument("--task", help="a built-in task (see `daulat tasks`), a .jsonl task file, or module:name "
                        "(a Python module that registers the task)")
    parser.add_argument("--samples", type=int, default=0, metavar="K",
                        help="also sample K answers per problem and report pass@1..K (default: greedy only)")
    parser.add_argument("-n", "--problems", type=int, default=200, help="held-out problems (default: %(default)s)")
    parser.add_argument("--difficulty", type=int, help="the task's difficulty knob (default: the task's own)")
    parser.add_argument("--temperature", type=float, default=1.0, help="for --samples (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="for --samples (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length limit (default: %(default)s)")
    parser.add_argument("--system", help="system prompt before every problem")
    parser.add_argument("--text", metavar="PATH", help="also measure perplexity on a text set: a shards directory "
                        "(its val split) or files (.txt .md .jsonl .parquet)")
    parser.add_argument("--seq-len", type=int, default=256, help="window for perplexity (default: %(default)s)")
    parser.add_argument("--max-ppl-tokens", type=int, default=200_000, help="perplexity over at most this many tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--dtype", choices=list(HOLD_DTYPES), help=HOLD_HELP)
    parser.add_argument("--threads", type=threads_argument, default="auto", metavar="N|auto",
                        help="torch CPU threads (default: auto, the cores not busy; see daulat.threads)")


def run(args) -> int:
    from daulat.checkpoint import load_checkpoint

    if not args.task and not args.text:
        raise DaulatError("nothing to evaluate: give --task NAME and/or --text PATH")
    if args.samples < 0 or args.problems < 1 or args.max_tokens < 1 or args.seq_len < 1:
        raise DaulatError("--samples must be >= 0; --problems, --max-tokens and --seq-len >= 1")
    task = load_task(args.task) if args.task else None
    set_threads(args.threads)
    dtype, fp8_resident = hold(args.dtype)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device, dtype=dtype, need_tokenizer=True,
                                          fp8_resident=fp8_resident)
    if args.samples:
        from daulat.infer import SamplingParams

        SamplingParams(n=args.samples, temperature=args.temperature, top_p=args.top_p)  # checks the values
    report: dict = {"checkpoint": str(args.checkpoint)}
    if task is not None:
        result = evaluate_task(model, tokenizer, task, n=args.problems, samples=args.samples,
                               temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                               difficulty=args.difficulty, system=args.system, seed=args.seed)
        shown = result.pop("examples")
        report.update(result)
        print(f"{task.name} (difficulty {result['difficulty']}), {result['problems']} held-out problems:")
        print(f"  greedy accuracy     {result['accuracy']:.3f}")
        print(f"  mean answer length  {result['mean_answer_tokens']:.1f} tokens ({result['truncated']:.1%} cut at {args.max_tokens})")
        for k, value in result.get("pass@k", {}).items():
            print(f"  pass@{k:<14} {value:.3f}   ({args.samples} samples at temperature {args.temperature})")
        for example in shown[:1]:
            print(f"  e.g. {example['prompt']!r} -> {example['completion'].splitlines()[-1] if example['completion'] else ''!r} "
                  f"({'correct' if example['correct'] else 'wrong'}, expected {example['answer']})")
    if args.text:
        tokens = text_tokens(args.text, tokenizer)
        ppl = perplexity(model, tokens, args.seq_len, max_tokens=args.max_ppl_tokens)
        report["perplexity"] = ppl["perplexity"]
        report["val_loss"] = ppl["loss"]
        report["perplexity_tokens"] = ppl["tokens"]
        print(f"perplexity on {args.text}: {ppl['perplexity']:.3f} (loss {ppl['loss']:.4f} nats/token over {ppl['tokens']:,} tokens)")
    print(json.dumps(report))
    return 0
