"""Shared helpers for the inference tests: a random micro checkpoint with a trained tokenizer, a free
loopback port, and a `daulat serve` subprocess.

A random model generates gibberish, but deterministically, which is all the equality tests need.
Import the fixtures into a test module (`from infer_fixtures import checkpoint`); the checkpoint is
built once per test session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

_BUILT: dict[str, Path] = {}


def make_checkpoint(directory: Path, preset: str = "micro", seed: int = 0, vocab_size: int = 512) -> Path:
    """`daulat init --preset PRESET` plus a byte-level BPE trained on the built-in corpus, in one directory."""
    import torch

    from daulat.checkpoint import save_model
    from daulat.config import load_config
    from daulat.data.tasks import default_corpus
    from daulat.model import DeepseekV3, ModelConfig
    from daulat.tokenizer import train_tokenizer

    config = load_config({"model": ModelConfig}, preset=preset)["model"]
    tokenizer = train_tokenizer(default_corpus(400, seed=0), vocab_size=min(vocab_size, config.vocab_size))
    torch.manual_seed(seed)
    model = DeepseekV3(config)
    save_model(model, directory, tokenizer=tokenizer, info={"stage": "init", "preset": preset, "seed": seed})
    return directory


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A micro checkpoint (random weights) with its tokenizer, built once per session."""
    if "micro" not in _BUILT:
        _BUILT["micro"] = make_checkpoint(tmp_path_factory.mktemp("infer") / "micro")
    return _BUILT["micro"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`daulat serve CKPT` in a subprocess on 127.0.0.1 and a free port; stopped on exit."""

    def __init__(self, checkpoint: Path, *args: str, env: dict | None = None, timeout: float = 60.0,
                 wait: bool = True):
        self.port, self.timeout = free_port(), timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(checkpoint).parent / f"serve-{self.port}.log"
        command = [sys.executable, "-m", "daulat.cli", "serve", str(checkpoint), "--host", "127.0.0.1",
                   "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daulat serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"daulat serve did not become healthy within {self.timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


API_KEY = "test-key-0123456789"


# The two shared servers: one with API keys (the server and web tests), one keyless with a small batch
# (4 slots, 4 more sequences may queue: the hardening and echo tests).
SHARED_SERVERS = {
    "server": ("--api-key", "other-key", API_KEY, "--threads", "1", "--max-num-seqs", "64", "--max-tokens", "256",
               "--served-model-name", "micro"),
    "keyless": ("--threads", "1", "--max-num-seqs", "4", "--max-queue", "4", "--served-model-name", "micro"),
}


def _shared_server(name: str, checkpoint: Path, request) -> Server:
    """The first time either shared server is asked for, both start, so that they load side by side."""
    if name not in _BUILT:
        for key, args in SHARED_SERVERS.items():
            _BUILT[key] = Server(checkpoint, *args, wait=False)
            request.addfinalizer(_BUILT[key].stop)
    _BUILT[name].wait_healthy()
    return _BUILT[name]


@pytest.fixture(scope="session")
def server(checkpoint, request) -> Server:
    """One `daulat serve` (API key API_KEY, one CPU thread) shared by the server and web tests."""
    return _shared_server("server", checkpoint, request)


@pytest.fixture(scope="session")
def keyless_server(checkpoint, request) -> Server:
    """One keyless `daulat serve` with a small batch, shared by the hardening and echo tests."""
    return _shared_server("keyless", checkpoint, request)


@pytest.fixture(scope="session")
def keyless_client(keyless_server):
    """The official `openai` client on the keyless server (no retries: a test sees each answer)."""
    import openai

    return openai.OpenAI(base_url=keyless_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
