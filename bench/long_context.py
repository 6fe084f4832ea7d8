"""Long context on a CPU: V3.2 prefill against transformers, KV-cache bytes per token, V4 training.

    python bench/long_context.py                     # all three sections: 8,192 tokens, a small random V3.2 model
    python bench/long_context.py --tokens 4096 --threads 2
    python bench/long_context.py --sections kv,train # without the prefill against transformers

prefill: the same random checkpoint (2 layers, hidden 256, index_topk 512) is prefilled by daulat's
`DeepseekV32` (the indexer scores every key, attention runs over the gathered top-k keys only) and by
transformers' `DeepseekV32ForCausalLM` (a dense score matrix with a mask), each in its own process so
that their peak memories do not mix: peak = the resident-set high-water mark during the forward
(reset just before it) minus the resident set before it. Each side runs a short warm-up first; the
timed run is one forward over --tokens tokens, with logits for the last --check positions only, which
are compared between the two.

kv: KV-cache bytes per token of V3 (the `tiny` preset), V3.2 (the `tiny-v32` preset and the prefill's
model) against full per-head K/V, by formula and as the decode caches measure them; and of V4 (the
`tiny-v4` preset), whose cache is a fixed window plus entries that grow by one per m tokens, so it is
given after --v4-context tokens (total bytes / tokens), by formula and measured from a real cache
prefilled that far, with its growth per token past the window.

train: training tokens/s of the --train-presets models (default `tiny` and `tiny-v4`) side by side,
steps interleaved, one thread, float32 (see train_tokens_per_s).

V4 decode at long context against transformers' `generate` is bench/v4_decode.py. Prints one JSON
line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=8, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
             v_head_dim=32, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             max_position_embeddings=16384, index_n_heads=16, index_head_dim=32, index_topk=512)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure(forward) -> tuple[float, int, torch.Tensor]:
    """(seconds, peak bytes above the resident set before the call, result) of forward()."""
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM) to the current resident set
    start = time.perf_counter()
    with torch.no_grad():
        out = forward()
    seconds = time.perf_counter() - start
    return seconds, (_rss_kib("VmHWM") - before) * 1024, out


def worker(side: str, checkpoint: str, tokens: int, check: int, out: str) -> dict:
    """One side's prefill: {"seconds", "peak_bytes"}; the last `check` logits saved to `out`."""
    from safetensors.torch import save_file

    ids = torch.randint(0, MODEL["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    if side == "daulat":
        from daulat.checkpoint import load_model

        model = load_model(checkpoint)

        def forward(x):
            return model.logits(model.hidden_states(x)[:, -check:])
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

        def forward(x):
            return model(x, logits_to_keep=check, use_cache=False).logits
    with torch.no_grad():
        forward(ids[:, :256])  # warm-up
    seconds, peak, logits = _measure(lambda: forward(ids))
    save_file({"logits": logits[0].contiguous()}, out)
    extra = {} if side == "daulat" else {"attn_implementation": model.config._attn_implementation}
    return {"seconds": round(seconds, 3), "peak_bytes": peak, **extra}


def make_checkpoint(directory: Path) -> Path:
    from daulat.checkpoint import save_model
    from daulat.model_v32 import DeepseekV32, DeepseekV32Config

    torch.manual_seed(0)
    model = DeepseekV32(DeepseekV32Config(**MODEL))
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return save_model(model, directory)


def kv_bytes() -> dict:
    """KV-cache bytes per token (bf16) of V3's `tiny` preset, of V3.2's `tiny-v32` preset and of this
    V3.2 model: by formula, as the decode cache measures it, and full per-head K/V of the same
    attention shape. (V4's cache is not a constant per token: see kv_bytes_v4.)"""
    from daulat.architectures import ModelSection, build_model
    from daulat.config import load_config
    from daulat.model_v32 import DeepseekV32, DeepseekV32Config, kv_cache_bytes_per_token

    def preset(name):
        return build_model(load_config({"model": ModelSection}, preset=name)["model"])

    out = {}
    with torch.device("meta"):
        models = {"v3_tiny": preset("tiny"), "v32_tiny_v32": preset("tiny-v32"),
                  "v32_bench": DeepseekV32(DeepseekV32Config(**MODEL))}
    for name, model in models.items():
        kv = kv_cache_bytes_per_token(model.config, bytes_per_number=2)
        measured = model.make_cache(1, 16, "meta", torch.bfloat16).bytes_per_token()
        out[name] = {"latent": kv["latent"], "indexer_keys": kv["indexer"], "total": kv["total"],
                     "measured_cache": measured, "full_per_head_kv": kv["mha"],
                     "ratio_to_full": round(kv["total"] / kv["mha"], 4)}
    return out


def v4_cache_bytes(config, context: int, bytes_per_number: int = 2) -> dict:
    """What daulat's V4 decode cache holds for one sequence of `context` tokens, by parts, by formula.
    Per layer: the window's last W - 1 keys (d each); a CSA layer's compressor (rate m, 2d channels a
    token: the entries so far, d each, the unfinished window's projected kv and raw gate, and the last
    finished window's kv and gate, the gate in float32 because its position bias is) and its indexer's
    (the same at c_I); an HCA layer's compressor (rate m', d channels, no overlap: entries and the
    unfinished window only)."""
    b, g, L = bytes_per_number, 4, context
    parts = {"window": 0, "entries": 0, "partial_windows": 0}
    for kind in config.layer_types:
        parts["window"] += min(config.sliding_window - 1, L) * config.head_dim * b
        if kind == "sliding_attention":
            continue
        m = config.compress_rates[kind]
        dims = [config.head_dim] + ([config.index_head_dim] if kind == "compressed_sparse_attention" else [])
        for dim in dims:
            width = 2 * dim if kind == "compressed_sparse_attention" else dim
            parts["entries"] += L // m * dim * b
            parts["partial_windows"] += L % m * width * 2 * b
            if kind == "compressed_sparse_attention" and L >= m:
                parts["partial_windows"] += m * width * (b + g)
    return {**parts, "total": sum(parts.values())}


def kv_bytes_v4(context: int = 32768, chunk: int = 4096) -> dict:
    """The `tiny-v4` preset's decode cache in bf16 after `context` tokens: by formula (v4_cache_bytes)
    and as measured from a real cache prefilled in chunks of `chunk` tokens (random weights and
    tokens), per token of context (total / context) and per token once past the window (the growth,
    daulat.model_v4.kv_cache_bytes_per_token_v4), against full per-head K/V (2 H d per layer)."""
    from daulat.architectures import ModelSection, build_model
    from daulat.config import load_config
    from daulat.model_v4 import kv_cache_bytes_per_token_v4

    config = load_config({"model": ModelSection}, preset="tiny-v4")["model"]
    torch.manual_seed(0)
    model = build_model(config).to(torch.bfloat16).eval()
    cache = model.make_cache(1, context)
    ids = torch.randint(0, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    start = time.process_time()
    with torch.no_grad():
        for first in range(0, context, chunk):
            piece = ids[:, first : first + chunk]
            model.hidden_states(piece, first + torch.arange(piece.shape[1])[None], cache)
    formula = v4_cache_bytes(config, context)
    growth = kv_cache_bytes_per_token_v4(config, bytes_per_number=2)
    measured = cache.bytes()
    return {"context": context, "formula_bytes": formula, "measured_bytes": measured,
            "formula_per_token_of_context": round(formula["total"] / context, 2),
            "measured_per_token_of_context": round(measured / context, 2),
            "growth_per_token": growth["v4"], "full_per_head_kv": growth["mha"],
            "ratio_to_full": round(measured / context / growth["mha"], 4),
            "prefill_cpu_s": round(time.process_time() - start, 1)}


def _run_worker(side: str, args, checkpoint: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--checkpoint", str(checkpoint), "--tokens",
               str(args.tokens), "--check", str(args.check), "--threads", str(args.threads), "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def train_tokens_per_s(presets=("tiny", "tiny-v4"), warmup: int = 2, steps: int = 8) -> dict:
    """Training tokens/s of each preset's model, float32, one process, steps interleaved (so drift in
    the machine's speed hits all alike): forward + backward through `model.training_loss` (with
    whatever loss terms the preset switches on: tiny-v4's indexer KL), torch's AdamW step, the
    router-bias update; the presets' own train.batch_size x train.seq_len. Median step, by the wall
    clock and by this process's CPU time."""
    import statistics

    from daulat.architectures import ModelSection, build_model
    from daulat.config import load_config
    from daulat.train.optim import TrainConfig

    runs = {}
    for name in presets:
        config = load_config({"model": ModelSection, "train": TrainConfig}, preset=name)
        torch.manual_seed(0)
        model = build_model(config["model"]).train()
        B, T = config["train"].batch_size, config["train"].seq_len
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, config["model"].vocab_size, (B, T + 1), generator=gen) for _ in range(warmup + steps)]
        runs[name] = {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=1e-3), "batches": batches,
                      "B": B, "T": T, "wall": [], "cpu": [], "loss": []}
    for i in range(warmup + steps):
        for name, r in runs.items():
            batch = r["batches"][i]
            wall, cpu = time.perf_counter(), time.process_time()
            loss, _ = r["model"].training_loss(batch[:, :-1], batch[:, 1:])
            loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            r["model"].update_router_bias(TrainConfig.bias_update_speed)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            r["loss"].append(round(loss.item(), 4))
            if i >= warmup:
                r["wall"].append(wall)
                r["cpu"].append(cpu)
    out = {}
    for name, r in runs.items():
        tokens = r["B"] * r["T"]
        out[name] = {"params": r["model"].num_parameters(), "batch_size": r["B"], "seq_len": r["T"],
                     "tokens_per_s_wall": round(tokens / statistics.median(r["wall"]), 1),
                     "tokens_per_s_cpu": round(tokens / statistics.median(r["cpu"]), 1),
                     "step_cpu_s": [round(x, 3) for x in r["cpu"]], "loss_first_last": [r["loss"][0], r["loss"][-1]]}
    first, *others = presets
    for name in others:
        out[f"{name}/{first}"] = {"wall": round(out[name]["tokens_per_s_wall"] / out[first]["tokens_per_s_wall"], 3),
                                  "cpu": round(out[name]["tokens_per_s_cpu"] / out[first]["tokens_per_s_cpu"], 3)}
    out.update(warmup=warmup, steps=steps, threads=torch.get_num_threads(), dtype="float32")
    return out


def prefill(args) -> dict:
    """The V3.2 prefill, daulat against transformers, each side in its own process."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "v32")
        sides = {side: _run_worker(side, args, checkpoint, Path(tmp) / f"{side}.safetensors")
                 for side in ("transformers", "daulat")}
        ours, theirs = (load_file(Path(tmp) / f"{s}.safetensors")["logits"] for s in ("daulat", "transformers"))
    diff = (ours - theirs).abs().max().item()
    hf, d = sides["transformers"], sides["daulat"]
    for side, r in sides.items():
        print(f"{side:>12}: {args.tokens} tokens in {r['seconds']:.2f} s, peak {r['peak_bytes'] / 2**20:.0f} MiB")
    speedup, memory = hf["seconds"] / d["seconds"], hf["peak_bytes"] / max(d["peak_bytes"], 1)
    print(f"daulat is {speedup:.1f}x faster with {memory:.1f}x lower peak memory; last {args.check} logits differ "
          f"by at most {diff:.2e}")
    return {"tokens": args.tokens, "model": MODEL, "daulat": d, "transformers": hf, "speedup": round(speedup, 2),
            "peak_memory_ratio": round(memory, 2), "max_abs_logit_diff_last_positions": diff,
            "logits_equal": diff <= 1e-4, "goal_met": speedup >= 4 and memory >= 4 and diff <= 1e-4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="prefill,kv,train",
                   help="what to run, comma-separated: prefill (V3.2 against transformers), kv (cache bytes per "
                        "token), train (training tokens/s of --train-presets); default all three")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--check", type=int, default=16, help="last positions whose logits are compared")
    p.add_argument("--threads", type=int, default=2, help="threads of the prefill (the kv and train sections run on one)")
    p.add_argument("--v4-context", type=int, default=32768, help="context at which V4's cache is measured")
    p.add_argument("--train-presets", default="tiny,tiny-v4", help="presets whose training tokens/s are compared")
    p.add_argument("--train-steps", type=int, default=8, help="timed steps per preset (after 2 warm-up steps)")
    p.add_argument("--worker", choices=["daulat", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.tokens, args.check, args.out)))
        return
    from daulat.provenance import cpu_model

    sections = set(args.sections.split(","))
    result = {"bench": "long_context", "machine": platform.processor() or platform.machine(), "cpu": cpu_model(),
              "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__}
    if "prefill" in sections:
        result.update(prefill(args))
    torch.set_num_threads(1)
    if "kv" in sections:
        kv = kv_bytes()
        for name, k in kv.items():
            print(f"  KV per token (bf16) {name}: {k['total']} bytes (measured {k['measured_cache']}) vs "
                  f"{k['full_per_head_kv']} full per-head K/V ({k['ratio_to_full']:.1%})")
        kv["v4_tiny_v4"] = v4 = kv_bytes_v4(args.v4_context)
        print(f"  KV (bf16) v4_tiny_v4 after {v4['context']} tokens: {v4['measured_bytes']} bytes measured "
              f"({v4['formula_bytes']['total']} by formula) = {v4['measured_per_token_of_context']} bytes per token "
              f"of context vs {v4['full_per_head_kv']} full per-head K/V ({v4['ratio_to_full']:.1%}); "
              f"{v4['growth_per_token']} bytes per token once past the window")
        result["kv_bytes_per_token_bf16"] = kv
    if "train" in sections:
        train = result["train_tokens_per_s"] = train_tokens_per_s(tuple(args.train_presets.split(",")),
                                                                  steps=args.train_steps)
        for name in args.train_presets.split(","):
            t = train[name]
            print(f"  training {name}: {t['tokens_per_s_cpu']:.0f} tokens per CPU-second, {t['tokens_per_s_wall']:.0f} "
                  f"tokens/s wall (batch {t['batch_size']} x {t['seq_len']}, {t['params']:,} parameters)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
