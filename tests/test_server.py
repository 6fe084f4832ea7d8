"""`daulat serve` with the official `openai` client: chat and completions, streaming or not, n, stop,
length, logprobs, seeds, keys and errors in OpenAI's shape, and a bounded load test on loopback."""

import asyncio
import json
import time

import httpx
import pytest
import torch
from conftest import require
from infer_fixtures import API_KEY, checkpoint, server  # noqa: F401  (pytest fixtures)

openai = require("openai")

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(checkpoint):
    """The same checkpoint in this process, to check what the server answers."""
    from daulat.infer import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.from_checkpoint(checkpoint)
    torch.set_num_threads(threads)


def greedy(engine, prompt, max_tokens, **kw):
    from daulat.infer import SamplingParams

    return engine.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, **kw))[0]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["micro"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"


def test_chat_non_streaming_and_streaming_agree_with_the_engine(client, engine):
    prompt = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    expected = greedy(engine, prompt, 12)
    reply = client.chat.completions.create(model="micro", messages=MESSAGES, temperature=0, max_tokens=12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == len(prompt) + len(expected.token_ids)

    chunks = list(client.chat.completions.create(model="micro", messages=MESSAGES, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == expected.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_completions_non_streaming_and_streaming(client, engine):
    expected = greedy(engine, "Once upon a time", 10, ignore_eos=True)
    reply = client.completions.create(model="micro", prompt="Once upon a time", temperature=0, max_tokens=10,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected.text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 10
    chunks = list(client.completions.create(model="micro", prompt="Once upon a time", temperature=0, max_tokens=10,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # token-id prompts, several at once, each with n samples
    ids = engine.encode("Once upon a time")
    many = client.completions.create(model="micro", prompt=[ids, "x"], temperature=0, max_tokens=10, n=2,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == expected.text


def test_n_samples_seeds_and_logprobs(client):
    kwargs = dict(model="micro", messages=MESSAGES, temperature=1.0, max_tokens=16, seed=42, n=2,
                  extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert first.choices[0].message.content != first.choices[1].message.content
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    probed = client.chat.completions.create(model="micro", messages=MESSAGES, temperature=0, max_tokens=5,
                                            logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = probed.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)  # greedy = top-1
    streamed = list(client.chat.completions.create(model="micro", messages=MESSAGES, temperature=1.0, max_tokens=16,
                                                   seed=42, n=2, stream=True, extra_body={"ignore_eos": True}))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
        assert text == first.choices[i].message.content


def test_stop_and_length(client, engine):
    full = client.completions.create(model="micro", prompt="The quick brown fox", temperature=0, max_tokens=30,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = client.completions.create(model="micro", prompt="The quick brown fox", temperature=0, max_tokens=30,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    short = client.chat.completions.create(model="micro", messages=MESSAGES, max_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    capped = client.chat.completions.create(model="micro", messages=MESSAGES, max_completion_tokens=2,
                                            extra_body={"ignore_eos": True})
    assert capped.usage.completion_tokens == 2


def test_keys_and_errors_in_openais_shape(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=server.url + "/v1", api_key="other-key", max_retries=0).models.list().data
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key at all
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="micro", messages=[{"role": "user", "content": "x " * 2000}])
    assert info.value.body["code"] == "context_length_exceeded"

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    cases = [
        ("/v1/chat/completions", b'{"messages": [', 400, None),
        ("/v1/chat/completions", b'[1, 2]', 400, None),
        ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), 400, "temperature"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400,
         "messages[0].role"),
        ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 10**6}).encode(), 400, "max_tokens"),
        ("/v1/completions", json.dumps({"prompt": "a", "n": 0}).encode(), 400, "n"),
        ("/v1/completions", json.dumps({"prompt": [[1, 10**7]]}).encode(), 400, "prompt"),
        ("/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}', 413, None),
        ("/v1/nothing-here", b"{}", 404, None),
    ]
    for path, body, status, param in cases:
        response = httpx.post(server.url + path, content=body, headers=headers, timeout=30)
        assert response.status_code == status, (path, body[:60], response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param:
            assert error["param"] == param


def test_32_concurrent_streaming_clients_all_finish(server):
    """Bounded load on loopback: every stream ends with a finish_reason then [DONE], and the engine
    batched the requests together rather than one after another."""

    async def one(client: httpx.AsyncClient, i: int) -> list[str]:
        body = {"model": "micro", "messages": [{"role": "user", "content": f"Count to {i}"}], "stream": True,
                "max_tokens": 8 + i % 8, "temperature": 0.8, "seed": i, "ignore_eos": True}
        lines = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
        return lines

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=120, limits=limits) as client:
            return await asyncio.gather(*[one(client, i) for i in range(32)])

    before = httpx.get(server.url + "/health").json()["engine"]["peak_batch"]
    results = asyncio.run(main())
    for i, lines in enumerate(results):
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        tokens = sum(1 for c in chunks[1:-1])
        assert 1 <= tokens <= 8 + i % 8
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["requests_in_flight"] == 0
    assert max(before, health.json()["engine"]["peak_batch"]) >= 8  # requests shared decode steps


def test_a_client_that_goes_away_frees_its_sequence(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(100):  # bounded: the abort reaches the engine within a few steps
        if httpx.get(server.url + "/health").json()["requests_in_flight"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["requests_in_flight"] == 0


@pytest.mark.slow
def test_serve_rejects_bad_input_in_one_line(tmp_path, checkpoint):
    import subprocess
    import sys

    for args in (["serve", str(tmp_path / "missing")], ["serve", str(checkpoint), "--max-num-seqs", "0"]):
        done = subprocess.run([sys.executable, "-m", "daulat.cli", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "error" in done.stderr


def test_health_is_503_while_loading_and_429_when_full(checkpoint):
    """In-process app: no engine yet -> 503; a full server -> 429."""
    from daulat.infer.server import Limits, ServerState, create_app
    from daulat.tokenizer import load_tokenizer

    state = ServerState(model_name="micro", limits=Limits(max_num_seqs=2, max_queue=1),
                        tokenizer=load_tokenizer(checkpoint))
    app = create_app(state)

    async def ask():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            loading = (await c.get("/health")).status_code, (await c.post("/v1/completions", json={"prompt": "a"}))
            from daulat.infer import Engine

            state.engine = Engine.from_checkpoint(checkpoint, max_num_seqs=2)
            state.in_flight = 3
            full = await c.post("/v1/completions", json={"prompt": "a"})
            state.in_flight = 0
            ok = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            page = await c.get("/")
            return loading, full, ok, page

    (health, loading), full, ok, page = asyncio.run(ask())
    assert health == 503 and loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
    assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
    assert page.status_code == 200 and "TextDecoder" in page.text
