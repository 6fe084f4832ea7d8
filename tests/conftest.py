"""Shared test plumbing: optional test dependencies that skip locally and fail under CI.

A test that needs a package from the `test` extra (transformers, openai, gguf, llama-cpp-python,
playwright, ...) or a system program (Chromium) gets it through `require(...)` or
`require_program(...)`. On a developer's machine a missing one skips the test, saying how to
install it; with `CI=true` in the environment it fails the test instead, so that a partial install
can never show green.

The fast loop is `python -m pytest -m "not slow"` (under 90 s on 2 cores); `python -m pytest -q`
runs everything.
"""

from __future__ import annotations

import importlib
import os
import shutil

import pytest

# The tests' models are micro-sized: one OpenMP thread runs them faster than two (measured: the fast
# loop in 86 s against 95 s on an idle 2-core machine), and the processes the tests start inherit it.
# Set before any test module imports torch; an OMP_NUM_THREADS already in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

PIP_TEST_EXTRA = "pip install -e '.[test]'"

# the pip name and install hint of modules whose own name does not say it (everything else: the test extra)
PACKAGE = {"llama_cpp": "llama-cpp-python"}
INSTALL = {
    "llama_cpp": PIP_TEST_EXTRA + " (builds llama.cpp from source once: needs cmake and a C++ compiler; "
                                  "pip's wheel cache makes later installs instant)",
}


def under_ci() -> bool:
    """True when the environment says this is a CI run (`CI=true`, as GitHub Actions and most CIs set)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def missing(what: str, install: str) -> None:
    """A test dependency is absent: skip the test here, fail it under CI. Never returns."""
    message = f"needs {what}: {install}"
    if under_ci():
        pytest.fail(f"CI=true and a test dependency is missing: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require(module: str, package: str | None = None, install: str | None = None):
    """Import and return `module`, or skip (locally) / fail (CI=true) naming what to install.

    `package` is the name to report when it differs from the module (`llama_cpp` is
    llama-cpp-python); use it at module level (`gguf = require("gguf")`) or inside a test.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        absent = (error.name or module).split(".")[0]  # for daulat.infer.server: fastapi
        if absent == "daulat":  # only a missing dependency is excused, never a broken daulat module
            raise
    missing(package or PACKAGE.get(absent, absent), install or INSTALL.get(absent, PIP_TEST_EXTRA))


def require_program(name: str, install: str) -> str:
    """The path of system program `name` on PATH, or skip (locally) / fail (CI=true)."""
    path = shutil.which(name)
    if path is None:
        missing(f"the program {name!r}", install)
    return path


def trained_like_biases(model) -> None:
    """Give a freshly built model the non-zero biases a trained one has (the router's correction bias,
    so that routing depends on it, and every `.bias`), in place."""
    import torch

    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.2)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.05)
