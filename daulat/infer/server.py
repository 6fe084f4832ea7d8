"""`daulat serve CKPT`: an OpenAI-compatible HTTP server over the engine, with a web chat page.

    daulat serve runs/sft                       # http://127.0.0.1:8000 (this machine only)
    daulat serve runs/sft --api-key KEY1 KEY2   # or DAULAT_API_KEY=KEY1,KEY2

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming SSE or not), GET /v1/models,
GET /health (public; 503 while the weights load), and the web chat page at /. The official
`openai` client works unchanged (base_url="http://127.0.0.1:8000/v1").

Every request becomes an engine request; the engine steps all of them together on its own thread
(continuous batching) and hands deltas to the event loop, which never waits on the model. Errors
have OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from daulat.errors import DaulatError

STATIC = Path(__file__).parent / "static"


# ------------------------------------------------------------------------------------------------
# Settings and errors
# ------------------------------------------------------------------------------------------------


@dataclass
class Limits:
    max_model_len: int | None = None  # context per sequence, prompt included (None: the model's)
    max_tokens: int = 4096  # new tokens a request may ask for
    max_num_seqs: int = 64  # sequences decoded together
    max_queue: int = 256  # requests waiting for a slot before new ones get 429
    max_body_bytes: int = 1 << 20
    default_max_tokens_completions: int = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerState:
    model_name: str
    api_keys: list[bytes] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    engine: object | None = None  # set once the weights are loaded
    tokenizer: object | None = None
    load_error: str | None = None
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(error: APIError):
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# ------------------------------------------------------------------------------------------------
# Request parsing
# ------------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if not (_is_int(value) if integer else _is_number(value)) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise _bad(name, f"'{name}' must be {kind} between {low} and {high}, got {json.dumps(value)}")
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be true or false, got {json.dumps(value)}")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise _bad("stop", "'stop' must be a non-empty string or a list of at most 16 of them")
    return stop


def parse_common(body: dict, state: ServerState, prompt_len: int, chat: bool) -> dict:
    """The sampling fields shared by both endpoints, checked and limited; keyword args for SamplingParams."""
    limits, engine = state.limits, state.engine
    for penalty in ("presence_penalty", "frequency_penalty"):
        if body.get(penalty) not in (None, 0, 0.0):
            raise _bad(penalty, f"'{penalty}' is not supported (only 0)")
    room = engine.max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens but this model's context limit is "
                            f"{engine.max_model_len} tokens, which leaves no room to generate",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    max_tokens = None
    for name in (("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)):
        if body.get(name) is not None:
            max_tokens = _number(body, name, None, 1, limits.max_tokens, integer=True)
            if prompt_len + max_tokens > engine.max_model_len:
                raise APIError(400, f"the prompt has {prompt_len} tokens and '{name}' asks for {max_tokens} more, "
                                    f"beyond this model's context limit of {engine.max_model_len} tokens",
                               param=name, code="context_length_exceeded")
            break
    if max_tokens is None:
        default = limits.max_tokens if chat else limits.default_max_tokens_completions
        max_tokens = max(1, min(default, room))
    return dict(
        n=_number(body, "n", 1, 1, engine.max_num_seqs, integer=True),
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1),
        top_k=_number(body, "top_k", 0, -1, 1 << 30, integer=True),
        max_tokens=max_tokens,
        stop=_stop(body),
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        ignore_eos=_flag(body, "ignore_eos"),
    )


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with 'role' and 'content'")
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role", f"messages[{i}].role must be system, developer, user or assistant, "
                                              f"got {json.dumps(message.get('role'))}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise _bad(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


def parse_prompts(body: dict, state: ServerState) -> list[list[int]]:
    """/v1/completions' `prompt`: a string, a list of strings, a list of ids, or a list of lists of ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_int(t) for t in p)) for p in prompt):
        prompts = prompt
    else:
        raise _bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists")
    if len(prompts) > state.limits.max_num_seqs:
        raise _bad("prompt", f"at most {state.limits.max_num_seqs} prompts per request")
    engine, out = state.engine, []
    for p in prompts:
        if isinstance(p, str):
            ids = engine.encode(p) if p else None
        else:
            ids = list(p)
        if not ids:
            raise _bad("prompt", "a prompt is empty")
        bad = [t for t in ids if not 0 <= t < engine.vocab_size]
        if bad:
            raise _bad("prompt", f"token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})")
        out.append(ids)
    return out


