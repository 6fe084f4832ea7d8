"""`daulat serve CKPT`: an OpenAI-compatible HTTP server over the engine, with a web chat page.

    daulat serve runs/sft                       # http://127.0.0.1:8000 (this machine only)
    daulat serve runs/sft --api-key KEY1 KEY2   # or DAULAT_API_KEY=KEY1,KEY2

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming SSE or not), GET /v1/models,
GET /health (public; 503 while the weights load), and the web chat page at /. The official
`openai` client works unchanged (base_url="http://127.0.0.1:8000/v1").

Every prompt of a request becomes an engine request (one scheduling group per API request, so that
requests share the batch fairly); the engine steps all of them together on its own thread
(continuous batching) and hands deltas to the event loop, which never waits on the model. A client
that goes away, streaming or not, has its requests aborted. Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}. What the server guarantees is in the README
("Serving: what the server guarantees").
"""

import asyncio
import hmac
import ipaddress
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
    max_queue: int = 256  # sequences waiting for a slot before new requests get 429
    max_seqs_per_request: int = 256  # prompts x n of one request
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
    in_flight: int = 0  # sequences (prompts x n) of the requests being answered
    requests: int = 0  # requests being answered
    hosts: "HostCheck | None" = None  # without an API key, the Host names accepted (None: any)
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


# OpenAI fields this server does not implement, with the values that ask for nothing and so are accepted
UNSUPPORTED = {"presence_penalty": (0,), "frequency_penalty": (0,), "tools": ([],), "tool_choice": ("none",),
               "functions": ([],), "function_call": ("none",),
               "suffix": ("",), "audio": (), "modalities": (["text"],), "prediction": ()}


def reject_unsupported(body: dict) -> None:
    """A 400 naming the first field asked for that the server cannot honour, rather than ignoring it."""
    for name, harmless in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in harmless:
            raise _bad(name, f"'{name}' is not supported" + (f" (only {json.dumps(harmless[0])})" if harmless else ""))
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format", "'response_format' is not supported: only {\"type\": \"text\"} (no JSON mode)")
    best_of = body.get("best_of")
    if best_of is not None and (best_of != 1 or body.get("n", 1) not in (None, 1)):
        raise _bad("best_of", "'best_of' is not supported (only 1, with n = 1); ask for n samples instead")


def parse_logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (JSON keys are strings)."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _bad("logit_bias", "'logit_bias' must be an object mapping token ids to numbers between -100 and 100")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise _bad("logit_bias", f"'logit_bias' key {json.dumps(key)} is not a token id (0..{vocab_size - 1})")
        if not _is_number(value) or not -100 <= value <= 100:
            raise _bad("logit_bias", f"'logit_bias' for token {key} must be a number between -100 and 100, "
                                     f"got {json.dumps(value)}")
        out[int(key)] = float(value)
    return out or None


def parse_common(body: dict, state: ServerState, prompt_len: int, chat: bool) -> dict:
    """The sampling fields shared by both endpoints, checked and limited; keyword args for SamplingParams."""
    limits, engine = state.limits, state.engine
    reject_unsupported(body)
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
        logit_bias=parse_logit_bias(body, engine.vocab_size),
    )


def check_sequences(prompts: int, n: int, limits: Limits) -> int:
    """The sequences (prompts x n) a request asks for, within the per-request limit."""
    sequences = prompts * n
    if sequences > limits.max_seqs_per_request:
        raise _bad("n", f"{prompts} prompt(s) x n={n} = {sequences} sequences; this server allows at most "
                        f"{limits.max_seqs_per_request} per request")
    return sequences


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
        for name in ("tool_calls", "function_call", "tool_call_id", "audio"):
            if message.get(name):
                raise _bad(f"messages[{i}].{name}", f"messages[{i}].{name}: tool and function calls are not supported")
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
    if len(prompts) > state.limits.max_seqs_per_request:
        raise _bad("prompt", f"at most {state.limits.max_seqs_per_request} prompts per request")
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

    def is_special(self, token_id: int) -> bool:
        piece = self.tokenizer.id_to_token(token_id) or ""
        return piece.startswith("<|") and piece.endswith("|>")

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            piece = self.tokenizer.id_to_token(token_id) or ""
            if self.is_special(token_id) or not all(c in self.decoder for c in piece):
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


