"""LoRA SFT step: daulat vs. transformers + PEFT on the same random MoE base, side by side in one run.

Both sides load the same checkpoint (daulat writes it once, transformers reads it), freeze it, put
rank-r adapters on the same layers (the attention projections and the dense and shared-expert MLPs;
PEFT gets daulat's own adapter_config.json, see daulat/lora.py for why the MLPs are
`target_parameters` there), and run the same steps: forward, next-token cross-entropy, backward,
gradient clipping, AdamW on the adapters. Each side runs in a subprocess of its own, so that its
peak memory is its own: the peak resident set (VmHWM) is reset after loading and read after the
steps, so it measures the training step (the load's peak is reported beside it). Throughput is
tokens / median step time after untimed warm-up steps.

    python bench/lora.py                        # ~420M-parameter base, CPU, float32, one thread
    python bench/lora.py --clock cpu            # a shared CPU: count only each process's CPU time
    python bench/lora.py --compare fp8          # daulat on an FP8-resident base against a bf16 base

With --compare fp8 both sides are daulat, on the same random base: one loads it in bfloat16, the other
loads the FP8 export of it (DeepSeek's 128 x 128 block layout) FP8-resident; both compute in bfloat16.
Memory is reported as the peak resident set in the step and as its growth over the process's
resident set after its imports (the model, the adapters' state and the step's activations).

Prints a summary, then one JSON line last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BASE_CONFIG = dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                   num_hidden_layers=8, num_attention_heads=8, kv_lora_rank=256, q_lora_rank=None,
                   qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, first_k_dense_replace=1,
                   n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, max_position_embeddings=1024)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: the process's CPU time (one thread on a shared machine)")
    p.add_argument("--base", help="an existing base checkpoint (default: a random one in a temporary directory)")
    p.add_argument("--experts", type=int, default=BASE_CONFIG["n_routed_experts"],
                   help="routed experts per MoE layer of the random base (default: %(default)s, 420.7M parameters)")
    p.add_argument("--compare", default="peft", choices=["peft", "fp8"],
                   help="peft: daulat against transformers + PEFT (float32); fp8: an FP8-resident base against bf16")
    p.add_argument("--side", choices=["daulat", "peft"], help=argparse.SUPPRESS)  # a subprocess's own side
    p.add_argument("--base-dtype", default="float32", help=argparse.SUPPRESS)  # the daulat side's lora.base_dtype
    p.add_argument("--adapter-config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# One side, in its own process
# ------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Start VmHWM afresh at the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Hand the loader's freed memory back to the OS (glibc keeps it otherwise), so that the resident set
    at the start of the steps is the live model, the same measure on both sides."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _daulat_side(args):
    from daulat import lora
    from daulat.checkpoint import load_checkpoint
    from daulat.precision import hold

    dtype, fp8_resident = hold(args.base_dtype)
    model = load_checkpoint(args.base, dtype=dtype, fp8_resident=fp8_resident).model
    lora.prepare(model, lora.LoraConfig(rank=args.rank, alpha=args.alpha, base_dtype=args.base_dtype), args.base)
    model.train()
    loss_fn = lambda ids: model.training_loss(ids[:, :-1], ids[:, 1:])[0]  # noqa: E731
    return model, loss_fn, lora.parameter_counts(model)


def _peft_side(args):
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    config = json.loads(Path(args.adapter_config).read_text())
    keep = {"r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters", "bias", "task_type"}
    model = peft.get_peft_model(hf, peft.LoraConfig(**{k: v for k, v in config.items() if k in keep}))
    model.train()
    # shift_labels: the targets as they are (daulat's), rather than transformers shifting `labels` itself
    loss_fn = lambda ids: model(input_ids=ids[:, :-1], labels=ids[:, 1:], shift_labels=ids[:, 1:].contiguous()).loss  # noqa: E731
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, loss_fn, {"parameters_trainable": trainable, "parameters_total": total,
                            "experts_implementation": hf.config._experts_implementation,
                            "attn_implementation": hf.config._attn_implementation}


def run_side(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    imported_kib = _status_kib("VmRSS")  # torch and the side's libraries, before the model
    model, loss_fn, counts = (_daulat_side if args.side == "daulat" else _peft_side)(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    vocab = BASE_CONFIG["vocab_size"]
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=gen)
               for _ in range(args.warmup + args.steps)]
    gc.collect()
    _release_free_heap()
    load_peak_kib, baseline_kib = _status_kib("VmHWM"), _status_kib("VmRSS")
    reset = _reset_peak()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times, losses = [], []
    for i, ids in enumerate(batches):
        start = clock()
        loss = loss_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(clock() - start)
        losses.append(round(loss.item(), 4))
    step_s = statistics.median(times)
    return {"side": args.side, "tokens_per_s": round(args.batch_size * args.seq_len / step_s, 1),
            "step_s": round(step_s, 4), "peak_rss_step_mib": round(_status_kib("VmHWM") / 1024, 1),
            "peak_above_loaded_mib": round((_status_kib("VmHWM") - baseline_kib) / 1024, 1),
            "peak_above_imports_mib": round((_status_kib("VmHWM") - imported_kib) / 1024, 1),
            "loaded_above_imports_mib": round((baseline_kib - imported_kib) / 1024, 1),
            "peak_is_step_only": reset, "load_peak_rss_mib": round(load_peak_kib / 1024, 1),
            "losses": losses, **counts}


# ------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------


def make_base(path: Path, experts: int = BASE_CONFIG["n_routed_experts"]) -> int:
    from daulat.checkpoint import save_model
    from daulat.model import DeepseekV3, ModelConfig

    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(**{**BASE_CONFIG, "n_routed_experts": experts}))
    save_model(model, path)
    return model.num_parameters()


def write_adapter_config(base: Path, out: Path, args) -> Path:
    """daulat's adapter_config.json for these settings (written by save_adapter on a meta-device model)."""
    from daulat import lora
    from daulat.checkpoint import load_config
    from daulat.model import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(load_config(base))
    lora.prepare(model, lora.LoraConfig(rank=args.rank, alpha=args.alpha), base)
    (out / "adapter_config.json").write_text(json.dumps(lora.adapter_config(model, str(base))))
    return out / "adapter_config.json"


