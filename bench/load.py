"""Peak memory of loading a checkpoint: daulat's streaming loader vs transformers' from_pretrained.

    python bench/load.py [--mb 512] [--fp8]

Writes a random DeepSeek-V3-shaped bf16 checkpoint of about --mb megabytes (and, with --fp8, the same
model in DeepSeek's FP8 block-scaled layout), then loads each in fresh subprocesses, one per loader, into
bfloat16 on the CPU. Each child measures its resident memory after its imports (the baseline), resets
the kernel's peak counter, loads, and reports peak minus baseline next to the in-memory size of what it
loaded. The goal (issue 14) is a peak above baseline within 1.2x the result's size. The last line printed
is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(loader: str, path: str, warmup: str) -> dict:
    """Load `path` with `loader` in this (fresh) process and measure. A tiny checkpoint of the same
    architecture is loaded first, so that both loaders' lazy imports (torch._dynamo, which torch.nn.init
    pulls in; transformers' model modules) are in the baseline rather than in the peak."""
    import torch

    if loader == "daulat":
        from daulat.checkpoint import load_model

        def load(where):  # the bare model: what transformers' from_pretrained is measured against
            return load_model(where, dtype=torch.bfloat16)
    else:
        import transformers

        def load(where):
            return transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.bfloat16)
    warmup_model = load(warmup)
    del warmup_model
    baseline = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    model = load(path)
    seconds = time.perf_counter() - start
    peak = _rss_kb("VmHWM")
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}  # tied: once
    size = sum(unique.values())
    return {"loader": loader, "seconds": round(seconds, 3), "result_mb": round(size / 2**20, 1),
            "peak_above_baseline_mb": round((peak - baseline) / 1024, 1),
            "ratio": round((peak - baseline) * 1024 / size, 3)}


def make_checkpoints(directory: Path, mb: int, fp8: bool) -> dict[str, Path]:
    import torch

    from daulat.checkpoint import save_model, to_hf_state_dict
    from daulat.export import fp8_weights
    from daulat.model import DeepseekV3, ModelConfig

    # DeepSeek-V3's proportions, scaled: MLA with q_lora, 1 dense + MoE layers, 8 routed experts. Every
    # linear size is a whole number of 128-blocks, because transformers' FP8 reader refuses ragged ones
    # (DeepSeek-V3's own kv_a_proj_with_mqa, 576 rows in 5 scale rows, among them); daulat reads both.
    config = ModelConfig(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=384,
                         qk_nope_head_dim=64, qk_rope_head_dim=128, v_head_dim=64, first_k_dense_replace=1,
                         n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2)
    with torch.device("meta"):  # scale the depth to the size asked for
        two = DeepseekV3(config).num_parameters()
        config.num_hidden_layers = 3
        per_layer = DeepseekV3(config).num_parameters() - two
    config.num_hidden_layers = max(2, round((mb * 2**20 / 2 - (two - 2 * per_layer)) / per_layer))
    out = {}
    for kind, shape in (("warmup", replace(config, num_hidden_layers=2, vocab_size=512)), ("bf16", config)):
        torch.manual_seed(0)
        model = DeepseekV3(shape).to(torch.bfloat16)
        out[kind] = save_model(model, directory / kind)
        if fp8:  # the same model in DeepSeek's FP8 layout
            weights, extra = fp8_weights(to_hf_state_dict(model)[0])
            out[f"{kind}_fp8"] = save_model(model, directory / f"{kind}_fp8", weights=weights, extra_config=extra)
        del model
    return out


def run_child(loader: str, path: Path, warmup: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, __file__, "--child", loader, str(path), str(warmup)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"loader": loader, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="checkpoint size in MB of bf16 (default: %(default)s)")
    parser.add_argument("--fp8", action="store_true", help="also load an FP8 block-scaled checkpoint into bf16")
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "PATH", "WARMUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import torch

    results = {"machine": os.uname().machine, "cpus": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoints(Path(tmp), args.mb, args.fp8)
        for kind in ("bf16", "fp8") if args.fp8 else ("bf16",):
            path, warmup = paths["bf16" if kind == "bf16" else "bf16_fp8"], paths[
                "warmup" if kind == "bf16" else "warmup_fp8"]
            files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            row = {"checkpoint_mb": round(files / 2**20, 1)}
            for loader in ("daulat", "transformers"):
                row[loader] = run_child(loader, path, warmup)
                print(f"{kind:5} {loader:12} {json.dumps(row[loader])}", flush=True)
            results[kind] = row
    ratios = [results[k]["daulat"].get("ratio") for k in ("bf16", "fp8") if k in results]
    results["goal"] = "daulat peak above baseline <= 1.2x the result's size"
    results["goal_met"] = all(r is not None and r <= 1.2 for r in ratios)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