def completion_logprobs(delta_or_sample, token_text: TokenText, offset: int, echo: "Echo | None" = None) -> dict:
    """/v1/completions' logprobs of generated tokens, after the prompt's own when echoed."""
    if echo is not None and echo.logprobs is not None:
        generated = completion_logprobs(delta_or_sample, token_text, offset + len(echo.text))
        top = None
        if echo.logprobs["top_logprobs"] is not None:
            top = echo.logprobs["top_logprobs"] + (generated["top_logprobs"] or [{}] * len(generated["tokens"]))
        return {key: echo.logprobs[key] + generated[key] for key in ("tokens", "token_logprobs", "text_offset")} | {
            "top_logprobs": top}
    tokens, offsets = [], []
    for token in delta_or_sample.token_ids:
        text = token_text(token)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = delta_or_sample.top_logprobs
    return {"tokens": tokens, "token_logprobs": list(delta_or_sample.logprobs),
            "top_logprobs": [_top_by_text(alts, token_text) for alts in top] if top else None,
            "text_offset": offsets}


def _top_by_text(alternatives: dict[int, float], token_text: TokenText) -> dict[str, float]:
    """Completions' top_logprobs {token text: logprob}, most likely first; where two tokens have the
    same text (two halves of different characters both show as U+FFFD) the likelier one is kept."""
    out: dict[str, float] = {}
    for token, logprob in sorted(alternatives.items(), key=lambda kv: -kv[1]):
        out.setdefault(token_text(token)[0], logprob)
    return out


@dataclass
class Echo:
    """A /v1/completions prompt echoed back: its text and, when `logprobs` was asked, the log-probs of
    its own tokens in completions' shape (None for the first token, which has no context)."""

    text: str
    tokens: int
    logprobs: dict | None


async def echo_prompt(state: ServerState, prompt_token_ids: list[int], logprobs: int | None) -> Echo:
    """The prompt's text (special tokens such as an added <|bos|> left out) and, when asked, its
    tokens' log-probs and `logprobs` most likely alternatives, from one forward on a worker thread."""
    engine, token_text = state.engine, TokenText(state.tokenizer)
    text = state.tokenizer.decode(prompt_token_ids, skip_special_tokens=True)
    if logprobs is None:
        return Echo(text, len(prompt_token_ids), None)
    scored = await asyncio.to_thread(engine.prompt_logprobs, prompt_token_ids, logprobs)
    tokens, offsets, offset = [], [], 0
    for token in prompt_token_ids:
        piece, _ = token_text(token)
        tokens.append(piece)
        offsets.append(offset)
        offset += 0 if token_text.is_special(token) else len(piece)  # special tokens are not in `text`
    top = None
    if scored.top_logprobs is not None:
        top = [None if alts is None else _top_by_text(alts, token_text) for alts in scored.top_logprobs]
    return Echo(text, len(prompt_token_ids),
                {"tokens": tokens, "token_logprobs": scored.logprobs, "top_logprobs": top, "text_offset": offsets})