def side(args, name: str, config_file: Path, base: Path | None = None, base_dtype: str = "float32") -> dict:
    argv = [sys.executable, __file__, "--side", name, "--base", str(base or args.base), "--adapter-config", str(config_file),
            "--base-dtype", base_dtype,
            "--rank", str(args.rank), "--alpha", str(args.alpha), "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--threads", str(args.threads), "--clock", args.clock]
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if done.returncode != 0:
        sys.exit(f"bench/lora.py: the {name} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args, tmp: Path) -> dict:
    if args.base is None:
        args.base = tmp / "base"
        params = make_base(args.base, args.experts)
    else:
        from daulat.checkpoint import load_config
        from daulat.model import DeepseekV3

        with torch.device("meta"):
            params = DeepseekV3(load_config(args.base)).num_parameters()
    config_file = write_adapter_config(Path(args.base), tmp, args)
    if args.compare == "fp8":
        return compare_fp8(args, tmp, config_file, params)
    ours, theirs = side(args, "daulat", config_file), side(args, "peft", config_file)
    import peft
    import transformers

    return {"bench": "lora_sft_step", "base_parameters": params, "rank": args.rank, "alpha": args.alpha,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads, "clock": args.clock,
            "daulat": ours, "peft": theirs,
            "speedup": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
            "memory_ratio": round(ours["peak_rss_step_mib"] / theirs["peak_rss_step_mib"], 3),
            "memory_ratio_above_loaded": round(ours["peak_above_loaded_mib"] / max(theirs["peak_above_loaded_mib"], 1e-9), 3),
            "goal": {"speedup": ">= 1.3", "memory_ratio": "<= 0.8"},
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}


def compare_fp8(args, tmp: Path, config_file: Path, params: int) -> dict:
    """daulat's LoRA step on the base loaded in bf16 and on its FP8 export held FP8-resident."""
    from daulat.cli import main as daulat

    fp8 = tmp / "base-fp8"
    if daulat(["export", str(args.base), "--format", "hf", "--dtype", "fp8", "--out", str(fp8)]) != 0:
        sys.exit("bench/lora.py: exporting the base to FP8 failed")
    bf16, resident = side(args, "daulat", config_file, base_dtype="bfloat16"), side(args, "daulat", config_file, fp8, "fp8")
    return {"bench": "lora_fp8_resident", "base_parameters": params, "rank": args.rank, "alpha": args.alpha,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads, "clock": args.clock,
            "bf16": bf16, "fp8": resident,
            "speed_ratio": round(resident["tokens_per_s"] / bf16["tokens_per_s"], 3),
            "memory_ratio": round(resident["peak_rss_step_mib"] / bf16["peak_rss_step_mib"], 3),
            "memory_ratio_above_imports": round(resident["peak_above_imports_mib"] / bf16["peak_above_imports_mib"], 3),
            "goal": {"memory_ratio": "<= 0.6"},
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "versions": {"torch": torch.__version__}}


def report_fp8(result: dict) -> None:
    for name in ("bf16", "fp8"):
        r = result[name]
        print(f"{name:5s} base {r['tokens_per_s']:8.1f} tok/s  step {r['step_s']:.3f} s  peak RSS in the step "
              f"{r['peak_rss_step_mib']:.0f} MiB ({r['peak_above_imports_mib']:.0f} above the imports, of which the "
              f"loaded model {r['loaded_above_imports_mib']:.0f})  losses {r['losses']}")
    print(f"memory {result['memory_ratio']}x in all, {result['memory_ratio_above_imports']}x above the imports "
          f"(goal <= 0.6); speed {result['speed_ratio']}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = compare(args, Path(tmp))
    if args.compare == "fp8":
        report_fp8(result)
        print(json.dumps(result))
        return
    for name in ("daulat", "peft"):
        r = result[name]
        print(f"{name:7s} {r['tokens_per_s']:8.1f} tok/s  step {r['step_s']:.3f} s  peak RSS in the step "
              f"{r['peak_rss_step_mib']:.0f} MiB ({r['peak_above_loaded_mib']:.0f} above the loaded model; "
              f"load peak {r['load_peak_rss_mib']:.0f} MiB)  "
              f"trainable {r['parameters_trainable']:,}  losses {r['losses']}")
    if abs(result["daulat"]["losses"][0] - result["peft"]["losses"][0]) > 1e-2:  # fresh adapters: the same base
        sys.exit(f"bench/lora.py: the first losses differ ({result['daulat']['losses'][0]} vs {result['peft']['losses'][0]})")
    print(f"speedup {result['speedup']}x (goal >= 1.3), memory {result['memory_ratio']}x (goal <= 0.8)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
