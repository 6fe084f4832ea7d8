"""/v1/completions' `echo` with `logprobs`: the log-probs of the prompt's own tokens, as
lm-evaluation-harness's loglikelihood requests ask for them, checked against a plain forward of the
same checkpoint in this process."""

import httpx
import pytest
from conftest import require
import torch
from infer_fixtures import checkpoint, keyless_client, keyless_server  # noqa: F401  (pytest fixtures)

openai = require("openai")


@pytest.fixture(scope="module")
def served(keyless_server):
    return keyless_server


@pytest.fixture(scope="module")
def client(keyless_client):
    return keyless_client


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(model, tokenizer) in this process: the plain forward the server's log-probs must match."""
    from daulat.checkpoint import load_model
    from daulat.tokenizer import load_tokenizer

    return load_model(checkpoint), load_tokenizer(checkpoint)


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(next token | tokens so far) at every position [T, V], from model(input_ids)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def test_echo_without_generation_gives_the_prompts_log_probs(client, reference):
    model, tokenizer = reference
    prompts = [tokenizer.encode("Once upon a time there was a fox"), tokenizer.encode("The quick brown fox")]
    reply = client.completions.create(model="micro", prompt=prompts, echo=True, max_tokens=0, logprobs=3, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.prompt_tokens == sum(map(len, prompts)) and reply.usage.completion_tokens == 0
    for ids, choice in zip(prompts, reply.choices):
        expected = forward_logprobs(model, ids)
        lp = choice.logprobs
        assert choice.text == tokenizer.decode(ids)
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
        for t in range(1, len(ids)):
            assert lp.token_logprobs[t] == pytest.approx(expected[t - 1, ids[t]].item(), abs=1e-4)
            best = expected[t - 1].topk(3).values.tolist()
            assert 1 <= len(lp.top_logprobs[t]) <= 3
            assert max(lp.top_logprobs[t].values()) == pytest.approx(best[0], abs=1e-4)
        assert "".join(lp.tokens) == choice.text  # plain ASCII: each token's text, in order
        assert lp.text_offset == [len("".join(lp.tokens[:t])) for t in range(len(ids))]


def test_lm_evaluation_harness_loglikelihood_request(served, reference):
    """The request lm-evaluation-harness sends for a multiple-choice or perplexity task (echo, one
    token generated, logprobs=1) and the way it reads the answer: the continuation's summed
    log-prob and whether it is the greedy continuation."""
    model, tokenizer = reference
    context, continuation = tokenizer.encode("Once upon a time"), tokenizer.encode(" there was a fox")
    ids = context + continuation
    body = {"model": "micro", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    out = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()
    choice = out["choices"][0]
    token_logprobs = choice["logprobs"]["token_logprobs"][len(context):-1]
    top_logprobs = choice["logprobs"]["top_logprobs"][len(context):-1]
    expected = forward_logprobs(model, ids)
    wanted = [expected[t - 1, ids[t]].item() for t in range(len(context), len(ids))]
    assert sum(token_logprobs) == pytest.approx(sum(wanted), abs=1e-3)
    is_greedy = all(tok == max(top.values()) for tok, top in zip(token_logprobs, top_logprobs))
    assert is_greedy == all(expected[t - 1].argmax().item() == ids[t] for t in range(len(context), len(ids)))
    assert len(choice["logprobs"]["tokens"]) == len(ids) + 1 and out["usage"]["completion_tokens"] == 1


def test_echo_with_generation_appends_the_completion(client, reference):
    model, tokenizer = reference
    ids = tokenizer.encode("The quick brown fox")
    plain = client.completions.create(model="micro", prompt=[ids], max_tokens=4, logprobs=1, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0]
    echoed = client.completions.create(model="micro", prompt=[ids], max_tokens=4, logprobs=1, temperature=0,
                                       echo=True, extra_body={"ignore_eos": True}).choices[0]
    prompt_text = tokenizer.decode(ids)
    assert echoed.text == prompt_text + plain.text
    assert echoed.logprobs.token_logprobs[len(ids):] == plain.logprobs.token_logprobs
    assert echoed.logprobs.tokens[len(ids):] == plain.logprobs.tokens
    assert echoed.logprobs.text_offset[len(ids)] == len(prompt_text)
    # a text prompt gets <|bos|> added, which is echoed as a token but is not part of the text
    text = client.completions.create(model="micro", prompt="Once upon", max_tokens=0, echo=True, logprobs=0).choices[0]
    assert text.text == "Once upon" and text.logprobs.tokens[0] == "<|bos|>" and text.logprobs.token_logprobs[0] is None
    assert text.logprobs.text_offset[:2] == [0, 0]


def test_echo_refusals(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="micro", prompt="Once", max_tokens=2, echo=True, stream=True)
    assert info.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as info:  # max_tokens 0 only makes sense with echo
        client.completions.create(model="micro", prompt="Once", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="micro", prompt=[[1] * 600], max_tokens=0, echo=True, logprobs=1)
    assert info.value.body["code"] == "context_length_exceeded"
