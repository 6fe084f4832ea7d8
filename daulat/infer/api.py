"""The OpenAI API's shapes for `daulat serve`: limits and errors, request fields checked one by one
(each bad value a 400 naming its field, as OpenAI's `param`), and the log-probs of completions and
chat in OpenAI's format, including `echo`'s log-probs of the prompt's own tokens."""

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field


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
    hosts: object | None = None  # a guard.HostCheck: without an API key, the Host names answered (None: any)
    parse_special_tokens: bool = False  # raw /v1/completions prompts: "<|eos|>" is the eos id, not plain text
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(error: APIError):
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# ------------------------------------------------------------------------------------------------
# Request parsing
# ------------------------------------------------------------------------------------------------


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def bad_value(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if not (is_int(value) if integer else is_number(value)) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise bad_value(name, f"'{name}' must be {kind} between {low} and {high}, got {json.dumps(value)}")
    return value


def flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_value(name, f"'{name}' must be true or false, got {json.dumps(value)}")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise bad_value("stop", "'stop' must be a non-empty string or a list of at most 16 of them")
    return stop


# OpenAI fields this server does not implement, with the values that ask for nothing and so are accepted
UNSUPPORTED = {"presence_penalty": (0,), "frequency_penalty": (0,), "tools": ([],), "tool_choice": ("none",),
               "functions": ([],), "function_call": ("none",),
               "suffix": ("",), "audio": (), "modalities": (["text"],), "prediction": ()}


def reject_unsupported(body: dict) -> None:
    """A 400 naming the first field asked for that the server cannot honour, rather than ignoring it."""
    for name, harmless in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in harmless:
            only = f" (only {json.dumps(harmless[0])})" if harmless else ""
            raise bad_value(name, f"'{name}' is not supported{only}")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_value("response_format",
                        "'response_format' is not supported: only {\"type\": \"text\"} (no JSON mode)")
    best_of = body.get("best_of")
    if best_of is not None and (best_of != 1 or body.get("n", 1) not in (None, 1)):
        raise bad_value("best_of", "'best_of' is not supported (only 1, with n = 1); ask for n samples instead")


def parse_logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (JSON keys are strings)."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad_value("logit_bias",
                        "'logit_bias' must be an object mapping token ids to numbers between -100 and 100")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise bad_value("logit_bias", f"'logit_bias' key {json.dumps(key)} is not a token id (0..{vocab_size - 1})")
        if not is_number(value) or not -100 <= value <= 100:
            raise bad_value("logit_bias", f"'logit_bias' for token {key} must be a number between -100 and 100, "
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
            max_tokens = number(body, name, None, 1, limits.max_tokens, integer=True)
            if prompt_len + max_tokens > engine.max_model_len:
                raise APIError(400, f"the prompt has {prompt_len} tokens and '{name}' asks for {max_tokens} more, "
                                    f"beyond this model's context limit of {engine.max_model_len} tokens",
                               param=name, code="context_length_exceeded")
            break
    if max_tokens is None:
        default = limits.max_tokens if chat else limits.default_max_tokens_completions
        max_tokens = max(1, min(default, room))
    return dict(
        n=number(body, "n", 1, 1, engine.max_num_seqs, integer=True),
        temperature=number(body, "temperature", 1.0, 0, 2),
        top_p=number(body, "top_p", 1.0, 0, 1),
        top_k=number(body, "top_k", 0, -1, 1 << 30, integer=True),
        max_tokens=max_tokens,
        stop=_stop(body),
        seed=number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        ignore_eos=flag(body, "ignore_eos"),
        logit_bias=parse_logit_bias(body, engine.vocab_size),
    )


def check_sequences(prompts: int, n: int, limits: Limits) -> int:
    """The sequences (prompts x n) a request asks for, within the per-request limit."""
    sequences = prompts * n
    if sequences > limits.max_seqs_per_request:
        raise bad_value("n", f"{prompts} prompt(s) x n={n} = {sequences} sequences; this server allows at most "
                             f"{limits.max_seqs_per_request} per request")
    return sequences


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_value("messages", "'messages' must be a non-empty list of {role, content}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_value(f"messages[{i}]", f"messages[{i}] must be an object with 'role' and 'content'")
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise bad_value(f"messages[{i}].role", f"messages[{i}].role must be system, developer, user or "
                                                   f"assistant, got {json.dumps(message.get('role'))}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad_value(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        for name in ("tool_calls", "function_call", "tool_call_id", "audio"):
            if message.get(name):
                raise bad_value(f"messages[{i}].{name}",
                                f"messages[{i}].{name}: tool and function calls are not supported")
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad_value(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


def parse_prompts(body: dict, state: ServerState) -> list[list[int]]:
    """/v1/completions' `prompt`: a string, a list of strings, a list of ids, or a list of lists of ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(is_int(t) for t in p)) for p in prompt):
        prompts = prompt
    else:
        raise bad_value("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists")
    if len(prompts) > state.limits.max_seqs_per_request:
        raise bad_value("prompt", f"at most {state.limits.max_seqs_per_request} prompts per request")
    engine, out = state.engine, []
    for p in prompts:
        if isinstance(p, str):
            ids = engine.encode(p, allow_special=state.parse_special_tokens) if p else None
        else:
            ids = list(p)
        if not ids:
            raise bad_value("prompt", "a prompt is empty")
        bad = [t for t in ids if not 0 <= t < engine.vocab_size]
        if bad:
            raise bad_value("prompt", f"token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})")
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
    n = number(body, "n", 1, 1, engine.max_num_seqs, integer=True)
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


def admit(state: ServerState, sequences: int) -> int:
    """429 when the sequences in flight and these would pass the batch plus the queue (a request alone
    is always admitted, whatever its size within the per-request limit)."""
    limits = state.limits
    if state.in_flight and state.in_flight + sequences > limits.max_num_seqs + limits.max_queue:
        raise APIError(429, f"the server is full ({state.in_flight} sequences in flight, {sequences} more asked "
                            f"for); retry later", type="rate_limit_error", code="too_many_requests")
    return sequences
