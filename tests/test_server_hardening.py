"""`daulat serve` against hostile or careless clients, through the real HTTP API on loopback: bodies
that are valid JSON but not usable text, fields the server does not implement, cross-site requests
to a keyless server, requests too large for the batch, and a checkpoint whose loading fails."""

import json
import subprocess
import sys
import threading

import httpx
import pytest
from conftest import require
from infer_fixtures import API_KEY, checkpoint, keyless_client, keyless_server, server  # noqa: F401  (pytest fixtures)

openai = require("openai")

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def keyless(keyless_server):
    """A keyless server with a small batch: 4 slots, 4 more sequences may queue (256 per request)."""
    return keyless_server


@pytest.fixture(scope="module")
def client(keyless_client):
    return keyless_client


def post(server, path: str, content: bytes, headers=JSON, **kw) -> httpx.Response:
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30, **kw)


def assert_openai_error(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_lone_surrogates_and_deep_nesting_are_400s(keyless):
    surrogate = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    error = assert_openai_error(post(keyless, "/v1/chat/completions", surrogate), 400, "messages[0].content")
    assert "surrogate" in error["message"]
    assert_openai_error(post(keyless, "/v1/completions", b'{"prompt": "\\udfff", "max_tokens": 2}'), 400, "prompt")
    assert_openai_error(post(keyless, "/v1/completions", b'{"prompt": "a", "stop": ["\\ud83d"]}'), 400, "stop[0]")
    for depth in (100, 5000, 100_000):  # past the server's limit, and past Python's recursion limit
        body = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
        assert_openai_error(post(keyless, "/v1/chat/completions", body), 400)
    # a proper astral character (a surrogate pair in JSON) is fine
    pair = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'
    assert post(keyless, "/v1/chat/completions", pair).status_code == 200


@pytest.mark.parametrize("field, value, param", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tools"),
    ("tool_choice", "required", "tool_choice"),
    ("functions", [{"name": "f", "parameters": {}}], "functions"),
    ("function_call", "auto", "function_call"),
    ("response_format", {"type": "json_object"}, "response_format"),
    ("messages", [{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages[1].tool_calls"),
])
def test_unsupported_chat_fields_are_refused_by_name(client, field, value, param):
    body = {"model": "micro", "messages": MESSAGES, "max_tokens": 2, field: value}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    assert info.value.body["param"] == param and param.split("[")[0] in info.value.body["message"]


def test_unsupported_completion_fields_are_refused_and_harmless_values_pass(client):
    for extra, param in (({"best_of": 2}, "best_of"), ({"best_of": 3, "n": 3}, "best_of"), ({"suffix": "end"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="micro", prompt="Once", max_tokens=2, **extra)
        assert info.value.body["param"] == param
    ok = client.completions.create(model="micro", prompt="Once", max_tokens=2, best_of=1, suffix="")
    assert len(ok.choices) == 1
    ok = client.chat.completions.create(model="micro", messages=MESSAGES, max_tokens=2, response_format={"type": "text"})
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_forces_and_bans_tokens(client, checkpoint):
    from daulat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    plain = client.completions.create(model="micro", prompt="Once upon a time", temperature=0, max_tokens=6,
                                      logprobs=0, extra_body={"ignore_eos": True})
    first = plain.choices[0].logprobs.tokens[0]
    forced_id = next(i for i in range(300, 500) if tokenizer.decode([i]).isalpha())
    forced = client.completions.create(model="micro", prompt="Once upon a time", temperature=0, max_tokens=6,
                                       logit_bias={str(forced_id): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tokenizer.decode([forced_id] * 6)
    sampled = client.chat.completions.create(model="micro", messages=MESSAGES, temperature=1.0, max_tokens=5, seed=3,
                                             logit_bias={str(forced_id): 100}, extra_body={"ignore_eos": True})
    assert sampled.choices[0].message.content == tokenizer.decode([forced_id] * 5)
    same_text = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == first]  # the greedy first token
    banned = client.completions.create(model="micro", prompt="Once upon a time", temperature=0, max_tokens=6,
                                       logprobs=0, logit_bias={str(i): -100 for i in same_text},
                                       extra_body={"ignore_eos": True})
    assert same_text and banned.choices[0].logprobs.tokens[0] != first
    for bad in ({"x": 1}, {"3": 101}, {"100000": 1}, {"3": "big"}, [1, 2]):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="micro", prompt="Once", max_tokens=2, logit_bias=bad)
        assert info.value.body["param"] == "logit_bias"


def test_api_bodies_must_be_json(keyless):
    body = json.dumps({"prompt": "Once", "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = httpx.post(keyless.url + "/v1/completions", content=body, headers=headers, timeout=30)
        assert_openai_error(response, 415)
    assert post(keyless, "/v1/completions", body, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200


def test_a_keyless_server_answers_only_for_its_own_host_names(keyless, server):
    good = [f"127.0.0.1:{keyless.port}", f"localhost:{keyless.port}", "localhost", f"LOCALHOST:{keyless.port}"]
    bad = ["evil.example", f"evil.example:{keyless.port}", f"127.0.0.1.nip.io:{keyless.port}",
           f"127.0.0.1:{keyless.port + 1}", f"10.1.2.3:{keyless.port}"]
    for host in good:
        assert httpx.get(keyless.url + "/v1/models", headers={"Host": host}).status_code == 200, host
    for host in bad:
        for path in ("/v1/models", "/health", "/"):
            response = httpx.get(keyless.url + path, headers={"Host": host})
            assert_openai_error(response, 403)
        response = httpx.post(keyless.url + "/v1/completions", headers={"Host": host, **JSON},
                              content=b'{"prompt": "Once", "max_tokens": 2}')
        assert_openai_error(response, 403)
    # with an API key the key is what protects the server; any Host is answered
    keyed = httpx.get(server.url + "/v1/models", headers={"Host": "evil.example",
                                                          "Authorization": f"Bearer {API_KEY}"})
    assert keyed.status_code == 200
    assert httpx.get(keyless.url + "/").status_code == 200  # the web page, from its own address


def test_sequences_per_request_are_limited_and_counted_in_the_queue_guard(keyless, client):
    with pytest.raises(openai.BadRequestError) as info:  # 65 prompts x n=4 = 260 > 256 per request
        client.completions.create(model="micro", prompt=["a"] * 65, n=4, max_tokens=2)
    assert info.value.body["param"] == "n" and "260 sequences" in info.value.body["message"]

    # a long request of 4 prompts x n=2 = 8 sequences fills the 4 slots and the queue of 4
    body = {"model": "micro", "prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 150, "ignore_eos": True}
    done = {}
    thread = threading.Thread(target=lambda: done.update(r=httpx.post(keyless.url + "/v1/completions", json=body,
                                                                        timeout=120)))
    thread.start()
    try:
        for _ in range(200):  # bounded: until the server counts the request's 8 sequences
            if httpx.get(keyless.url + "/health").json()["sequences_in_flight"] == 8:
                break
            threading.Event().wait(0.05)
        with pytest.raises(openai.RateLimitError):  # one more sequence does not fit
            client.completions.create(model="micro", prompt="x", max_tokens=2)
    finally:
        thread.join(timeout=120)
    assert done["r"].status_code == 200 and len(done["r"].json()["choices"]) == 8
    assert httpx.get(keyless.url + "/health").json()["sequences_in_flight"] == 0


FAILING_LOAD = """
import sys
import daulat.checkpoint

def out_of_memory(*args, **kwargs):
    raise MemoryError()  # what a model too large for memory raises: no message at all

daulat.checkpoint.load_model = daulat.checkpoint.load_checkpoint = out_of_memory
from daulat.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_load_that_fails_without_a_message_exits_2_naming_it(checkpoint, tmp_path):
    from infer_fixtures import free_port

    script = tmp_path / "serve_oom.py"
    script.write_text(FAILING_LOAD)
    done = subprocess.run([sys.executable, str(script), "serve", str(checkpoint), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip() == "daulat serve: error: MemoryError", done.stderr


def test_health_reports_a_failed_load(checkpoint):
    import asyncio

    from daulat.infer.server import Limits, ServerState, create_app, load_engine
    from daulat.tokenizer import load_tokenizer

    def out_of_memory():
        raise MemoryError()

    state = ServerState(model_name="micro", limits=Limits(), tokenizer=load_tokenizer(checkpoint))
    assert load_engine(state, out_of_memory) is False

    async def ask():
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/health"), await c.post("/v1/completions", json={"prompt": "a"})

    health, completion = asyncio.run(ask())
    assert health.status_code == 503 and health.json() == {"status": "failed", "model": "micro", "error": "MemoryError"}
    assert completion.status_code == 503


def test_host_check_for_other_bindings():
    """The Host rule for addresses the loopback test server cannot bind: every interface, IPv6, a name."""
    from daulat.infer.server import HostCheck

    everywhere = HostCheck("0.0.0.0", 8000)
    assert everywhere.allows(b"192.168.1.20:8000") and everywhere.allows(b"localhost:8000")
    assert not everywhere.allows(b"evil.example:8000") and not everywhere.allows(b"192.168.1.20:9000")
    six = HostCheck("::1", 8000)
    assert six.allows(b"[::1]:8000") and six.allows(b"localhost:8000") and not six.allows(b"[::2]:8000")
    named = HostCheck("127.0.0.1", 8000, frozenset({"chat.internal"}))
    assert named.allows(b"chat.internal") and named.allows(b"chat.internal:443") and not named.allows(b"other.internal")
    assert HostCheck("myhost.lan", 8000).allows(b"myhost.lan:8000")
    assert not HostCheck("127.0.0.1", 8000).allows(None)


def test_a_stop_string_that_is_a_special_token_stops_on_that_token(client, checkpoint):
    from daulat.tokenizer import load_tokenizer

    user_id = load_tokenizer(checkpoint).token_to_id("<|user|>")  # decodes to nothing: only its id can stop
    forced = {"logit_bias": {str(user_id): 100}, "temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    running = client.completions.create(model="micro", prompt="Once upon a time", **forced)
    assert running.choices[0].finish_reason == "length" and running.usage.completion_tokens == 6
    stopped = client.completions.create(model="micro", prompt="Once upon a time", stop=["<|user|>"], **forced)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    assert stopped.choices[0].text == ""
    chat = client.chat.completions.create(model="micro", messages=MESSAGES, stop=["<|user|>"], **forced)
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens == 1


def test_raw_prompts_parse_special_tokens_only_with_the_serve_flag(checkpoint):
    """The same raw prompt through the HTTP app of a default server and of one started with
    --parse-special-tokens (in-process, so that no second server has to start)."""
    import argparse
    import asyncio

    from daulat.infer import Engine
    from daulat.infer.server import Limits, ServerState, add_arguments, create_app

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([str(checkpoint)]).parse_special_tokens is False
    assert parser.parse_args([str(checkpoint), "--parse-special-tokens"]).parse_special_tokens is True
    engine = Engine.from_checkpoint(checkpoint, max_num_seqs=2)
    text = "<|user|>What is 2 + 3?<|assistant|>"

    async def prompt_tokens(parse: bool) -> int:
        state = ServerState(model_name="micro", limits=Limits(), tokenizer=engine.tokenizer, engine=engine,
                            parse_special_tokens=parse)
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            answer = await c.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
        assert answer.status_code == 200, answer.text
        return answer.json()["usage"]["prompt_tokens"]

    plain, parsed = asyncio.run(prompt_tokens(False)), asyncio.run(prompt_tokens(True))
    as_text, as_tokens = engine.tokenizer.encode(text), engine.tokenizer.encode(text, allow_special=True)
    assert len(as_tokens) < len(as_text) and engine.tokenizer.token_to_id("<|user|>") in as_tokens
    assert plain - parsed == len(as_text) - len(as_tokens)  # the same prompt, less its special-token text
