"""DeepSeek-V4 prefill at long context: daulat's model vs transformers' `DeepseekV4ForCausalLM`, same
random weights, float32, CPU.

    python bench/v4_prefill.py                    # 4,096 tokens
    python bench/v4_prefill.py --tokens 8192 --threads 2

Each side runs in its own child process (so that one's peak memory does not hide the other's) and
reports the forward's wall time and its growth of the process's peak resident memory; the parent
checks that both logits agree. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = {"layer_types": ["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"],
          "sliding_window": 128, "index_topk": 64, "index_n_heads": 16, "index_head_dim": 32,
          "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
          "hidden_size": 128, "head_dim": 64, "qk_rope_head_dim": 16, "max_position_embeddings": 65536}


def child(side: str, tokens: int, out: Path) -> None:
    """Build the model from the shared seed, run one prefill, write the timings and the last logits."""
    from daulat.model_v4 import DeepseekV4, ModelConfigV4, to_hf_state_dict_v4

    torch.manual_seed(0)
    ours = DeepseekV4(ModelConfigV4(**CONFIG)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.1)
    if side == "transformers":
        from safetensors.torch import save_file
        from transformers import DeepseekV4ForCausalLM

        with tempfile.TemporaryDirectory() as tmp:  # a checkpoint under the published names, as on disk
            save_file({k: v.contiguous() for k, v in to_hf_state_dict_v4(ours).items()}, f"{tmp}/model.safetensors")
            (Path(tmp) / "config.json").write_text(json.dumps(ours.config.to_hf_dict()))
            model = DeepseekV4ForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
        del ours
        run = lambda ids: model(ids).logits  # noqa: E731
    else:
        run = ours
    ids = torch.randint(0, CONFIG.get("vocab_size", 512), (1, tokens), generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        start = time.perf_counter()
        logits = run(ids)
        seconds = time.perf_counter() - start
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    out.write_text(json.dumps({"seconds": seconds, "peak_mib": peak_mib, "last": logits[0, -64:].flatten().tolist()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", choices=["daulat", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args.tokens, args.out)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("daulat", "transformers"):
            out = Path(tmp) / f"{side}.json"
            command = [sys.executable, __file__, "--child", side, "--tokens", str(args.tokens), "--out", str(out)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            subprocess.run(command, check=True)
            results[side] = json.loads(out.read_text())
    diff = max(abs(a - b) for a, b in zip(results["daulat"]["last"], results["transformers"]["last"]))
    d, t = results["daulat"], results["transformers"]
    machine = platform.processor() or platform.machine()
    print(json.dumps({"bench": "v4_prefill", "tokens": args.tokens, "machine": machine,
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "daulat_s": round(d["seconds"], 3), "transformers_s": round(t["seconds"], 3),
                      "speedup": round(t["seconds"] / d["seconds"], 2),
                      "daulat_peak_mib": round(d["peak_mib"]), "transformers_peak_mib": round(t["peak_mib"]),
                      "memory_ratio": round(t["peak_mib"] / max(d["peak_mib"], 1), 2),
                      "max_abs_logit_diff_last_token": diff}))


if __name__ == "__main__":
    main()