async def echo_only(state: ServerState, body: dict, prompts: list[list[int]], logprobs: int | None) -> dict:
    """`echo` with `max_tokens: 0`: each prompt back n times with its log-probs, nothing generated."""
    engine = state.engine
    reject_unsupported(body)
    n = _number(body, "n", 1, 1, engine.max_num_seqs, integer=True)
    sequences = admit(state, check_sequences(len(prompts), n, state.limits))
    if max(len(p) for p in prompts) > engine.max_model_len:
        raise APIError(400, f"a prompt is longer than this model's context limit of {engine.max_model_len} tokens",
                       param="prompt", code="context_length_exceeded")
    state.in_flight += sequences
    try:
        echoes = [await echo_prompt(state, p, logprobs) for p in prompts]
    finally:
        state.in_flight -= sequences
    choices = [{"index": i * n + j, "text": echo.text, "logprobs": echo.logprobs, "finish_reason": "length"}
               for i, echo in enumerate(echoes) for j in range(n)]
    prompt_tokens = sum(echo.tokens for echo in echoes)
    return {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCheck:
    """The `Host` headers a keyless server answers, against DNS rebinding (as Jupyter checks them).

    A web page from another site can make the browser send requests to 127.0.0.1, but they carry
    its own host name in `Host` (after the attacker's DNS points that name here). Accepted: localhost
    names and IP literals that are loopback or the bound address (any IP literal when bound to every
    interface: a literal cannot be rebound), with the bound port or none, and the names in `names`.
    """

    bound_host: str
    port: int
    names: frozenset[str] = frozenset()

    def allows(self, header: bytes | None) -> bool:
        host = (header or b"").decode("latin-1").strip().lower()
        if host.startswith("["):  # [v6]:port
            name, _, rest = host[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else None
        else:
            name, _, port = host.partition(":") if host.count(":") == 1 else (host, "", "")
            port = port or None
        name = name.rstrip(".")
        if name in self.names:
            return True
        if port is not None and port != str(self.port):
            return False
        if name in ("localhost", self.bound_host.lower()) or name.endswith(".localhost"):
            return True
        address, bound = _ip(name), _ip(self.bound_host)
        if address is None:
            return False
        return address.is_loopback or address == bound or (bound is not None and bound.is_unspecified)


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


class Guard:
    """ASGI middleware: the Host check of a keyless server; for /v1/*, the API key (constant-time
    compare), JSON bodies only (a cross-site form or `text/plain` POST is refused) and the size limit."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            error = self._check_host(headers.get(b"host"))
            if error is None and scope["path"].startswith("/v1/"):
                error = (self._check_key(headers.get(b"authorization"))
                         or self._check_type(scope["method"], headers.get(b"content-type"))
                         or self._check_size(headers.get(b"content-length")))
            if error is not None:
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check_host(self, header: bytes | None) -> APIError | None:
        hosts = self.state.hosts
        if self.state.api_keys or hosts is None or hosts.allows(header):
            return None
        return APIError(403, f"this server does not answer for the host {(header or b'').decode('latin-1')!r}: "
                             "use localhost or its address, set an API key, or name the host with --allowed-host",
                        type="permission_error", code="host_not_allowed")

    @staticmethod
    def _check_type(method: str, header: bytes | None) -> APIError | None:
        if method != "POST":
            return None
        media_type = (header or b"").split(b";")[0].strip().lower()
        if media_type != b"application/json":
            return APIError(415, "the request body must be JSON, sent with 'Content-Type: application/json'",
                            code="unsupported_media_type")
        return None

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
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    check_json_text(body)
    return body


MAX_DEPTH = 64  # nesting levels a request body may have (a chat request needs 5)


def check_json_text(body) -> None:
    """Refuse what JSON allows but the server cannot use: strings with lone surrogates (`"\\ud800"` is
    valid JSON but not Unicode, and cannot be tokenized) and nesting beyond MAX_DEPTH. Iterative,
    so no body can exhaust the stack."""
    stack = [("", body, 0)]
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad(path or None, f"{path or 'a key'} contains a lone UTF-16 surrogate, which is not "
                                         "valid Unicode text") from None
        elif isinstance(value, dict):
            keys = {k: k.encode("utf-8", "backslashreplace").decode("utf-8") for k in value}  # printable paths
            stack += [(f"{path}.{keys[k]}" if path else keys[k], v, depth + 1) for k, v in value.items()]
            stack += [(path or "a key", k, depth + 1) for k in value]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value)]


def create_app(state: ServerState, loader=None):
    """The FastAPI app. `loader()` (optional) loads the engine on a thread at start-up; /health
    answers 503 until it has."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    @asynccontextmanager
    async def lifespan(app):
        if loader is not None:
            threading.Thread(target=loader, name="daulat-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="daulat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, state=state)
    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        body, status = health_report(state)
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(state, {"model": model_id})
        return model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat_completion(state, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(state, request)

    return app


def _add_error_handlers(app) -> None:
    """Every error in OpenAI's shape: ours, bad values, bad input, unknown routes, and bugs (500)."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

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


def ready(state: ServerState):
    """The engine, or a 503 saying that the model is loading or failed to load."""
    if state.engine is None and state.load_error is not None:
        raise APIError(503, f"the model failed to load: {state.load_error}", type="service_unavailable",
                       code="model_load_failed")
    if state.engine is None:
        raise APIError(503, "the model is still loading", type="service_unavailable", code="model_loading")
    return state.engine


def check_model(state: ServerState, body: dict) -> None:
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       type="not_found_error", param="model", code="model_not_found")


def model_card(state: ServerState) -> dict:
    engine = state.engine
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "daulat",
            "max_model_len": engine.max_model_len if engine else None}


def health_report(state: ServerState) -> tuple[dict, int]:
    """/health's body and status: 200 once serving (with the load: requests and sequences in flight,
    the engine's counters and its unfinished sequences), else 503 "loading" or "failed" with why."""
    if state.engine is None:
        if state.load_error is not None:
            return {"status": "failed", "model": state.model_name, "error": state.load_error}, 503
        return {"status": "loading", "model": state.model_name}, 503
    engine = state.engine
    return {"status": "ok", "model": state.model_name, "requests_in_flight": state.requests,
            "sequences_in_flight": state.in_flight, "engine": dict(engine.stats),
            "engine_unfinished_sequences": engine.num_unfinished_sequences}, 200


async def chat_completion(state: ServerState, request):
    ready(state)
    body = await read_json(request, state)
    check_model(state, body)
    messages = parse_messages(body)
    prompt = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    kwargs = parse_common(body, state, len(prompt), chat=True)
    want_logprobs = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", 0, 0, 20, integer=True)
    if top and not want_logprobs:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return await respond(state, request, body, [prompt], kwargs, top, want_logprobs, chat=True)


async def completion(state: ServerState, request):
    from fastapi.responses import JSONResponse

    ready(state)
    body = await read_json(request, state)
    check_model(state, body)
    prompts = parse_prompts(body, state)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 20):
        raise _bad("logprobs", "'logprobs' must be an integer between 0 and 20 (the number of most likely tokens)")
    echo = _flag(body, "echo")
    if echo and _flag(body, "stream"):
        raise _bad("echo", "'echo' is supported without 'stream' only")
    if echo and body.get("max_tokens") == 0:  # only the prompt's log-probs (lm-evaluation-harness)
        return JSONResponse(await echo_only(state, body, prompts, logprobs))
    kwargs = parse_common(body, state, max(len(p) for p in prompts), chat=False)
    echoes = [await echo_prompt(state, p, logprobs) for p in prompts] if echo else None
    return await respond(state, request, body, prompts, kwargs, logprobs or 0, logprobs is not None, chat=False,
                         echoes=echoes)


async def respond(state: ServerState, request, body, prompts, kwargs, top, want_logprobs, chat, echoes=None):
    """Submit the request's prompts to the engine (one group) and answer: SSE chunks or one JSON."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from daulat.infer.engine import InvalidParameter, SamplingParams

    engine = state.engine
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    include_usage = stream and _flag(options, "include_usage")
    sequences = admit(state, check_sequences(len(prompts), kwargs["n"], state.limits))
    handles = []
    try:
        params = SamplingParams(**kwargs, logprobs=top)
        group = engine.new_group()  # this request's prompts share the batch with other requests as one
        for prompt in prompts:
            handles.append(engine.submit(prompt, params, asynchronous=True, group=group))
    except InvalidParameter as e:
        for handle in handles:  # a later prompt was refused: the earlier ones must not run for nobody
            handle.abort()
        raise _bad(e.param, str(e)) from None
    state.in_flight += sequences
    state.requests += 1
    reply = Reply(state, handles, params.n, chat, want_logprobs, include_usage, echoes)
    if stream:
        return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        whole = await unless_disconnected(request, reply.whole())
        return JSONResponse(whole) if whole is not None else Response(status_code=499)
    finally:
        reply.close()


def admit(state: ServerState, sequences: int) -> int:
    """429 when the sequences in flight and these would pass the batch plus the queue (a request alone
    is always admitted, whatever its size within the per-request limit)."""
    limits = state.limits
    if state.in_flight and state.in_flight + sequences > limits.max_num_seqs + limits.max_queue:
        raise APIError(429, f"the server is full ({state.in_flight} sequences in flight, {sequences} more asked "
                            f"for); retry later", type="rate_limit_error", code="too_many_requests")
    return sequences


async def unless_disconnected(request, work):
    """Await `work`, or return None as soon as the client closes the connection (the caller then
    aborts the engine requests: nobody is left to read them, as vLLM does)."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        return None
    finally:
        watch.cancel()


class Reply:
    """The answer to one API request: its engine handles turned into OpenAI JSON or SSE chunks.

    echoes: with /v1/completions' `echo`, per prompt its text and the log-probs of its own tokens.
    """

    def __init__(self, state: ServerState, handles, n: int, chat: bool, want_logprobs: bool, include_usage: bool,
                 echoes: list["Echo"] | None = None):
        self.state, self.handles, self.n, self.chat = state, handles, n, chat
        self.want_logprobs, self.include_usage = want_logprobs, include_usage
        self.echoes = echoes
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.token_text = TokenText(state.tokenizer)
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.state.in_flight -= len(self.handles) * self.n
            self.state.requests -= 1
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
                    echo = self.echoes[i] if self.echoes else None
                    choice["text"] = (echo.text if echo else "") + sample.text
                    if self.want_logprobs:
                        choice["logprobs"] = completion_logprobs(sample, self.token_text, 0, echo)
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
                   help="sequences that may wait for a free slot; beyond that, 429 (default: %(default)s)")
    p.add_argument("--max-seqs-per-request", type=int, default=256,
                   help="most sequences (prompts x n) one request may ask for, else 400 (default: %(default)s)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="without an API key, also answer requests whose Host header names NAME (by default only "
                        "localhost names and the bound address are answered, against DNS rebinding)")
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
    check_arguments(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    limits = Limits(max_model_len=args.max_model_len or config.max_position_embeddings, max_tokens=args.max_tokens,
                    max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                    max_seqs_per_request=args.max_seqs_per_request)
    hosts = HostCheck(args.host, args.port, frozenset(h.lower().rstrip(".") for h in args.allowed_host))
    state = ServerState(model_name=args.served_model_name or checkpoint.resolve().name,
                        api_keys=api_keys_from(args.api_key), limits=limits, tokenizer=tokenizer, hosts=hosts)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        raise DaulatError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    server = None

    def build():
        from daulat.checkpoint import load_model
        from daulat.infer.engine import Engine

        model = load_model(checkpoint, device=args.device, dtype=dtype)
        return Engine(model, tokenizer, max_num_seqs=limits.max_num_seqs, max_model_len=limits.max_model_len,
                      seed=args.seed)

    def load():
        if load_engine(state, build):
            where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
            print(f"daulat serve: {state.model_name} ready at {where} (OpenAI API under /v1, web chat at /)"
                  + (", API key required" if state.api_keys else ""), flush=True)
        elif server is not None:  # say why in one line (done by load_engine) and stop the server
            server.should_exit = True

    app = create_app(state, loader=load)
    config_ = uvicorn.Config(app, log_level="warning", access_log=args.access_log, timeout_graceful_shutdown=5,
                             timeout_keep_alive=30)
    server = uvicorn.Server(config_)
    print(f"daulat serve: loading {checkpoint} ...", flush=True)
    server.run(sockets=[sock])
    return 2 if state.load_error is not None else 0


def check_arguments(args) -> None:
    """The limits given on the command line, each within its range (else a one-line error)."""
    for name in ("max_tokens", "max_num_seqs", "max_body_bytes", "max_seqs_per_request"):
        if getattr(args, name) < 1:
            raise DaulatError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise DaulatError("--max-queue must be at least 0")
    if args.max_model_len is not None and not 2 <= args.max_model_len:
        raise DaulatError("--max-model-len must be at least 2")
    if args.threads is not None and args.threads < 1:
        raise DaulatError("--threads must be at least 1")


def describe(error: BaseException) -> str:
    """One line for a failure: a DaulatError's own message, else the exception's type and message
    (some exceptions, such as a MemoryError, have no message at all)."""
    if isinstance(error, DaulatError):
        return str(error) or type(error).__name__
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def load_engine(state: ServerState, build) -> bool:
    """Build the engine (`build()`) and start it; on failure record why in `state.load_error` (which
    /health reports) and print it as one line. True when the engine is serving."""
    try:
        engine = build()
        engine.start()
    except Exception as e:  # a bad or too large checkpoint: /health and the exit status say so
        state.load_error = describe(e)
        print(f"daulat serve: error: {state.load_error}", file=sys.stderr, flush=True)
        return False
    state.engine = engine
    return True
