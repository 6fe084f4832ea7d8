"""Total generation throughput: 64 concurrent requests (continuous batching) vs. one at a time.

    python bench/throughput.py                       # a random `tiny` checkpoint made on the fly
    python bench/throughput.py --checkpoint runs/sft --requests 64 --new-tokens 128
    python bench/throughput.py --preset tiny-v4 --requests 16 --samples 8 --new-tokens 32   # GRPO-like

The same engine serves --requests prompts of different lengths (sampled, temperature 0.8, seeded,
end-of-sequence ignored so every request makes --new-tokens tokens): all submitted at once, then
one at a time. One-at-a-time throughput is measured on the first --sequential of them (a rate, so
a subset measures it as well as all of them, in a fraction of the time). Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: a random --preset model)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=16, help="requests timed one at a time")
    parser.add_argument("--samples", type=int, default=1, help="samples per request (n; GRPO's group size)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from daulat.checkpoint import load_checkpoint
    from daulat.infer import Engine, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is None:
            from decode import make_checkpoint  # bench/decode.py

            checkpoint = make_checkpoint(args.preset, Path(tmp) / args.preset)
        else:
            checkpoint = args.checkpoint
        model = load_checkpoint(checkpoint).model
    vocab = model.config.vocab_size
    rng = random.Random(0)
    prompts = [[0] + [rng.randrange(3, vocab) for _ in range(rng.randint(16, 96))] for _ in range(args.requests)]
    params = [SamplingParams(n=args.samples, temperature=0.8, seed=i, max_tokens=args.new_tokens, ignore_eos=True)
              for i in range(args.requests)]
    engine = Engine(model, None, max_num_seqs=args.requests * args.samples,
                    max_model_len=max(map(len, prompts)) + args.new_tokens + 1)
    engine.generate(prompts[:2], params[:2])  # warm-up

    start = time.perf_counter()
    together = engine.generate(prompts, params)
    batched_s = time.perf_counter() - start
    batched_tokens = sum(len(s.token_ids) for r in together for s in r.samples)

    start = time.perf_counter()
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts[: args.sequential], params[: args.sequential])]
    sequential_s = time.perf_counter() - start
    sequential_tokens = sum(len(s.token_ids) for r in alone for s in r.samples)
    same = all([s.token_ids for s in a.samples] == [s.token_ids for s in t.samples]  # seeded: batching changes nothing
               for a, t in zip(alone, together))

    result = {
        "bench": "throughput", "checkpoint": str(args.checkpoint or f"random {args.preset}"),
        "requests": args.requests, "samples": args.samples, "new_tokens": args.new_tokens, "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
        "threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "concurrent_tokens_per_s": round(batched_tokens / batched_s, 1),
        "concurrent_seconds": round(batched_s, 2),
        "one_at_a_time_tokens_per_s": round(sequential_tokens / sequential_s, 1),
        "one_at_a_time_requests_timed": args.sequential,
        "speedup": round((batched_tokens / batched_s) / (sequential_tokens / sequential_s), 2),
        "same_tokens_batched_and_alone": same,
        "engine": engine.stats,
    }
    print(f"{args.requests} concurrent: {result['concurrent_tokens_per_s']} tok/s; one at a time: "
          f"{result['one_at_a_time_tokens_per_s']} tok/s ({result['speedup']}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
