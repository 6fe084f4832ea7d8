"""DeepSeek-V4 decoding: the cache (window ring, compressors' partial windows, indexer keys) gives the
same logits as the full forward, chunk by chunk, and greedy decoding picks the same tokens."""

import pytest
import torch

from daulat.model_v4 import DeepseekV4, ModelConfigV4, kv_cache_bytes_per_token_v4

MIX = ["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"]


def _model(**overrides):
    torch.manual_seed(0)
    model = DeepseekV4(ModelConfigV4(layer_types=MIX, **overrides)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # values large enough that attention, sinks and routing all matter
        for name, p in model.named_parameters():
            big = any(key in name for key in ("bias", "sinks", "base", "scale"))
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if big else 0.1))
    return model


def _run_in_chunks(model, ids, sizes):
    cache = model.make_cache(ids.shape[0], ids.shape[1], ids.device)
    out, start = [], 0
    for size in sizes:
        chunk = ids[:, start : start + size]
        positions = (start + torch.arange(chunk.shape[1])).expand(ids.shape[0], -1)
        out.append(model(chunk, positions, cache))
        start += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("sizes", [[1] * 41, [7, 1, 1, 5, 13, 1, 9, 4], [20, 21]])
def test_chunked_logits_equal_the_full_forward(sizes):
    model = _model(sliding_window=6, index_topk=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 41), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        chunked = _run_in_chunks(model, ids, sizes)
    assert (chunked - full).abs().max() <= 1e-4


def test_greedy_decode_equals_full_forward_greedy():
    model = _model(hc_mult=3, index_topk=2)
    prompt = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = prompt
        for _ in range(20):  # greedy by re-running the whole sequence
            reference = torch.cat([reference, model(reference)[:, -1:].argmax(-1)], dim=1)
        cache = model.make_cache(2, 31)
        tokens = prompt
        logits = model(prompt, torch.arange(11).expand(2, -1), cache)
        for _ in range(20):
            nxt = logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, nxt], dim=1)
            logits = model(nxt, torch.full((2, 1), tokens.shape[1] - 1), cache)
    assert torch.equal(tokens, reference)


def test_positions_that_skip_the_cache_are_refused():
    model = _model()
    cache = model.make_cache(1, 16)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 2]]), cache)
        with pytest.raises(ValueError, match="positions must be 3..3"):
            model(torch.tensor([[8]]), torch.tensor([[4]]), cache)


def test_cache_grows_by_the_formula_per_token():
    model = _model(sliding_window=6)
    config = model.config
    per_token = kv_cache_bytes_per_token_v4(config, bytes_per_number=4)  # the cache is float32
    cache = model.make_cache(2, 64)
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(ids[:, :16], torch.arange(16).expand(2, -1), cache)  # past the window and a whole HCA window
        before = cache.bytes()
        model(ids[:, 16:], (16 + torch.arange(32)).expand(2, -1), cache)
    assert cache.bytes() - before == 2 * 32 * per_token["v4"]
    assert per_token["saving"] > 0.9


def test_rows_at_their_own_positions_and_a_copied_prompt():
    """The engine's slots: two sequences of different lengths decode in one batch through `rows`, and
    a prompt prefilled once and copied to another row continues like the original."""
    model = _model(sliding_window=6, index_topk=2)
    g = torch.Generator().manual_seed(6)
    long, short = (torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in (19, 10))
    cache = model.make_cache(3, 32)
    with torch.no_grad():
        cache.rows = [2]
        model(long[:, :18], torch.arange(18)[None], cache)
        cache.rows = [0]
        model(short[:, :9], torch.arange(9)[None], cache)
        cache.copy_rows(0, [1], 9)
        cache.rows = [2, 0, 1]
        step = model(torch.cat([long[:, 18:], short[:, 9:], short[:, 9:]]), torch.tensor([[18], [9], [9]]), cache)
        expected_long, expected_short = model(long)[:, -1], model(short)[:, -1]
    assert (step[0, -1] - expected_long[0]).abs().max() <= 1e-4
    assert (step[1, -1] - expected_short[0]).abs().max() <= 1e-4
    assert torch.equal(step[1], step[2])
    with pytest.raises(ValueError, match="cannot copy its first 5"):
        cache.copy_rows(0, [1], 5)


def test_the_engine_serves_prompts_of_different_lengths_as_if_each_were_alone():
    """Prompts of several lengths in one batch (and n > 1 samples sharing a prefill): a V4 cache
    cannot take padding, so each answer must equal greedy decoding of its prompt on its own."""
    from daulat.infer import Engine, SamplingParams

    def cut(tokens):  # up to the end-of-sequence token, where the engine stops
        eos = model.config.eos_token_id
        return tokens[: tokens.index(eos)] if eos in tokens else tokens

    model = _model(index_topk=2)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 12, 9, 12)]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(6):
                ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
            expected.append(cut(ids[0, len(prompt):].tolist()))
    engine = Engine(model, None, max_num_seqs=8, max_model_len=32)
    results = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=6))
    assert [[cut(s.token_ids) for s in r.samples] for r in results] == [[e, e] for e in expected]
    assert all(len(e) == 6 for e in expected)  # no early end of sequence: every answer is compared whole


def test_a_reused_engine_slot_starts_empty():
    """More prompts than slots: a finished sequence's slot serves the next prompt from position 0."""
    from daulat.infer import Engine, SamplingParams

    model = _model(index_topk=2)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, model.config.vocab_size, (7,), generator=g).tolist() for _ in range(3)]
    alone = [Engine(model, None, max_num_seqs=1, max_model_len=32).generate([p], SamplingParams(temperature=0.0,
             max_tokens=5))[0].samples[0].token_ids for p in prompts]
    engine = Engine(model, None, max_num_seqs=1, max_model_len=32)  # one slot, used three times in turn
    together = [r.samples[0].token_ids for r in engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5))]
    assert together == alone
