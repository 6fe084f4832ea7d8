"""DeepSeek-V4 decode at long context, batch 1, greedy: daulat's engine vs transformers' `generate`, CPU.

    python bench/v4_decode.py                                  # daulat at 8K, 16K, 32K; transformers at 8K, 16K
    python bench/v4_decode.py --contexts 32768 --transformers-contexts 8192 --new-tokens 32
    python bench/v4_decode.py --transformers-prefill-chunk 1024    # generate(prefill_chunk_size=1024)

The model is bench/v4_prefill.py's (the same random weights: 3 layers, one each of CSA, HCA and
sliding-window attention, hidden 128, float32). Each (side, context) runs in its own child process,
one thread by default, watched by the parent: a child whose resident memory passes
--memory-limit-gib is killed and reported as such, with the memory it had reached.

daulat: `Engine.stream` over the context with `SamplingParams(temperature=0, ignore_eos=True)`, as a
user runs it. Its first step prefills the prompt, samples the first token, and decodes the second;
every later step decodes one token. Decode tokens/s = timed steps / (time at the end of the last
step - time at the end of the first), so the prefill is left out.

transformers: `DeepseekV4ForCausalLM.generate(max_new_tokens=N + 1, do_sample=False)`, eager
attention (the only one V4 supports); a logits processor stamps the time at each of the N + 1
tokens, so decode tokens/s = N / (last stamp - first stamp), leaving out the prefill (which the
first stamp follows) in the same call.

Both sides report wall and CPU time (time.process_time: the machine may be shared), the prefill, the
peak resident memory of the process (VmHWM, weights and interpreter included), the bytes the decode
cache holds after the run, and the generated token ids; the parent checks that the ids agree where
both sides ran. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from v4_prefill import CONFIG  # noqa: E402  (the same model as the prefill bench)

VOCAB = CONFIG.get("vocab_size", 512)


def _status_kib(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build_model():
    """bench/v4_prefill.py's model: daulat's DeepseekV4 from seed 0, every parameter normal(0, 0.1)."""
    from daulat.model_v4 import DeepseekV4, ModelConfigV4

    torch.manual_seed(0)
    model = DeepseekV4(ModelConfigV4(**CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def prompt_ids(tokens: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))


def daulat_child(context: int, new_tokens: int) -> dict:
    from daulat.infer import Engine, SamplingParams

    model = build_model()
    engine = Engine(model, None, max_num_seqs=1, max_model_len=context + new_tokens + 4)
    prompt = prompt_ids(context)[0].tolist()
    engine.generate([prompt[:64]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    loaded_mib = _status_kib("VmRSS") / 1024
    params = SamplingParams(temperature=0, max_tokens=new_tokens + 2, ignore_eos=True)
    steps0 = engine.stats["decode_steps"]
    start, cpu0 = time.perf_counter(), time.process_time()
    stamps, ids = [], []  # (wall, cpu, decode steps so far) after each delta
    with torch.inference_mode():
        for delta in engine.stream(prompt, params):
            stamps.append((time.perf_counter(), time.process_time(), engine.stats["decode_steps"] - steps0))
            ids += delta.token_ids
    first = next(s for s in stamps if s[2] == 1)  # the end of the first step: prefill + one decode
    last = stamps[-1]
    steps = last[2] - first[2]
    cache = engine.runner.cache
    return {"first_step_s": first[0] - start, "first_step_cpu_s": first[1] - cpu0,
            "decode_steps": steps, "decode_s": last[0] - first[0], "decode_cpu_s": last[1] - first[1],
            "tokens_per_s": steps / (last[0] - first[0]), "tokens_per_cpu_s": steps / (last[1] - first[1]),
            "rss_after_load_mib": round(loaded_mib), "peak_rss_mib": round(_status_kib("VmHWM") / 1024),
            "cache_bytes": cache.bytes(), "token_ids": ids}


def _cache_bytes(cache) -> int:
    """Every tensor a transformers V4 cache's layers hold (the window's keys, which are also its
    values, counted once; the compressors' buffers, entries and overlap states)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for value in vars(layer).values():
            for t in (value.values() if isinstance(value, dict) else [value]):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def transformers_child(context: int, new_tokens: int, prefill_chunk: int | None) -> dict:
    import transformers
    from safetensors.torch import save_file
    from transformers import DeepseekV4ForCausalLM, LogitsProcessor, LogitsProcessorList

    from daulat.model_v4 import to_hf_state_dict_v4

    transformers.logging.set_verbosity_error()
    ours = build_model()
    with tempfile.TemporaryDirectory() as tmp:  # a checkpoint under the published names, as on disk
        save_file({k: v.contiguous() for k, v in to_hf_state_dict_v4(ours).items()}, f"{tmp}/model.safetensors")
        (Path(tmp) / "config.json").write_text(json.dumps(ours.config.to_hf_dict()))
        model = DeepseekV4ForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
    del ours

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append((time.perf_counter(), time.process_time()))
            return scores

    def generate(ids, n, stamp=None):
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=model.config.eos_token_id, return_dict_in_generate=True,
                      logits_processor=LogitsProcessorList([stamp] if stamp else []))
        if prefill_chunk:
            kwargs["prefill_chunk_size"] = prefill_chunk
        with torch.inference_mode():
            return model.generate(ids, **kwargs)

    ids = prompt_ids(context)
    generate(ids[:, :64], 3)  # warm-up
    loaded_mib = _status_kib("VmRSS") / 1024
    stamp = Stamp()
    start, cpu0 = time.perf_counter(), time.process_time()
    out = generate(ids, new_tokens + 1, stamp)
    (w0, c0), (w1, c1) = stamp.stamps[0], stamp.stamps[-1]
    steps = len(stamp.stamps) - 1
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    return {"prefill_s": w0 - start, "prefill_cpu_s": c0 - cpu0, "decode_steps": steps, "decode_s": w1 - w0,
            "decode_cpu_s": c1 - c0, "tokens_per_s": steps / (w1 - w0), "tokens_per_cpu_s": steps / (c1 - c0),
            "rss_after_load_mib": round(loaded_mib), "peak_rss_mib": round(_status_kib("VmHWM") / 1024),
            "cache_bytes": None if cache is None else _cache_bytes(cache),
            "prefill_chunk_size": prefill_chunk, "attn_implementation": model.config._attn_implementation,
            "token_ids": out.sequences[0, context:].tolist()}


