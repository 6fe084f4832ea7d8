"""The engine: greedy equality with the plain forward and transformers, continuous batching, seeds,
shared prefill for n > 1, stop strings and ids, log-probs, streaming, limits and cancellation."""

import asyncio
import threading
import time

import pytest
import torch
from conftest import require
from infer_fixtures import checkpoint  # noqa: F401  (a pytest fixture)

from daulat.checkpoint import load_model
from daulat.infer import Engine, InvalidParameter, SamplingParams
from daulat.infer.engine.sequence import IncrementalDecoder
from daulat.tokenizer import load_tokenizer

PROMPTS = ["The quick brown fox", "Add 12 and 30.", "Once upon a time, in a land far away, there lived", "x"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A micro model is all per-op overhead: one intra-op thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture
def engine(model, tokenizer):
    engine = Engine(model, tokenizer, max_num_seqs=16, seed=0)
    yield engine
    engine.stop()


def greedy_plain_forward(model, ids: list[int], max_new: int, eos: int) -> list[int]:
    """Reference decoding: the whole sequence recomputed by the plain forward at every step."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
            out.append(token)
            if token == eos:
                break
    return out


def test_greedy_equals_plain_forward_and_transformers(checkpoint, model, tokenizer):
    transformers = require("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    engine = Engine(model, tokenizer)
    results = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    for result in results:
        prompt = result.prompt_token_ids
        assert result.token_ids == greedy_plain_forward(model, prompt, 24, engine.eos_token_id)
        with torch.no_grad():
            hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        assert result.token_ids == hf_ids
        assert result.finish_reason == ("stop" if result.token_ids[-1] == engine.eos_token_id else "length")


CONFIGS = {
    "q_lora+groups": dict(q_lora_rank=24, n_group=2, topk_group=1),
    "yarn+bias+tied": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                         "mscale": 1.0, "mscale_all_dim": 1.0},
                           attention_bias=True, tie_word_embeddings=True, n_shared_experts=0),
    "plain rope, 4 of 8 experts": dict(rope_interleave=False, num_experts_per_tok=4, first_k_dense_replace=0),
}


def _config_model(name):
    from daulat.model import DeepseekV3, ModelConfig

    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=3, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=128)
    model = DeepseekV3(ModelConfig(**{**base, **CONFIGS[name]})).eval()
    with torch.no_grad():  # give the router's correction bias something to do
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_decode_matches_one_sequence_at_a_time_and_the_plain_forward(name):
    """Decoding sequences together (joining and leaving non-adjacent slots, each at its own position)
    gives the tokens and log-probs of decoding each alone, across architecture options, and both
    equal the plain forward."""
    model = _config_model(name)
    prompts = [[0] + [(7 * i + 5 * j) % 97 for i in range(3 + 4 * j)] for j in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=6 + 5 * (j % 3), ignore_eos=True) for j in range(6)]
    batched = Engine(model, None, max_num_seqs=3).generate(prompts, params)
    alone = Engine(model, None, max_num_seqs=1)
    for prompt, sp, result in zip(prompts, params, batched):
        reference = alone.generate([prompt], sp)[0]
        assert result.token_ids == reference.token_ids
        assert result.logprobs == pytest.approx(reference.logprobs, abs=1e-4)
        assert result.token_ids == greedy_plain_forward(model, prompt, len(result.token_ids), eos=-1)


def test_decoding_honours_wrapped_and_hooked_layers():
    """Decoding calls a plain linear layer's weights directly; a layer that is not plain (an adapter,
    a quantised linear, a hook) must still be called as the module, exactly as the plain forward does."""
    model = _config_model("q_lora+groups")
    attention = model.layers[1].self_attn
    attention.o_proj.register_forward_hook(lambda module, args, out: out * 3.0)
    attention.q_b_proj = torch.nn.Sequential(attention.q_b_proj)  # a wrapper: not an nn.Linear any more
    prompt = [0, 5, 9, 17, 3]
    [result] = Engine(model, None).generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert result.token_ids == greedy_plain_forward(model, prompt, 12, eos=-1)


def test_engine_measures_its_cache_from_the_cache_object(model):
    from daulat.model import kv_cache_bytes_per_token

    engine = Engine(model, None, max_num_seqs=2, max_model_len=16)
    cache = engine.runner.cache
    held = sum(t.numel() * t.element_size() for t in cache.entries)
    assert engine.runner.cache_bytes_per_token == held // (2 * 16) == kv_cache_bytes_per_token(model.config, 4)["mla"]


def test_decoding_follows_weights_updated_between_generations(model, tokenizer):
    """GRPO trains the model between rollouts with the same engine: the new weights must be used,
    whether updated in place (an optimizer step) or replaced."""
    import copy

    trained = copy.deepcopy(model)
    engine = Engine(trained, tokenizer)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    before = engine.generate(["Once upon a time"], params)[0]
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # in place, like an optimizer step
    after = engine.generate(["Once upon a time"], params)[0]
    assert after.token_ids != before.token_ids
    assert after.token_ids == greedy_plain_forward(trained, after.prompt_token_ids, 12, eos=-1)
    head = trained.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().flip(0))  # a new parameter object
    replaced = engine.generate(["Once upon a time"], params)[0]
    assert replaced.token_ids != after.token_ids
    assert replaced.token_ids == greedy_plain_forward(trained, replaced.prompt_token_ids, 12, eos=-1)


def test_continuous_batching_gives_the_same_greedy_outputs_as_one_at_a_time(model, tokenizer):
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]  # 12 requests of different lengths
    lengths = [5 + 7 * (i % 4) for i in range(len(prompts))]  # they finish at different steps
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in lengths]
    alone = Engine(model, tokenizer, max_num_seqs=1)
    expected = [alone.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]

    # 4 slots for 12 requests, submitted from a thread while the batch runs: requests wait, join
    # between decode steps as others leave, and decode next to sequences at other positions
    engine = Engine(model, tokenizer, max_num_seqs=4).start()
    handles = []
    for prompt, sp in zip(prompts, params):
        handles.append(engine.submit(prompt, sp))
        time.sleep(0.01)
    got = [h.result(timeout=60).token_ids for h in handles]
    engine.stop()
    assert got == expected
    assert all(len(t) == m for t, m in zip(got, lengths))


def test_same_seed_same_samples_whatever_else_runs(model, tokenizer):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = Engine(model, tokenizer).generate(["Tell me a story"], params)[0].token_ids
    busy = Engine(model, tokenizer, max_num_seqs=8)
    noise = [SamplingParams(temperature=t, max_tokens=m, top_p=p) for t, m, p in [(0, 7, 1), (0.7, 30, 0.5), (1.3, 3, 1)]]
    results = busy.generate(["a", "Tell me a story", "bb ccc", "dddd"], [noise[0], params, noise[1], noise[2]])
    assert results[1].token_ids == alone
    other_seed = Engine(model, tokenizer).generate(["Tell me a story"], SamplingParams(**{**vars(params), "seed": 99}))
    assert other_seed[0].token_ids != alone


def test_n_samples_share_one_prefill(engine, monkeypatch):
    prefills = []
    original = engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda prompts, slots: prefills.append(prompts) or original(prompts, slots))
    [result] = engine.generate(["Once upon a time"], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12))
    assert len(prefills) == 1 and len(prefills[0]) == 1  # one prompt prefilled once for 4 samples
    assert [s.index for s in result.samples] == [0, 1, 2, 3]
    assert len({tuple(s.token_ids) for s in result.samples}) > 1  # independent samples
    # sample 0 of n=4 with a seed is the n=1 sample with that seed; greedy samples are all equal
    single = engine.generate(["Once upon a time"], SamplingParams(temperature=1.0, seed=7, max_tokens=12))[0]
    assert result.samples[0].token_ids == single.token_ids
    [greedy] = engine.generate(["Once upon a time"], SamplingParams(n=3, temperature=0, max_tokens=12))
    one = engine.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=12))[0]
    assert all(s.token_ids == one.token_ids for s in greedy.samples)


def test_logprobs_are_the_plain_forwards_log_softmax_at_the_sampled_tokens(model, engine):
    params = SamplingParams(temperature=0.8, top_k=40, seed=3, max_tokens=16, ignore_eos=True, logprobs=3)
    [result] = engine.generate(["Count: 1 2 3"], params)
    ids = result.prompt_token_ids + result.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    P = len(result.prompt_token_ids)
    expected = [reference[P - 1 + i, t].item() for i, t in enumerate(result.token_ids)]
    assert result.logprobs == pytest.approx(expected, abs=1e-4)
    top = result.samples[0].top_logprobs
    assert len(top) == len(result.token_ids) and all(len(t) == 3 for t in top)
    first = reference[P - 1].topk(3)
    assert list(top[0]) == first.indices.tolist()
    assert list(top[0].values()) == pytest.approx(first.values.tolist(), abs=1e-4)


def test_stop_strings_and_stop_token_ids(engine):
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    [full] = engine.generate(["Once upon a time"], base)
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    [stopped] = engine.generate(["Once upon a time"], SamplingParams(**{**vars(base), "stop": ["\u2603never", stop]}))
    assert stopped.text == text[: text.find(stop)]
    assert stopped.finish_reason == "stop" and stopped.samples[0].stop_reason == stop
    assert full.token_ids[: len(stopped.token_ids)] == stopped.token_ids  # tokens up to the stop are kept
    # the stream holds back text that could start a stop string and adds up to the same text
    deltas = list(engine.stream("Once upon a time", SamplingParams(**{**vars(base), "stop": stop})))
    assert "".join(d.text for d in deltas) == stopped.text
    assert [t for d in deltas for t in d.token_ids] == stopped.token_ids
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    # a stop token id ends the sample at its first occurrence and is kept in token_ids
    token = full.token_ids[5]
    [by_id] = engine.generate(["Once upon a time"], SamplingParams(**{**vars(base), "stop_token_ids": [token]}))
    first = full.token_ids.index(token)
    assert by_id.token_ids == full.token_ids[: first + 1]
    assert by_id.finish_reason == "stop" and by_id.samples[0].stop_reason == token


def test_token_id_prompts_need_no_tokenizer(model, engine):
    ids = engine.encode("The quick brown fox")
    bare = Engine(model, None)
    [result] = bare.generate([ids], SamplingParams(temperature=0, max_tokens=10))
    assert result.token_ids == engine.generate([ids], SamplingParams(temperature=0, max_tokens=10))[0].token_ids
    assert result.text == ""
    with pytest.raises(Exception, match="tokenizer"):
        bare.generate(["text"], SamplingParams())


def test_context_limit_and_bad_input(model, tokenizer):
    engine = Engine(model, tokenizer, max_model_len=12)
    [result] = engine.generate([[0, 5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert len(result.token_ids) == 12 - 5 and result.finish_reason == "length"
    with pytest.raises(InvalidParameter, match="context limit"):
        engine.generate([list(range(3, 15))], SamplingParams())
    with pytest.raises(InvalidParameter, match="outside the vocabulary"):
        engine.generate([[0, 10**6]], SamplingParams())
    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_k=-3), dict(max_tokens=0), dict(n=0), dict(stop=[""])]:
        with pytest.raises(InvalidParameter) as info:
            SamplingParams(**bad)
        assert info.value.param == next(iter(bad))
    with pytest.raises(InvalidParameter, match="slots"):
        Engine(model, tokenizer, max_num_seqs=2).generate(["a"], SamplingParams(n=3))


def test_incremental_decoding_releases_only_whole_characters(tokenizer):
    text = "emoji 😀👍🏽 中文 देवनागरी ok"
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    pieces = [decoder.push(t) for t in tokenizer.encode(text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_background_thread_streams_to_threads_and_asyncio_and_can_abort(engine):
    engine.start()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = engine.generate(["Hello"], params)[0]

    async def consume():
        ticks = 0

        async def ticker():  # the event loop keeps running while the engine works
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        handles = [engine.submit("Hello", params, asynchronous=True) for _ in range(3)]
        outs = await asyncio.gather(*[_collect(h) for h in handles])
        tick_task.cancel()
        return outs, ticks

    outs, ticks = asyncio.run(consume())
    assert all(ids == expected.token_ids and text == expected.text for ids, text in outs)
    assert ticks > 3

    # a blocking consumer in another thread, and an abort
    handle = engine.submit("Hello", SamplingParams(max_tokens=10_000, ignore_eos=True))
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(handle))
    reader.start()
    time.sleep(0.2)
    handle.abort()
    reader.join(timeout=30)
    assert not reader.is_alive() and seen[-1].finish_reason == "abort"
    assert handle.result(timeout=5).finish_reason == "abort"


async def _collect(handle):
    ids, text = [], ""
    async for delta in handle:
        ids += delta.token_ids
        text += delta.text
    return ids, text


def test_daulat_chat_one_shot_and_interactive(checkpoint, capsys, monkeypatch):
    from daulat import cli

    assert cli.main(["chat", str(checkpoint), "-p", "Hello", "--temperature", "0", "--max-tokens", "8"]) == 0
    one_shot = capsys.readouterr().out
    assert one_shot.endswith("\n") and len(one_shot) > 1

    typed = iter(["Hello", "/clear", "/nonsense", "Hello", "/quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    assert cli.main(["chat", str(checkpoint), "--temperature", "0", "--max-tokens", "8"]) == 0
    out = capsys.readouterr()
    # after /clear the same message gets the same greedy reply as the one-shot
    assert out.out.count(one_shot) == 2
    assert "new conversation" in out.err and "unknown command /nonsense" in out.err
    assert next(typed) == "never read"