# ------------------------------------------------------------------------------------------------
# Token text for log-probs
# ------------------------------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a BPE token uses for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """Each token's bytes and (possibly partial-character) text, cached."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoder, self.cache = tokenizer, _byte_decoder(), {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            piece = self.tokenizer.id_to_token(token_id) or ""
            if piece.startswith("<|") and piece.endswith("|>") or not all(c in self.decoder for c in piece):
                raw = piece.encode("utf-8")
            else:
                raw = bytes(self.decoder[c] for c in piece)
            self.cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self.cache[token_id]


def chat_logprobs(delta_or_sample, token_text: TokenText) -> dict:
    content = []
    top = delta_or_sample.top_logprobs or [None] * len(delta_or_sample.token_ids)
    for token, logprob, alternatives in zip(delta_or_sample.token_ids, delta_or_sample.logprobs, top):
        text, raw = token_text(token)
        entry = {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": []}
        for alt, alt_logprob in (alternatives or {}).items():
            alt_text, alt_raw = token_text(alt)
            entry["top_logprobs"].append({"token": alt_text, "logprob": alt_logprob, "bytes": alt_raw})
        content.append(entry)
    return {"content": content}


def completion_logprobs(delta_or_sample, token_text: TokenText, offset: int) -> dict:
    tokens, offsets = [], []
    for token in delta_or_sample.token_ids:
        text = token_text(token)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = delta_or_sample.top_logprobs
    return {"tokens": tokens, "token_logprobs": list(delta_or_sample.logprobs),
            "top_logprobs": [{token_text(t)[0]: lp for t, lp in alts.items()} for alts in top] if top else None,
            "text_offset": offsets}


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------


class Guard:
    """ASGI middleware for /v1/*: the API key (constant-time compare) and the body size limit."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope.get("headers") or [])
            error = self._check_key(headers.get(b"authorization")) or self._check_size(headers.get(b"content-length"))
            if error is not None:
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check_key(self, header: bytes | None) -> APIError | None:
        keys = self.state.api_keys
        if not keys:
            return None
        scheme, _, given = (header or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        given = given.strip()
        matched = False
        for key in keys:  # compare with every key, so the time taken says nothing about which matched
            matched |= hmac.compare_digest(given, key)
        if not matched:
            return APIError(401, "incorrect API key provided", code="invalid_api_key")
        return None

    def _check_size(self, header: bytes | None) -> APIError | None:
        try:
            size = int(header) if header is not None else 0
        except ValueError:
            return APIError(400, "invalid Content-Length header")
        if size > self.state.limits.max_body_bytes:
            return _too_large(self.state.limits.max_body_bytes)
        return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")


async def read_json(request, state: ServerState) -> dict:
    limit, chunks, size = state.limits.max_body_bytes, [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def create_app(state: ServerState, loader=None):
    """The FastAPI app. `loader()` (optional) loads the engine on a thread at start-up; /health
    answers 503 until it has."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        if loader is not None:
            threading.Thread(target=loader, name="daulat-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="daulat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(ValueError)  # the engine's InvalidParameter and the tokenizer's checks
    async def value_error(request, exc: ValueError):
        return _error_response(_bad(getattr(exc, "param", None), str(exc)))

    @app.exception_handler(DaulatError)
    async def daulat_error(request, exc: DaulatError):
        return _error_response(APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return _error_response(APIError(exc.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def ready():
        if state.engine is None:
            raise APIError(503, "the model is still loading", type="service_unavailable", code="model_loading")
        return state.engine

    def check_model(body: dict) -> None:
        model = body.get("model")
        if model is not None and model != state.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")

    def admit() -> None:
        limits = state.limits
        if state.in_flight >= limits.max_num_seqs + limits.max_queue:
            raise APIError(429, f"the server is full ({state.in_flight} requests in flight); retry later",
                           type="rate_limit_error", code="too_many_requests")

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        if state.engine is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "model": state.model_name}, status_code=503)
        return {"status": "ok", "model": state.model_name, "requests_in_flight": state.in_flight,
                "engine": dict(state.engine.stats)}

    def model_card():
        engine = state.engine
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "daulat",
                "max_model_len": engine.max_model_len if engine else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model({"model": model_id})
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        engine = ready()
        body = await read_json(request, state)
        check_model(body)
        messages = parse_messages(body)
        prompt = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        kwargs = parse_common(body, state, len(prompt), chat=True)
        want_logprobs = _flag(body, "logprobs")
        top = _number(body, "top_logprobs", 0, 0, 20, integer=True)
        if top and not want_logprobs:
            raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return await _respond(request, body, [prompt], kwargs, top, want_logprobs, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine = ready()
        body = await read_json(request, state)
        check_model(body)
        if body.get("echo"):
            raise _bad("echo", "'echo' is not supported")
        prompts = parse_prompts(body, state)
        kwargs = parse_common(body, state, max(len(p) for p in prompts), chat=False)
        logprobs = body.get("logprobs")
        if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 20):
            raise _bad("logprobs", "'logprobs' must be an integer between 0 and 20 (the number of most likely tokens)")
        return await _respond(request, body, prompts, kwargs, logprobs or 0, logprobs is not None, chat=False)

    async def _respond(request, body, prompts, kwargs, top, want_logprobs, chat):
        from daulat.infer.engine import InvalidParameter, SamplingParams

        engine = state.engine
        stream = _flag(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise _bad("stream_options", "'stream_options' must be an object")
        include_usage = stream and _flag(options, "include_usage")
        admit()
        try:
            params = SamplingParams(**kwargs, logprobs=top)
            handles = [engine.submit(p, params, asynchronous=True) for p in prompts]
        except InvalidParameter as e:
            raise _bad(e.param, str(e)) from None
        state.in_flight += len(handles)
        reply = Reply(state, handles, params.n, chat, want_logprobs, include_usage)
        if stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await reply.whole())
        finally:
            reply.close()

    return app


class Reply:
    """The answer to one API request: its engine handles turned into OpenAI JSON or SSE chunks."""

    def __init__(self, state: ServerState, handles, n: int, chat: bool, want_logprobs: bool, include_usage: bool):
        self.state, self.handles, self.n, self.chat = state, handles, n, chat
        self.want_logprobs, self.include_usage = want_logprobs, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.token_text = TokenText(state.tokenizer)
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.state.in_flight -= len(self.handles)
            for handle in self.handles:
                if not handle.request.finished:
                    handle.abort()

    async def _deltas(self):
        """(choice index, delta) from every handle as they come."""
        if len(self.handles) == 1:
            async for delta in self.handles[0]:
                yield delta.index, delta
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, handle):
            try:
                async for delta in handle:
                    await merged.put((i * self.n + delta.index, delta))
            finally:
                await merged.put(None)

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await merged.get()
                if item is None:
                    remaining -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    def _usage(self) -> dict:
        prompt = sum(len(h.prompt_token_ids) for h in self.handles)
        completion = sum(len(s.token_ids) for h in self.handles for s in h.request.sequences)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _check_errors(self) -> None:
        errors = [h.error for h in self.handles if h.error]
        if errors:
            raise APIError(500, f"generation failed: {errors[0]}", type="server_error")

    async def whole(self) -> dict:
        async for _ in self._deltas():
            pass
        self._check_errors()
        choices = []
        for i, handle in enumerate(self.handles):
            for sample in handle.request.result().samples:
                choice = {"index": i * self.n + sample.index, "finish_reason": sample.finish_reason, "logprobs": None}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": sample.text}
                    if self.want_logprobs:
                        choice["logprobs"] = chat_logprobs(sample, self.token_text)
                else:
                    choice["text"] = sample.text
                    if self.want_logprobs:
                        choice["logprobs"] = completion_logprobs(sample, self.token_text, 0)
                choices.append(choice)
        choices.sort(key=lambda c: c["index"])
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.state.model_name, "choices": choices, "usage": self._usage()}

    def _chunk(self, choices: list[dict], usage=False) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.state.model_name, "choices": choices}
        if self.include_usage:
            chunk["usage"] = self._usage() if usage else None
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def stream(self):
        try:
            count = len(self.handles) * self.n
            offsets = [0] * count  # characters sent per choice (completions' text_offset)
            if self.chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(count)])
            async for index, delta in self._deltas():
                if delta.finish_reason == "error":
                    error = APIError(500, f"generation failed: {self.handles[0].error}", type="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    continue
                if delta.text or (self.want_logprobs and delta.token_ids):
                    choice = {"index": index, "logprobs": None, "finish_reason": None}
                    if self.chat:
                        choice["delta"] = {"content": delta.text}
                        if self.want_logprobs:
                            choice["logprobs"] = chat_logprobs(delta, self.token_text)
                    else:
                        choice["text"] = delta.text
                        if self.want_logprobs:
                            choice["logprobs"] = completion_logprobs(delta, self.token_text, offsets[index])
                    offsets[index] += len(delta.text)
                    yield self._chunk([choice])
                if delta.finish_reason is not None:
                    final = {"index": index, "logprobs": None, "finish_reason": delta.finish_reason}
                    final.update({"delta": {}} if self.chat else {"text": ""})
                    yield self._chunk([final])
            if self.include_usage:
                yield self._chunk([], usage=True)
            yield "data: [DONE]\n\n"
        finally:
            self.close()


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (with its tokenizer)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 listens on every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", action="extend", nargs="+", default=[], metavar="KEY",
                   help="require one of these keys as 'Authorization: Bearer KEY' on /v1/* "
                        "(also read from $DAULAT_API_KEY, comma-separated); default: no key")
    p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's directory name)")
    p.add_argument("--max-model-len", type=int, help="context limit per sequence, prompt included (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=4096, help="most new tokens one request may ask for (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together in one batch (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a free sequence slot; beyond that, 429 (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body, else 413 (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights' dtype (default: float32)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--seed", type=int, help="seed for requests that bring none (default: random)")
    p.add_argument("--access-log", action="store_true", help="log every request")


def api_keys_from(args_keys: list[str]) -> list[bytes]:
    keys = list(args_keys)
    keys += [k.strip() for k in os.environ.get("DAULAT_API_KEY", "").split(",") if k.strip()]
    for key in keys:
        if not key or any(c.isspace() for c in key):
            raise DaulatError("an API key must be non-empty and contain no spaces")
    return [k.encode() for k in keys]


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise DaulatError("daulat serve needs fastapi and uvicorn: pip install 'daulat[serve]'") from None
    import torch

    from daulat.checkpoint import load_config
    from daulat.tokenizer import load_tokenizer

    checkpoint = Path(args.checkpoint)
    config = load_config(checkpoint)  # fails fast, with one line, on a bad directory
    tokenizer = load_tokenizer(checkpoint)
    for name in ("max_tokens", "max_num_seqs", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise DaulatError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise DaulatError("--max-queue must be at least 0")
    if args.max_model_len is not None and not 2 <= args.max_model_len:
        raise DaulatError("--max-model-len must be at least 2")
    if args.threads is not None:
        if args.threads < 1:
            raise DaulatError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    limits = Limits(max_model_len=args.max_model_len or config.max_position_embeddings, max_tokens=args.max_tokens,
                    max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes)
    state = ServerState(model_name=args.served_model_name or checkpoint.resolve().name,
                        api_keys=api_keys_from(args.api_key), limits=limits, tokenizer=tokenizer)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        raise DaulatError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    server = None

    def load():
        from daulat.checkpoint import load_checkpoint
        from daulat.infer.engine import Engine

        try:
            model = load_checkpoint(checkpoint, device=args.device, dtype=dtype, need_tokenizer=True).model
            engine = Engine(model, tokenizer, max_num_seqs=limits.max_num_seqs, max_model_len=limits.max_model_len,
                            seed=args.seed)
            engine.start()
            state.engine = engine
            where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
            print(f"daulat serve: {state.model_name} ready at {where} (OpenAI API under /v1, web chat at /)"
                  + (", API key required" if state.api_keys else ""), flush=True)
        except Exception as e:  # a bad checkpoint: say so in one line and stop the server
            state.load_error = f"{e}"
            print(f"daulat serve: error: {e}", file=sys.stderr, flush=True)
            if server is not None:
                server.should_exit = True

    app = create_app(state, loader=load)
    config_ = uvicorn.Config(app, log_level="warning", access_log=args.access_log, timeout_graceful_shutdown=5,
                             timeout_keep_alive=30)
    server = uvicorn.Server(config_)
    print(f"daulat serve: loading {checkpoint} ...", flush=True)
    server.run(sockets=[sock])
    return 2 if state.load_error else 0
