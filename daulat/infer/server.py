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
{"error": {"message", "type", "param", "code"}}. Before a body is read, guard.py checks the Host,
the key, the content type and the size; api.py parses the fields and shapes the log-probs. What the
server guarantees is in the README (under "Serving").
"""

import asyncio
import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

from daulat.errors import DaulatError
from daulat.precision import HOLD_DTYPES, HOLD_HELP, hold
from daulat.threads import set_threads, threads_argument
from daulat.infer.api import (APIError, Echo, Limits, ServerState, TokenText, admit, bad_value, chat_logprobs,
                              check_sequences, completion_logprobs, echo_only, echo_prompt, error_response, flag,
                              is_int, number, parse_common, parse_messages, parse_prompts)
from daulat.infer.guard import Guard, HostCheck, read_json

__all__ = ["Limits", "ServerState", "APIError", "HostCheck", "create_app", "load_engine", "run", "add_arguments"]

STATIC = Path(__file__).parent / "static"


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------


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
        return error_response(exc)

    @app.exception_handler(ValueError)  # the engine's InvalidParameter and the tokenizer's checks
    async def value_error(request, exc: ValueError):
        return error_response(bad_value(getattr(exc, "param", None), str(exc)))

    @app.exception_handler(DaulatError)
    async def daulat_error(request, exc: DaulatError):
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(APIError(exc.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


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
    want_logprobs = flag(body, "logprobs")
    top = number(body, "top_logprobs", 0, 0, 20, integer=True)
    if top and not want_logprobs:
        raise bad_value("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return await respond(state, request, body, [prompt], kwargs, top, want_logprobs, chat=True)


async def completion(state: ServerState, request):
    from fastapi.responses import JSONResponse

    ready(state)
    body = await read_json(request, state)
    check_model(state, body)
    prompts = parse_prompts(body, state)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not is_int(logprobs) or not 0 <= logprobs <= 20):
        raise bad_value("logprobs", "'logprobs' must be an integer between 0 and 20 (the number of most likely tokens)")
    echo = flag(body, "echo")
    if echo and flag(body, "stream"):
        raise bad_value("echo", "'echo' is supported without 'stream' only")
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
    stream = flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_value("stream_options", "'stream_options' must be an object")
    include_usage = stream and flag(options, "include_usage")
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
        raise bad_value(e.param, str(e)) from None
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
    p.add_argument("--dtype", choices=list(HOLD_DTYPES), help=HOLD_HELP)
    p.add_argument("--threads", type=threads_argument, default="auto", metavar="N|auto",
                   help="torch CPU threads (default: auto, the cores not busy; see daulat.threads)")
    p.add_argument("--seed", type=int, help="seed for requests that bring none (default: random)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="raw /v1/completions prompts parse special-token text (\"<|user|>\" becomes that token); "
                        "off by default, where it is plain text: turn on only for trusted clients")


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
    from daulat.checkpoint import load_config
    from daulat.tokenizer import load_tokenizer

    checkpoint = Path(args.checkpoint)
    config = load_config(checkpoint)  # fails fast, with one line, on a bad directory
    tokenizer = load_tokenizer(checkpoint)
    check_arguments(args)
    set_threads(args.threads)
    dtype, fp8_resident = hold(args.dtype)
    limits = Limits(max_model_len=args.max_model_len or config.max_position_embeddings, max_tokens=args.max_tokens,
                    max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                    max_seqs_per_request=args.max_seqs_per_request)
    hosts = HostCheck(args.host, args.port, frozenset(h.lower().rstrip(".") for h in args.allowed_host))
    state = ServerState(model_name=args.served_model_name or checkpoint.resolve().name,
                        api_keys=api_keys_from(args.api_key), limits=limits, tokenizer=tokenizer, hosts=hosts,
                        parse_special_tokens=args.parse_special_tokens)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        raise DaulatError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    server = None

    def build():
        from daulat.checkpoint import load_checkpoint
        from daulat.infer.engine import Engine

        model = load_checkpoint(checkpoint, device=args.device, dtype=dtype, need_tokenizer=True,
                                fp8_resident=fp8_resident).model
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
