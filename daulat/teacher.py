"""Teachers for distillation: a local checkpoint, or any OpenAI-compatible endpoint.

    teacher = open_teacher("runs/big/final")                  # weights on this machine
    teacher = open_teacher("http://127.0.0.1:8000/v1")        # daulat serve, vLLM, llama.cpp, ...
    samples = teacher.generate([[{"role": "user", "content": "What is 2 + 3?"}]], SampleRequest(Sampling(), n=4))

Both generate answers to conversations (sequence-level distillation works across tokenizers: the
student re-reads the text with its own). Only a local teacher also gives its full next-token
distribution (`teacher.logits(input_ids)`), which the logit-level losses (forward and reverse KL)
need; it runs in eval mode with no gradients, in bfloat16 on a GPU.

The HTTP client is the standard library's urllib (no extra dependency at run time). It speaks the
chat-completions API: POST {base}/chat/completions with n samples per prompt, several prompts in
flight at once so that the server can batch them, and retries on 429/5xx and dropped connections.
An API key, when the endpoint needs one, is read from the environment variable DAULAT_TEACHER_API_KEY.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from daulat.errors import DaulatError
from daulat.generation import SampleRequest, Sampling  # noqa: F401 - what `generate` is asked with

API_KEY_ENV = "DAULAT_TEACHER_API_KEY"
_HASH_LIMIT_BYTES = 4 << 30  # weights larger than this are identified by size, not hashed


@dataclass
class Sample:
    """One teacher answer: its text, and whether it ended by itself (FINISH_STOP, "stop") or hit
    max_tokens (FINISH_LENGTH, "length"), as daulat/infer/engine/sequence.py and the OpenAI API name them."""

    text: str
    finish_reason: str | None


Conversation = list[dict]
Progress = Callable[[int, int], None]  # (prompts done, prompts in all)


def open_teacher(spec: str, *, device=None, model_name: str | None = None, concurrency: int = 8,
                 timeout: float = 300.0):
    """A teacher from a checkpoint directory or an http(s):// URL of an OpenAI-compatible API."""
    if spec.startswith(("http://", "https://")):
        return HTTPTeacher(spec, model=model_name, concurrency=concurrency, timeout=timeout)
    return LocalTeacher(spec, device=device)


# ------------------------------------------------------------------------------------------------
# A checkpoint on this machine
# ------------------------------------------------------------------------------------------------


