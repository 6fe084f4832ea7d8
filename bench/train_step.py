"""Training-step throughput: daulat vs. transformers' DeepseekV3ForCausalLM, side by side in one run.

One step = forward + cross-entropy + backward + AdamW step (+ daulat's router-bias update, which is
part of its training step). Both models have the same config (transformers' DeepseekV3Config built
from ModelConfig.to_hf_dict()) and the same weights (transformers loads the checkpoint daulat
writes, and the script checks that the logits agree), see the same batches, and run in the same
process with the same threads; their steps are interleaved so that drift in the machine's speed
hits both alike. Warm-up steps are not timed; the figure is tokens / median step time.

    python bench/train_step.py                                  # CPU, float32, the `tiny` preset
    python bench/train_step.py --threads 1 --clock cpu          # a shared CPU: count only our CPU time
    python bench/train_step.py --device cuda --dtype bf16       # GPU; also reports MFU
    python bench/train_step.py --shape experts --clock cpu --threads 1   # a shape nobody tuned for
    python bench/train_step.py --set hidden_size=384 --set num_attention_heads=8   # any config field

daulat runs its step two ways: `training_loss` (the fused head + cross-entropy the training loop
uses) and `forward` (a plain `model(ids)` for the logits, then F.cross_entropy, as a user would
write it); `--mode both` (the default) times both against transformers in the same interleaved run.

Prints a summary, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from daulat.checkpoint import save_model
from daulat.config import read_preset
from daulat.model import DeepseekV3, ModelConfig
from daulat.provenance import cpu_model
from daulat.train.optim import TrainConfig

# shapes nobody tuned for: changes to the preset's [model] (see --shape)
SHAPES = {
    "wide": {"hidden_size": 384, "intermediate_size": 1024, "moe_intermediate_size": 192, "num_attention_heads": 8},
    "deep": {"num_hidden_layers": 8},
    "experts": {"n_routed_experts": 32, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2},
    "vocab": {"vocab_size": 16384},
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# keys of ModelConfig.to_hf_dict() that are daulat's own (or derived) and not DeepseekV3Config arguments
DAULAT_ONLY_KEYS = ("model_type", "architectures", "qk_head_dim", "head_dim", "dtype", "mtp_loss_weight",
                    "seq_aux_loss_alpha", "num_nextn_predict_layers")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset from daulat/recipes (default: tiny)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="change the preset's model to one of these shapes: " +
                        "; ".join(f"{k}: {v}" for k, v in SHAPES.items()))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one ModelConfig field (repeatable; VALUE read as JSON, else a string)")
    p.add_argument("--mode", default="both", choices=["both", "training_loss", "forward"],
                   help="daulat's step: training_loss, forward (+ F.cross_entropy), or both (default)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's train.batch_size, else 8")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's train.seq_len, else 256")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time (default); cpu: this process's CPU time, which leaves out the time "
                        "other processes hold the cores (one thread on CPU only)")
    p.add_argument("--attn", default=None,
                   help="transformers attn_implementation (default: transformers' own choice, sdpa where torch has it)")
    p.add_argument("--experts", default=None,
                   help="transformers experts_implementation (default: transformers' own choice)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="accelerator peak dense TFLOP/s for MFU (default: H100 SXM bf16, 989)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def parse_set(items: list[str]) -> dict:
    """["hidden_size=384", "rope_scaling=null"] -> {"hidden_size": 384, "rope_scaling": None}."""
    out = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[field] = json.loads(value)
        except json.JSONDecodeError:
            out[field] = value
    return out


def machine(device: torch.device) -> dict:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops_per_token(model: DeepseekV3, seq_len: int) -> int:
    """6 * N_active (matmul weights a token touches, lm_head included, embedding lookup not) plus
    attention's score and value matmuls, 6 * L * H * T * (qk_head_dim + v_head_dim), counted without
    the causal half (PaLM's convention)."""
    c = model.config
    n_active = model.num_parameters(active=True, embeddings=False) + model.lm_head.weight.numel()
    attention = 6 * c.num_hidden_layers * c.num_attention_heads * seq_len * (c.qk_head_dim + c.v_head_dim)
    return 6 * n_active + attention


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: this torch build sees no CUDA device", file=sys.stderr)
        return 2
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        print("--clock cpu measures one CPU thread: use it with --device cpu --threads 1", file=sys.stderr)
        return 2
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    try:
        import transformers
    except ImportError:
        print("bench/train_step.py needs transformers (pip install -e '.[test]')", file=sys.stderr)
        return 2

    preset = read_preset(args.preset)
    model_fields = dict(preset["model"])
    model_fields.update(SHAPES.get(args.shape, {}))
    model_fields.update(parse_set(args.set))
    config = ModelConfig(**model_fields)
    B = args.batch_size or preset.get("train", {}).get("batch_size", 8)
    T = args.seq_len or preset.get("train", {}).get("seq_len", 256)
    V = config.vocab_size
    torch.manual_seed(args.seed)
    ours = DeepseekV3(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, Path(tmp) / "ckpt")
        hf_config = {k: v for k, v in config.to_hf_dict().items() if k not in DAULAT_ONLY_KEYS}
        load_kwargs = {"config": transformers.DeepseekV3Config(**hf_config), "dtype": torch.float32}
        if args.attn:
            load_kwargs["attn_implementation"] = args.attn
        if args.experts:
            load_kwargs["experts_implementation"] = args.experts
        peer = transformers.DeepseekV3ForCausalLM.from_pretrained(Path(tmp) / "ckpt", **load_kwargs)
    ours, peer = ours.to(device, dtype).train(), peer.to(device, dtype).train()
    peer.config.use_cache = False

    n_batches = args.warmup + args.steps
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [torch.randint(0, V, (B, T + 1), generator=gen).to(device) for _ in range(n_batches)]

    # the same function: logits agree before any step is taken
    with torch.no_grad():
        ours.eval(), peer.eval()
        ids = batches[0][:, :T]
        logits_diff = (ours(ids).float() - peer(input_ids=ids).logits.float()).abs().max().item()
        ours.train(), peer.train()

    def ours_step(batch):
        loss, _ = ours.training_loss(batch[:, :-1], batch[:, 1:])
        return ours_finish(loss)

    def ours_forward_step(batch):
        logits = ours(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        return ours_finish(loss)

    def ours_finish(loss):
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        ours.update_router_bias(TrainConfig.bias_update_speed)
        return loss

    def peer_step(batch):
        logits = peer(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)
        return loss

    # torch's default AdamW for both, as daulat's training loop builds it
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-3)
    steps = {"daulat": ours_step, "daulat_forward": ours_forward_step, "transformers": peer_step}
    if args.mode == "training_loss":
        del steps["daulat_forward"]
    elif args.mode == "forward":
        del steps["daulat"]
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            sync(device)
            start = clock()
            loss = step(batch)
            sync(device)
            elapsed = clock() - start
            if i >= args.warmup:
                times[name].append(elapsed)
            losses[name].append(loss.item())

    tokens = B * T
    tok_s = {name: tokens / statistics.median(t) for name, t in times.items()}
    ratios = {name: round(v / tok_s["transformers"], 3) for name, v in tok_s.items() if name != "transformers"}
    ratio = min(ratios.values())
    experts_impl = getattr(peer.config, "_experts_implementation", None)
    result = {
        "bench": "train_step",
        "tok_s": {name: round(v, 1) for name, v in tok_s.items()},
        "ratios": ratios,  # daulat (training_loss) and daulat_forward (forward + F.cross_entropy) / transformers
        "ratio": round(ratio, 3),  # the smaller of the two
        # on a shared machine the fastest step is the steadier estimate of what a step costs
        "ratios_min_step": {name: round(min(times["transformers"]) / min(t), 3)
                            for name, t in times.items() if name != "transformers"},
        "mode": args.mode, "shape": args.shape, "set": parse_set(args.set),
        "step_s": {name: [round(x, 4) for x in t] for name, t in times.items()},
        "device": str(device), "dtype": args.dtype, "clock": args.clock,
        "batch_size": B, "seq_len": T, "warmup": args.warmup, "steps": args.steps,
        "preset": args.preset,
        "params": {"total": ours.num_parameters(), "active": ours.num_parameters(active=True)},
        "transformers": {"version": transformers.__version__, "attn_implementation": peer.config._attn_implementation,
                         "experts_implementation": experts_impl},
        "initial_logits_max_abs_diff": logits_diff,
        "final_loss": {name: round(v[-1], 4) for name, v in losses.items()},
        "config": config.to_hf_dict(),
        "machine": machine(device),
    }
    if device.type == "cuda":
        flops = train_flops_per_token(ours, T)
        result["flops_per_token"] = flops
        result["peak_tflops"] = args.peak_tflops
        result["mfu"] = {name: round(flops * v / (args.peak_tflops * 1e12), 4) for name, v in tok_s.items()}

    print(f"training step, preset {args.preset!r}: {ours.num_parameters() / 1e6:.2f}M parameters "
          f"({ours.num_parameters(active=True) / 1e6:.2f}M active), batch {B} x {T} tokens, "
          f"{args.dtype} on {device} ({result['machine']['cpu']}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load average {result['machine']['load_average_1m']}, {args.clock} clock)")
    print(f"transformers {transformers.__version__}: attention {result['transformers']['attn_implementation']}, "
          f"experts {experts_impl}; initial logits max |diff| {logits_diff:.2e}")
    for name in steps:
        step_ms = tokens / tok_s[name] * 1e3
        line = f"  {name:13s} {tok_s[name]:10.1f} tok/s  (median of {args.steps} steps, {step_ms:.1f} ms/step)"
        if "mfu" in result:
            line += f"  MFU {100 * result['mfu'][name]:.1f}%"
        print(line)
    for name, value in ratios.items():
        print(f"  ratio {name} / transformers: {value:.2f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
