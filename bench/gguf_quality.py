"""What each GGUF type costs in accuracy: llama.cpp's next-token logits against daulat's float32 ones.

Every type is written by `daulat export` (f32, f16, bf16 and q8_0 by daulat's own writer; q6_k, q5_k_m
and q4_k_m by llama.cpp's quantizer from an f16 file), loaded with llama-cpp-python (its KV cache in
float32, so that only the weights differ) and run on the same fixed windows of text; daulat's float32
forward pass is the reference. Per type: file size, bits per parameter, top-1 agreement of the
next-token argmax over every position, max and mean |Δlogit|.

Without --checkpoint a small model 256 wide (so that k-quant blocks of 256 apply) is trained for a few
minutes on README.md and evaluated on windows of docs/ARCHITECTURE.md, text it has not seen.

    python bench/gguf_quality.py                       # train the small model, then all types
    python bench/gguf_quality.py --checkpoint runs/chat/final --dtypes q8_0,q4_k_m

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, moe_intermediate_size=256,
             num_hidden_layers=4, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=32,
             qk_rope_head_dim=32, v_head_dim=32, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, max_position_embeddings=512)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a daulat checkpoint with tokenizer.json (default: train a small one)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--windows", type=int, default=8, help="windows of text to evaluate")
    p.add_argument("--window", type=int, default=96, help="tokens per window")
    p.add_argument("--steps", type=int, default=150, help="training steps of the small model")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def train_small(directory: Path, steps: int) -> Path:
    """A SMALL model trained on README.md (AdamW, cosine), saved as a daulat checkpoint in `directory`."""
    from daulat.checkpoint import save_model
    from daulat.model import DeepseekV3, ModelConfig
    from daulat.tokenizer import train_tokenizer

    paragraphs = [p for p in (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    tokenizer = train_tokenizer(paragraphs, SMALL["vocab_size"] - 24, min_frequency=2)
    stream = [t for p in paragraphs for t in (tokenizer.bos_id, *tokenizer.encode(p), tokenizer.eos_id)]
    torch.manual_seed(0)
    rng = random.Random(0)
    model = DeepseekV3(ModelConfig(**SMALL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    start = time.time()
    for step in range(steps):
        starts = [rng.randrange(len(stream) - 129) for _ in range(8)]
        chunk = torch.tensor([stream[s : s + 129] for s in starts])
        loss, _ = model.training_loss(chunk[:, :-1], chunk[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.step()
        model.update_router_bias(1e-3)
    print(f"trained the small model: {steps} steps, loss {loss.item():.3f}, {time.time() - start:.0f}s")
    save_model(model.eval(), directory / "small", tokenizer=tokenizer)
    return directory / "small"


def windows(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens, evenly spaced over docs/ARCHITECTURE.md, each after <|bos|>."""
    ids = tokenizer.encode((ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8"))
    stride = max(1, (len(ids) - length) // max(1, count - 1))
    return [[tokenizer.bos_id, *ids[i * stride : i * stride + length - 1]] for i in range(count)]


def measure(path: Path, reference: list[torch.Tensor], prompts: list[list[int]], threads: int) -> dict:
    """llama.cpp's logits of `path` on `prompts` against `reference` (daulat's, one [T, V] per prompt)."""
    import llama_cpp

    from daulat.export import llama_cpp_plain_buffers

    with llama_cpp_plain_buffers():  # llama.cpp aborts loading these files on a CPU with AMX otherwise
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                              n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0)  # 0: float32 cache
    agree, worst, total, count = 0, 0.0, 0.0, 0
    try:
        for ids, ours in zip(prompts, reference):
            llm.reset()
            llm.eval(ids)
            theirs = torch.from_numpy(llm.scores[: len(ids)].copy())
            diff = (theirs - ours).abs()
            agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
            worst, total, count = max(worst, diff.max().item()), total + diff.sum().item(), count + diff.numel()
    finally:
        llm.close()
    positions = sum(len(ids) for ids in prompts)
    return {"top1": agree / positions, "max_abs": worst, "mean_abs": total / count, "positions": positions}


def main(argv=None) -> dict:
    from daulat.checkpoint import load_checkpoint
    from daulat.cli import main as daulat

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else train_small(Path(tmp), args.steps)
        model, tokenizer, _ = load_checkpoint(checkpoint)
        model.float().eval()
        params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.mtp.parameters())
        prompts = windows(tokenizer, args.windows, args.window)
        with torch.no_grad():
            reference = [model(torch.tensor([ids]))[0] for ids in prompts]
        scale = max(r.abs().max().item() for r in reference)
        rows = []
        for dtype in args.dtypes.split(","):
            path = Path(tmp) / f"m-{dtype}.gguf"
            if daulat(["export", str(checkpoint), "--format", "gguf", "--dtype", dtype, "--out", str(path)]) != 0:
                raise SystemExit(f"export to {dtype} failed")
            size = path.stat().st_size
            rows.append({"dtype": dtype, "bytes": size, "bits_per_param": round(8 * size / params, 2),
                         **measure(path, reference, prompts, args.threads)})
    print(f"\n{params / 1e6:.2f}M parameters, logits up to {scale:.1f} in magnitude, "
          f"{rows[0]['positions'] if rows else 0} positions")
    print(f"{'dtype':8} {'MiB':>7} {'bits/param':>10} {'top-1':>7} {'max|Δ|':>8} {'mean|Δ|':>8}")
    for r in rows:
        print(f"{r['dtype']:8} {r['bytes'] / 2**20:7.2f} {r['bits_per_param']:10.2f} {r['top1']:7.4f} "
              f"{r['max_abs']:8.4f} {r['mean_abs']:8.5f}")
    result = {"bench": "gguf_quality", "params": params, "logit_scale": round(scale, 2),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "rows": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
