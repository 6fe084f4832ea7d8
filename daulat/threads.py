"""How many CPU threads torch computes with: `--threads N`, or `auto` (the default).

Measured on a 2-core machine at the tiny preset's pretraining step (BENCHMARKS.md, "Threads"): on an
idle machine 2 threads are 1.6x faster than 1 (5,300 against 3,400 tokens/s), but when other
processes keep the cores busy, 2 threads are 3-10x slower than 1, because every matrix product then
waits for its slowest thread to be scheduled. So `auto` counts the cores nobody else is using:

    auto = $OMP_NUM_THREADS when it is set (the user's or a scheduler's choice), else
           the CPUs of this process minus the 1-minute load average (rounded), and at least 1.

The choice is made once, when a command starts, and recorded with the run (environment.cpu_threads).
"""

from __future__ import annotations

import os

from daulat.errors import DaulatError

AUTO = "auto"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_threads(load: float | None = None, cpus: int | None = None) -> int:
    """The `auto` thread count (see the module doc); `load` and `cpus` default to this machine's."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1 and load is None:
        return int(env)
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cpus, cpus - round(load)))


def resolve_threads(value) -> int | None:
    """An int >= 1 from `value` (an int, a digit string or "auto"); None stays None (torch's default)."""
    if value is None:
        return None
    if value == AUTO:
        return auto_threads()
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DaulatError(f"threads must be a whole number of at least 1 or 'auto', got {value!r}")
    return value


def set_threads(value) -> int:
    """torch.set_num_threads(resolve_threads(value)) (unless None); the number torch now uses."""
    import torch

    threads = resolve_threads(value)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def threads_argument(value: str):
    """argparse type of --threads: a whole number >= 1, or 'auto'."""
    import argparse

    if value == AUTO:
        return value
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"threads must be a whole number of at least 1 or 'auto', got {value!r}")
    return int(value)
