"""How a model was made: the record every stage writes into its checkpoint's daulat.json.

A stage record says what was done (stage, method, config, seed), on what data (manifest or
generator), with what compute (tokens, FLOPs, wall time, hardware, energy estimate) and with what
result (metrics). A checkpoint's daulat.json is its own stage record plus `history`: the records of
every stage that led to it, oldest first, so a distilled student still documents the pretraining
data of its teacher's lineage. The model card (daulat/report.py) is rendered from this.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

# Stated assumptions for the energy estimate (EU AI Act Annex XI 1.2(e) asks for known or estimated
# consumption): average board/package power while training, by device kind, and the data-centre PUE.
ASSUMED_POWER_WATTS = {"cpu_per_core": 10.0, "cuda": 700.0}
ASSUMED_PUE = 1.2


def environment() -> dict:
    """Software and hardware this process runs on (recorded for reproducibility)."""
    import torch

    import daulat

    env = {
        "daulat": daulat.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    for name in ("tokenizers", "safetensors", "numpy"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional detail
            pass
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the daulat source tree, when it is a git checkout (no network involved)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def training_flops(model_config, tokens: int, seq_len: int, active_params: int) -> float:
    """Training FLOPs: 6 * N_active * D for the matrix multiplies (forward + backward) plus attention
    scores and weighted values, 6 * L * H * (qk_head_dim + v_head_dim) * T/2 per token (causal; for
    DeepSeek-V4, whose heads are head_dim wide for keys and values alike, the dense bound: its sliding
    and compressed layers score fewer entries)."""
    c = model_config
    qk, v = (c.head_dim, c.head_dim) if c.model_type == "deepseek_v4" else (c.qk_head_dim, c.v_head_dim)
    attention_per_token = 6 * c.num_hidden_layers * c.num_attention_heads * (qk + v) * seq_len / 2
    return float(6 * active_params * tokens + attention_per_token * tokens)


def energy_estimate(wall_time_s: float, device: str, world_size: int = 1, cpu_threads: int | None = None) -> dict:
    """Energy in kWh from wall time and the stated power assumptions."""
    if device.startswith("cuda"):
        watts = ASSUMED_POWER_WATTS["cuda"] * world_size
        basis = f"{ASSUMED_POWER_WATTS['cuda']:.0f} W per GPU x {world_size} GPU(s)"
    else:
        cores = cpu_threads or os.cpu_count() or 1
        watts = ASSUMED_POWER_WATTS["cpu_per_core"] * cores * world_size
        basis = f"{ASSUMED_POWER_WATTS['cpu_per_core']:.0f} W per busy CPU core x {cores} core(s) x {world_size} process(es)"
    kwh = watts * wall_time_s / 3.6e6 * ASSUMED_PUE
    return {"kwh": kwh, "assumptions": f"{basis}, for the measured wall time, PUE {ASSUMED_PUE}; not metered"}


def stage_info(stage: str, *, method: str, config: dict, data: dict, compute: dict, metrics: dict,
               parent: dict | None = None, **extra) -> dict:
    """The daulat.json of a checkpoint made by `stage`, carrying the history of `parent` (the
    daulat.json of the checkpoint it started from, if any)."""
    history = []
    if parent:
        history = list(parent.get("history", [])) + [{k: v for k, v in parent.items() if k != "history"}]
    return {
        "stage": stage,
        "method": method,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "data": data,
        "compute": compute,
        "metrics": metrics,
        "environment": environment(),
        **extra,
        "history": history,
    }