def run_child(side: str, context: int, args, out: Path) -> dict:
    """Run one (side, context) child, killing it if its resident set passes the memory limit."""
    command = [sys.executable, __file__, "--child", side, "--contexts", str(context), "--new-tokens",
               str(args.new_tokens), "--threads", str(args.threads), "--out", str(out)]
    if args.transformers_prefill_chunk:
        command += ["--transformers-prefill-chunk", str(args.transformers_prefill_chunk)]
    limit_kib = int(args.memory_limit_gib * 2**20)
    start = time.perf_counter()
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    highest = 0
    while child.poll() is None:
        try:
            rss = _status_kib("VmRSS", child.pid)
        except (OSError, StopIteration):
            rss = 0
        highest = max(highest, rss)
        if rss > limit_kib:
            child.kill()
            child.wait()
            return {"ran": False, "why": f"killed at {rss / 2**20:.2f} GiB resident (limit {args.memory_limit_gib} GiB) "
                                         f"after {time.perf_counter() - start:.0f} s",
                    "rss_at_kill_mib": round(rss / 1024), "seconds_before_kill": round(time.perf_counter() - start, 1)}
        if time.perf_counter() - start > args.max_seconds:
            child.kill()
            child.wait()
            return {"ran": False, "why": f"stopped after {args.max_seconds} s (--max-seconds); resident "
                                         f"{rss / 2**20:.2f} GiB, highest seen {highest / 2**20:.2f} GiB"}
        time.sleep(0.2)
    stderr = child.stderr.read()
    if child.returncode != 0:
        return {"ran": False, "why": f"exit status {child.returncode}: {stderr.strip().splitlines()[-1:]}"}
    return {"ran": True, "wall_s": round(time.perf_counter() - start, 1), **json.loads(out.read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="8192,16384,32768", help="daulat's context lengths (comma-separated)")
    p.add_argument("--transformers-contexts", default="8192,16384", help="transformers' (comma-separated; '' for none)")
    p.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-limit-gib", type=float, default=9.0, help="a child above this resident set is killed")
    p.add_argument("--max-seconds", type=float, default=1800, help="a child running longer is stopped")
    p.add_argument("--transformers-prefill-chunk", type=int, default=None,
                   help="generate(prefill_chunk_size=...) for transformers (default: one prefill forward)")
    p.add_argument("--child", choices=["daulat", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        context = int(args.contexts)
        result = (daulat_child(context, args.new_tokens) if args.child == "daulat" else
                  transformers_child(context, args.new_tokens, args.transformers_prefill_chunk))
        args.out.write_text(json.dumps(result))
        return
    from daulat.provenance import cpu_model

    contexts = {"daulat": [int(c) for c in args.contexts.split(",") if c],
                "transformers": [int(c) for c in args.transformers_contexts.split(",") if c]}
    runs: dict[str, dict[int, dict]] = {"daulat": {}, "transformers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for context in sorted(set(contexts["daulat"]) | set(contexts["transformers"])):
            for side in ("daulat", "transformers"):
                if context in contexts[side]:
                    runs[side][context] = r = run_child(side, context, args, Path(tmp) / f"{side}-{context}.json")
                    print(f"{side:>12} at {context:>6} tokens: " + (
                        f"decode {r['tokens_per_s']:.1f} tokens/s wall, {r['tokens_per_cpu_s']:.1f} per CPU-second "
                        f"({r['decode_steps']} steps), peak RSS {r['peak_rss_mib']} MiB, cache {r['cache_bytes']} bytes"
                        if r["ran"] else f"did not run: {r['why']}"), flush=True)
    comparisons = {}
    for context, theirs in runs["transformers"].items():
        ours = runs["daulat"].get(context)
        if not (ours and ours["ran"] and theirs["ran"]):
            continue
        n = min(len(ours["token_ids"]), len(theirs["token_ids"]))
        same = next((i for i in range(n) if ours["token_ids"][i] != theirs["token_ids"][i]), n)
        comparisons[context] = {"decode_speedup_wall": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                                "decode_speedup_cpu": round(ours["tokens_per_cpu_s"] / theirs["tokens_per_cpu_s"], 2),
                                "peak_rss_ratio": round(theirs["peak_rss_mib"] / ours["peak_rss_mib"], 2),
                                "tokens_compared": n, "identical_prefix": same, "tokens_identical": same == n}
        print(f"  at {context} tokens daulat decodes {comparisons[context]['decode_speedup_cpu']:.1f}x faster per "
              f"CPU-second ({comparisons[context]['decode_speedup_wall']:.1f}x wall); the first {same} of {n} "
              f"greedy tokens are identical")
    print(json.dumps({"bench": "v4_decode", "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
                      "torch": torch.__version__, "model": CONFIG, "new_tokens": args.new_tokens,
                      "memory_limit_gib": args.memory_limit_gib,
                      "runs": {side: {str(c): r for c, r in by.items()} for side, by in runs.items()},
                      "comparisons": {str(c): v for c, v in comparisons.items()}}))


if __name__ == "__main__":
    main()
