"""Long-context prefill of DeepSeek-V3.2 (DeepSeek Sparse Attention): daulat vs transformers, CPU.

    python bench/long_context.py                     # 8,192 tokens, a small random V3.2 model
    python bench/long_context.py --tokens 4096 --threads 2

The same random checkpoint (2 layers, hidden 256, index_topk 512) is prefilled by daulat's
`DeepseekV32` (the indexer scores every key, attention runs over the gathered top-k keys only) and by
transformers' `DeepseekV32ForCausalLM` (a dense score matrix with a mask), each in its own process so
that their peak memories do not mix: peak = the resident-set high-water mark during the forward
(reset just before it) minus the resident set before it. Each side runs a short warm-up first; the
timed run is one forward over --tokens tokens, with logits for the last --check positions only, which
are compared between the two. Also reports KV-cache bytes per token of V3 (the `tiny` preset) and of
this V3.2 model against full per-head K/V, by formula and as the decode caches measure them. Prints
one JSON line last.
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
    """KV-cache bytes per token (bf16) of V3's `tiny` preset and of this V3.2 model: by formula, as
    the decode cache measures it, and full per-head K/V of the same attention shape."""
    from daulat.config import load_config
    from daulat.model import DeepseekV3, ModelConfig
    from daulat.model_v32 import DeepseekV32, DeepseekV32Config, kv_cache_bytes_per_token

    out = {}
    with torch.device("meta"):
        models = {"v3_tiny": DeepseekV3(load_config({"model": ModelConfig}, preset="tiny")["model"]),
                  "v32_bench": DeepseekV32(DeepseekV32Config(**MODEL))}
    for name, model in models.items():
        kv = kv_cache_bytes_per_token(model.config, bytes_per_number=2)
        measured = model.make_cache(1, 16, "meta", torch.bfloat16).bytes_per_token()
        out[name] = {"latent": kv["latent"], "indexer_keys": kv["indexer"], "total": kv["total"],
                     "measured_cache": measured, "full_per_head_kv": kv["mha"],
                     "ratio_to_full": round(kv["total"] / kv["mha"], 4)}
    return out


def _run_worker(side: str, args, checkpoint: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--checkpoint", str(checkpoint), "--tokens",
               str(args.tokens), "--check", str(args.check), "--threads", str(args.threads), "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--check", type=int, default=16, help="last positions whose logits are compared")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=["daulat", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.tokens, args.check, args.out)))
        return
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
    kv = kv_bytes()
    for name, k in kv.items():
        print(f"  KV per token (bf16) {name}: {k['total']} bytes (measured {k['measured_cache']}) vs "
              f"{k['full_per_head_kv']} full per-head K/V ({k['ratio_to_full']:.1%})")
    print(json.dumps({
        "bench": "long_context", "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "threads": args.threads, "torch": torch.__version__, "tokens": args.tokens, "model": MODEL,
        "daulat": d, "transformers": hf, "speedup": round(speedup, 2), "peak_memory_ratio": round(memory, 2),
        "max_abs_logit_diff_last_positions": diff, "logits_equal": diff <= 1e-4,
        "goal_met": speedup >= 4 and memory >= 4 and diff <= 1e-4, "kv_bytes_per_token_bf16": kv,
    }))


if __name__ == "__main__":
    main()
