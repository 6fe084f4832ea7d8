"""Decode speed at batch 1: daulat's engine vs transformers' `generate`, same checkpoint, greedy, CPU.

    python bench/decode.py                        # a random `tiny` checkpoint made on the fly
    python bench/decode.py --checkpoint runs/sft --new-tokens 256 --threads 2
    python bench/decode.py --set hidden_size=384 --set n_routed_experts=32   # a shape nobody tuned for

Both generate exactly --new-tokens tokens after the same --prompt-tokens prompt (end-of-sequence
ignored), after one warm-up run each; tokens/s counts new tokens over the whole call (prefill
included, the same for both). The two take turns --repeats times and the best run of each counts,
which keeps a busy machine from favouring either. Also reports the KV-cache bytes per token each one actually holds:
daulat's latent cache vs transformers' per-head keys and values, and the memory-bandwidth bound: the
bytes a decode step must read (the active weights: attention, dense and shared MLPs, the chosen
experts, the output head) against the machine's measured copy bandwidth. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def make_checkpoint(preset: str, directory: Path, overrides: dict | None = None) -> Path:
    import dataclasses

    from daulat.architectures import ModelSection, build_model
    from daulat.checkpoint import save_model
    from daulat.config import load_config

    torch.manual_seed(0)
    config = load_config({"model": ModelSection}, preset=preset)["model"]  # any architecture (tiny-v4...)
    save_model(build_model(dataclasses.replace(config, **(overrides or {}))), directory)
    return directory


def parse_overrides(pairs: list[str]) -> dict:
    """["hidden_size=384", ...] -> {"hidden_size": 384, ...} (values read as JSON: numbers, true, null)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = json.loads(value)
    return out


def bandwidth_bound(config, bytes_per_number: int = 4) -> dict:
    """Bytes one decode step reads (active weights; the KV cache is small at these lengths) and the
    tokens/s the machine's memory bandwidth allows for them."""
    from daulat.model import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(config)
    head = config.vocab_size * config.hidden_size  # one embedding row is read, the whole head
    weight_bytes = (model.num_parameters(active=True, embeddings=False) + head) * bytes_per_number
    source = torch.ones(2**26)  # 256 MiB, far larger than any CPU cache; pages touched before timing
    target = torch.zeros_like(source)
    seconds = []
    for _ in range(4):
        start = time.perf_counter()
        target.copy_(source)
        seconds.append(time.perf_counter() - start)
    bandwidth = 2 * source.numel() * source.element_size() / min(seconds)  # read + write
    return {"active_weight_bytes_per_token": weight_bytes, "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "bandwidth_bound_tokens_per_s": round(bandwidth / weight_bytes, 1)}


def daulat_runner(checkpoint: Path, prompt: list[int], new_tokens: int):
    from daulat.checkpoint import load_checkpoint
    from daulat.infer import Engine, SamplingParams

    engine = Engine(load_checkpoint(checkpoint).model, None, max_num_seqs=1, max_model_len=len(prompt) + new_tokens + 1)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompt], params)  # warm-up

    def run() -> dict:
        cpu, start = time.process_time(), time.perf_counter()
        stamps, ids = [], []
        for delta in engine.stream(prompt, params):
            stamps.append(time.perf_counter())
            ids += delta.token_ids
        return {"seconds": stamps[-1] - start, "cpu_seconds": time.process_time() - cpu, "first_token_s": stamps[0] - start,
                "decode_s_per_token": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "token_ids": ids}

    return run, engine.runner.cache_bytes_per_token


def transformers_runner(checkpoint: Path, prompt: list[int], new_tokens: int):
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    ids = torch.tensor([prompt])
    # an explicit mask: the prompt starts with <|bos|> = 0, which must not be taken for padding
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=model.config.eos_token_id)
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm-up
        cache = model(ids, use_cache=True).past_key_values  # what its cache holds for this prompt
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    def run() -> dict:
        with torch.inference_mode():
            cpu, start = time.process_time(), time.perf_counter()
            out = model.generate(ids, **kwargs)
            return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                    "token_ids": out[0, len(prompt):].tolist()}

    return run, cache_bytes // len(prompt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: a random --preset model)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a model config field of the random --preset model (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_checkpoint(args.preset, Path(tmp) / args.preset, overrides)
        from daulat.checkpoint import load_config
        from daulat.model import kv_cache_bytes_per_token

        config = load_config(checkpoint)
        prompt = [config.bos_token_id or 0] + [(7 * i + 3) % config.vocab_size for i in range(args.prompt_tokens - 1)]
        ours, ours_kv = daulat_runner(checkpoint, prompt, args.new_tokens)
        theirs, theirs_kv = transformers_runner(checkpoint, prompt, args.new_tokens)
        ours_runs, theirs_runs = [], []
        for _ in range(args.repeats):
            ours_runs.append(ours())
            theirs_runs.append(theirs())
    best_ours = min(ours_runs, key=lambda r: r["seconds"])
    best_theirs = min(theirs_runs, key=lambda r: r["seconds"])
    mla_bytes = kv_cache_bytes_per_token(config, bytes_per_number=4)
    result = {
        "bench": "decode", "checkpoint": str(args.checkpoint or f"random {args.preset}"), "overrides": overrides,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch": 1, "dtype": "float32",
        "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "daulat_tokens_per_s": round(args.new_tokens / best_ours["seconds"], 1),
        "daulat_decode_only_tokens_per_s": round(1 / best_ours["decode_s_per_token"], 1),
        "daulat_first_token_ms": round(best_ours["first_token_s"] * 1e3, 1),
        "transformers_tokens_per_s": round(args.new_tokens / best_theirs["seconds"], 1),
        "daulat_runs_tokens_per_s": [round(args.new_tokens / r["seconds"], 1) for r in ours_runs],
        "transformers_runs_tokens_per_s": [round(args.new_tokens / r["seconds"], 1) for r in theirs_runs],
        "same_greedy_tokens": all(r["token_ids"] == theirs_runs[0]["token_ids"] for r in ours_runs + theirs_runs),
        "kv_bytes_per_token_daulat": ours_kv,
        "kv_bytes_per_token_transformers": theirs_kv,
        "kv_bytes_per_token_full_mha": mla_bytes["mha"],
    }
    result["speedup"] = round(result["daulat_tokens_per_s"] / result["transformers_tokens_per_s"], 2)
    # CPU time is less disturbed than wall time by other work on the machine
    cpu_ours = min(r["cpu_seconds"] for r in ours_runs)
    cpu_theirs = min(r["cpu_seconds"] for r in theirs_runs)
    result["daulat_tokens_per_cpu_s"] = round(args.new_tokens / cpu_ours, 1)
    result["transformers_tokens_per_cpu_s"] = round(args.new_tokens / cpu_theirs, 1)
    result["speedup_cpu_time"] = round(cpu_theirs / cpu_ours, 2)
    result.update(bandwidth_bound(config))
    result["fraction_of_bandwidth_bound"] = round(result["daulat_decode_only_tokens_per_s"]
                                                  / result["bandwidth_bound_tokens_per_s"], 3)
    print(f"daulat {result['daulat_tokens_per_s']} tok/s, transformers {result['transformers_tokens_per_s']} tok/s "
          f"({result['speedup']}x); KV cache {result['kv_bytes_per_token_daulat']} vs "
          f"{result['kv_bytes_per_token_transformers']} bytes/token (full per-head K/V: {result['kv_bytes_per_token_full_mha']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