class LocalTeacher:
    """A daulat (or transformers deepseek_v3) checkpoint, frozen: eval mode, no gradients, and
    bfloat16 weights on a GPU (half the memory; the student's loss is computed in float32 anyway)."""

    kind = "checkpoint"
    has_logits = True

    def __init__(self, path, device=None):
        import torch

        from daulat.checkpoint import load_checkpoint

        self.path = Path(path)
        if not any((self.path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise DaulatError(f"teacher {path}: neither a checkpoint directory (no config.json) "
                              f"nor an http(s):// URL of an OpenAI-compatible API")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, self.tokenizer, self.info = load_checkpoint(self.path, device=device, dtype=dtype)
        if self.tokenizer is None:
            raise DaulatError(f"teacher {path} has no tokenizer (tokenizer.json)")
        self.model = model.eval().requires_grad_(False)
        self.device = device

    def logits(self, input_ids):
        """input_ids [B, T] -> the teacher's logits [B, T, V], without gradients (one forward)."""
        import torch

        with torch.no_grad():
            return self.model(input_ids.to(self.device))

    def describe(self) -> dict:
        """Who the teacher is, for provenance: path, content hashes, size, how it was made."""
        if getattr(self, "_description", None) is None:
            self._description = self._describe()
        return dict(self._description)

    def _describe(self) -> dict:
        c = self.model.config
        weights = sorted(self.path.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in weights)
        digest = None
        if size <= _HASH_LIMIT_BYTES:
            h = hashlib.sha256()
            for f in weights:
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            digest = h.hexdigest()
        return {"kind": self.kind, "path": str(self.path), "weights_sha256": digest, "weights_bytes": size,
                "tokenizer_sha256": self.tokenizer.sha256, "parameters": self.model.num_parameters(),
                "active_parameters_per_token": self.model.num_parameters(active=True),
                "architecture": {"num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
                                 "n_routed_experts": c.n_routed_experts, "num_experts_per_tok": c.num_experts_per_tok,
                                 "vocab_size": c.vocab_size},
                "stage": self.info.get("stage"), "created": self.info.get("created")}

    def generate(self, conversations: list[Conversation], request: SampleRequest,
                 progress: Progress | None = None, chunk: int = 256) -> list[list[Sample]]:
        """`request.n` answers to each conversation, with the engine (batched, continuous)."""
        from daulat.generation import make_engine

        sampling, n = request.sampling, request.n
        prompts = [self.tokenizer.render_chat(c, add_generation_prompt=True)[0] for c in conversations]
        if not prompts:
            return []
        limit = self.model.config.max_position_embeddings
        too_long = [i for i, p in enumerate(prompts) if len(p) >= limit]
        if too_long:
            raise DaulatError(f"prompt {too_long[0]} has {len(prompts[too_long[0]])} tokens, more than the teacher's "
                              f"context ({limit})")
        max_len = min(limit, max(len(p) for p in prompts) + sampling.max_tokens + 1)
        engine = make_engine(self.model, self.tokenizer, sequences=max(n, min(64, len(prompts) * n)), context=max_len)
        out: list[list[Sample]] = []
        for start in range(0, len(prompts), chunk):
            params = [sampling.params(n=n, seed=request.seed + start + i, max_tokens=min(sampling.max_tokens, max_len - len(p)))
                      for i, p in enumerate(prompts[start : start + chunk])]
            for result in engine.generate(prompts[start : start + chunk], params):
                out.append([Sample(s.text, s.finish_reason) for s in result.samples])
            if progress is not None:
                progress(len(out), len(prompts))
        return out


# ------------------------------------------------------------------------------------------------
# An OpenAI-compatible endpoint
# ------------------------------------------------------------------------------------------------


def api_base(url: str) -> str:
    """The API base from what a user types: `http://host:8000`, `.../v1`, `.../v1/chat/completions`."""
    base = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base if base.endswith("/v1") else base + "/v1"


class HTTPTeacher:
    """A model behind an OpenAI-compatible chat-completions API. It gives samples, not distributions."""

    kind = "http"
    has_logits = False
    tokenizer = None

    def __init__(self, url: str, model: str | None = None, concurrency: int = 8, timeout: float = 300.0,
                 retries: int = 3):
        if concurrency < 1:
            raise DaulatError(f"teacher concurrency must be at least 1, got {concurrency}")
        self.url, self.base = url, api_base(url)
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.api_key = os.environ.get(API_KEY_ENV) or None
        self.model = model or self._first_model()

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.base, "model": self.model}

    # -- HTTP ------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON request with retries on 429, 5xx and connection errors; a DaulatError otherwise."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        where = f"teacher {self.base}{path}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in (429, 500, 502, 503, 504) and attempt < self.retries:
                    time.sleep(2**attempt)
                    continue
                raise DaulatError(f"{where}: HTTP {e.code} {detail}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if attempt < self.retries:
                    time.sleep(2**attempt)
                    continue
                reason = getattr(e, "reason", e)
                raise DaulatError(f"{where}: cannot connect ({reason})") from None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DaulatError(f"{where}: the answer is not JSON (is this an OpenAI-compatible API?)") from None
        raise AssertionError("unreachable")

    def _first_model(self) -> str:
        listed = self._call("GET", "/models").get("data") or []
        ids = [m.get("id") for m in listed if isinstance(m, dict) and m.get("id")]
        if not ids:
            raise DaulatError(f"teacher {self.base}/models lists no model; name one with --teacher-model")
        return ids[0]

    def _answers(self, index: int, conversation: Conversation, request: SampleRequest) -> list[Sample]:
        """`request.n` answers to one conversation; servers that return fewer choices than asked
        (some ignore `n`) are asked again, one sample at a time with the next seeds."""
        samples: list[Sample] = []
        sampling, seed = request.sampling, request.seed + index
        while len(samples) < request.n:
            want = request.n - len(samples)
            body = {"model": self.model, "messages": conversation, "n": want, "temperature": sampling.temperature,
                    "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": seed}
            if sampling.top_k:
                body["top_k"] = sampling.top_k
            choices = self._call("POST", "/chat/completions", body).get("choices")
            if not isinstance(choices, list) or not choices:
                raise DaulatError(f"teacher {self.base}/chat/completions: the answer has no choices")
            for choice in choices[:want]:
                message = choice.get("message") or {}
                samples.append(Sample(message.get("content") or "", choice.get("finish_reason")))
            seed += 1000003  # a different draw for the samples still missing
        return samples

    def generate(self, conversations: list[Conversation], request: SampleRequest,
                 progress: Progress | None = None, chunk: int = 64) -> list[list[Sample]]:
        """`request.n` answers to each conversation, `concurrency` requests in flight at a time."""
        out: list[list[Sample]] = []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for start in range(0, len(conversations), chunk):
                part = conversations[start : start + chunk]
                out += list(pool.map(lambda ic: self._answers(start + ic[0], ic[1], request), enumerate(part)))
                if progress is not None:
                    progress(len(out), len(conversations))
        return out


def _error_detail(e) -> str:
    """The message of an HTTP error body (OpenAI's {"error": {"message"}}), on one line."""
    try:
        body = json.loads(e.read().decode("utf-8"))
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("detail")
        text = str(message or body)
    except Exception:  # noqa: BLE001 - any unreadable body: fall back to the status text
        text = str(e.reason)
    return " ".join(text.split())[:300]
