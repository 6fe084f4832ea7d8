"""FP8-resident bases: `load_model(..., fp8_resident=True)` keeps an FP8 release's linear layers and
routed experts one byte per weight with their block scales, and computes exactly what the dequantized
model computes (forward, the input's gradient, cached decoding); a bf16/float32 checkpoint is quantized
at load; LoRA trains on such a base through every stage (`--lora-base-dtype fp8`) and its adapter is
an ordinary PEFT adapter of the FP8 checkpoint. (V4's refusal: tests/test_v4_checkpoint.py.)"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoint_fp8 import _model, _release
from test_lora_stages import PROMPT, STEPS, file_hashes  # noqa: F401  (its fixture `base` too)
from test_lora_stages import base  # noqa: F401

from daulat import cli, lora
from daulat.checkpoint import load_checkpoint, load_info, load_model, save_model
from daulat.errors import DaulatError
from daulat.model import LatentCache, MoE
from daulat.quant import BlockFP8, FP8Linear, dequantize, e4m3_over_256, has_nan_bytes

CASES = {  # block, scale format, the experts' intermediate size, shards
    "128-blocks-ragged": ((128, 128), None, 40, 1),  # every block ragged; gate/up halves not whole blocks
    "16-blocks-ue8m0-sharded": ((16, 16), "ue8m0", 40, 3),  # 40 rows = 2.5 blocks: per-row expert scales
    "16-blocks-aligned": ((16, 16), None, 32, 1),
}


def _pair(tmp_path, case, **overrides):
    block, scale_fmt, inter, shards = CASES[case]
    path = tmp_path / case
    _release(_model(moe_intermediate_size=inter, **overrides), path, BlockFP8(block=block, scale_fmt=scale_fmt), shards)
    return path, load_model(path), load_model(path, fp8_resident=True)


def _ids(batch=2, length=12, seed=0):
    return torch.randint(0, 160, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_fast_float8_conversion_is_exact_for_every_finite_byte():
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    want, got = every.float(), e4m3_over_256(every) * 256
    finite = ~want.isnan()
    assert finite.sum() == 254 and torch.equal(got[finite], want[finite])
    assert has_nan_bytes(every) and not has_nan_bytes(every[finite])


def test_a_nan_in_an_fp8_weight_is_refused_when_held_resident(tmp_path):
    path = tmp_path / "nan"
    _release(_model(), path)
    shard = next(path.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn)
    tensors[name].view(torch.uint8)[0, 0] = 0x7F
    save_file(tensors, shard)
    with pytest.raises(DaulatError, match=f"{name}.*holds NaN"):
        load_model(path, fp8_resident=True)


@pytest.mark.parametrize("case", list(CASES))
def test_resident_weights_stay_one_byte_and_give_the_dequantized_models_logits(case, tmp_path):
    _, dequantized, resident = _pair(tmp_path, case)
    linears = [m for n, m in resident.named_modules() if n.startswith("layers.") and isinstance(m, (torch.nn.Linear, FP8Linear))]
    assert linears and all(isinstance(m, FP8Linear) and m.weight.element_size() == 1 for m in linears)
    for moe in resident.moe_layers():
        assert moe.gate_up_proj.dtype == moe.down_proj.dtype == torch.float8_e4m3fn
        assert not isinstance(moe.gate_up_proj, torch.nn.Parameter)
        assert moe.gate.weight.dtype == torch.float32  # the router stays high precision, as released
    assert resident.embed_tokens.weight.dtype == torch.float32
    assert resident.num_parameters() == dequantized.num_parameters()
    with torch.no_grad():
        assert (resident(_ids()) - dequantized(_ids())).abs().max().item() <= 1e-5


def test_the_inputs_gradient_and_lora_gradients_equal_the_dequantized_models(tmp_path):
    _, dequantized, resident = _pair(tmp_path, "16-blocks-ue8m0-sharded")
    grads = []
    for model in (dequantized, resident):
        torch.manual_seed(0)
        lora.apply_lora(model, lora.LoraConfig(rank=4))
        for unit in lora.adapter_units(model).values():  # non-zero B, so that A's gradient is not zero
            torch.nn.init.normal_(unit.lora_B.weight, std=0.1, generator=torch.Generator().manual_seed(1))
        model.train()
        ids = _ids()
        model.training_loss(ids[:, :-1], ids[:, 1:])[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name
        assert grads[1][name].abs().sum() > 0, name


@pytest.mark.parametrize("adapter", [False, True])
def test_cached_decoding_on_a_resident_base_equals_its_full_forward(adapter, tmp_path):
    _, _, model = _pair(tmp_path, "128-blocks-ragged")
    if adapter:  # a live adapter on kv_b_proj: the absorbed product must see dequantized W + BA
        lora.apply_lora(model, lora.LoraConfig(rank=4, targets=["kv_b_proj"]))
        for unit in lora.adapter_units(model).values():
            torch.nn.init.normal_(unit.lora_B.weight, std=0.2, generator=torch.Generator().manual_seed(1))
        model.eval()
    ids = _ids(1, 9)
    with torch.no_grad():
        full = model(ids)[:, -1]
        cache = LatentCache(model.config, 1, 16)
        model(ids[:, :8], positions=torch.arange(8)[None], cache=cache)
        last = model(ids[:, 8:], positions=torch.tensor([[8]]), cache=cache)[:, -1]
    assert (last - full).abs().max().item() <= 1e-4


def test_merging_an_adapter_into_a_resident_layer_dequantizes_it(tmp_path):
    _, _, model = _pair(tmp_path, "16-blocks-aligned")
    lora.apply_lora(model, lora.LoraConfig(rank=4, targets=["o_proj"]))
    layer = model.layers[0].self_attn.o_proj
    torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    want = dequantize(layer.weight, layer.weight_scale_inv, layer.block) + layer.delta_weight()
    with torch.no_grad():
        before = model(_ids())
        lora.merge_lora(model)
        after = model(_ids())
    merged = model.layers[0].self_attn.o_proj
    assert type(merged) is torch.nn.Linear and torch.allclose(merged.weight, want, atol=1e-6)
    assert (after - before).abs().max().item() <= 1e-4


def test_a_bf16_checkpoint_is_quantized_in_blocks_as_it_is_read(tmp_path):
    model = _model(moe_intermediate_size=40)
    save_model(model, tmp_path / "bf16")
    resident = load_model(tmp_path / "bf16", dtype=torch.bfloat16, fp8_resident=True)
    layer = resident.layers[0].self_attn.kv_b_proj
    assert isinstance(layer, FP8Linear) and layer.block == (128, 128)
    error = (layer.dequantized() - model.layers[0].self_attn.kv_b_proj.weight).abs().max()
    assert error <= model.layers[0].self_attn.kv_b_proj.weight.abs().max() * 2 ** -3  # e4m3: 3 mantissa bits
    assert resident.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got, want = resident(_ids()).float(), model(_ids())
    assert (got - want).abs().max() <= 0.1 * want.abs().max()


def test_routed_expert_adapters_need_a_high_precision_base(tmp_path):
    _, _, resident = _pair(tmp_path, "16-blocks-aligned")
    with pytest.raises(DaulatError, match="experts = true.*FP8-resident"):
        lora.apply_lora(resident, lora.LoraConfig(rank=2, experts=True))


# ------------------------------------------------------------------------------------------------
# Through the stages: --lora-base-dtype fp8
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_base(base):  # noqa: F811
    """The micro base of test_lora_stages exported in DeepSeek's FP8 layout (128 x 128 blocks)."""
    out = base / "base-fp8"
    if not out.exists():
        assert cli.main(["export", str(base / "base"), "--format", "hf", "--dtype", "fp8", "--out", str(out)]) == 0
    return out


def test_the_engine_and_chat_serve_an_fp8_checkpoint_held_resident(base, fp8_base, capsys):  # noqa: F811
    from daulat.infer.engine import Engine, SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [PROMPT, "Toss two coins, then say which came up."]
    answers = []
    for resident in (False, True):  # float32 either way: the same weights, the same tokens
        model, tokenizer, _ = load_checkpoint(fp8_base, fp8_resident=resident)
        answers.append([r.token_ids for r in Engine(model, tokenizer).generate(prompts, greedy)])
    assert answers[0] == answers[1] and all(len(a) == 8 for a in answers[0])
    assert cli.main(["chat", str(fp8_base), "-p", PROMPT, "--dtype", "fp8", "--max-tokens", "4", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_lora_sft_on_an_fp8_resident_base(base, fp8_base, tmp_path):  # noqa: F811
    before = file_hashes(fp8_base)
    argv = ["sft", "--init", str(fp8_base), "--data", str(base / "chats.jsonl"), "--out", str(tmp_path / "sft"),
            "--lora-rank", "4", "--lora-base-dtype", "fp8", *STEPS, "train.lr=5e-2"]
    assert cli.main(argv) == 0
    final = tmp_path / "sft" / "final"
    assert lora.is_adapter_dir(final) and file_hashes(fp8_base) == before
    record = load_info(final)["lora"]
    assert record["base_dtype"] == "fp8" and record["base"] == str(fp8_base.resolve())
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2]
    # the adapter on its base held FP8 (bf16 arithmetic) and merged into the dequantized base (float32)
    live = load_checkpoint(final, dtype=torch.bfloat16, merge_adapter=False, fp8_resident=True).model
    merged = load_checkpoint(final).model
    assert any(isinstance(m, lora.LoraLinear) and m.fp8 for m in live.modules())
    assert any(lora.adapter_state_dict(live)[k].abs().sum() > 0 for k in lora.adapter_state_dict(live) if "lora_B" in k)
    ids = torch.randint(0, merged.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = live(ids).float(), merged(ids)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("stage", ["grpo", "distill"])
def test_grpo_and_distill_train_adapters_on_an_fp8_resident_base(base, fp8_base, tmp_path, stage):  # noqa: F811
    out = tmp_path / stage
    start = {"grpo": ["--init", str(fp8_base), "--task", str(base / "coin.jsonl"), "--preset", "micro", "--steps", "2",
                      "grpo.prompts_per_rollout=2", "grpo.group_size=4", "train.batch_size=8", "train.log_every=1",
                      "grpo.sampling.max_tokens=4", "grpo.eval_problems=0", "grpo.beta=0.1"],
             "distill": ["--teacher", str(base / "base"), "--student", str(fp8_base), "--data", str(base / "chats.jsonl"),
                         "--mode", "fkl", "distill.sequences=given", *STEPS]}[stage]
    assert cli.main([stage, *start, "--out", str(out), "--lora-rank", "2", "--lora-base-dtype", "fp8"]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] == r["loss"] for r in steps)  # finite
    if stage == "grpo":  # the reference is the FP8 base with the adapters off: no KL before the first update
        assert steps[0]["kl"] == 0 and steps[1]["kl"] >= 0
    info = load_info(out / "final")
    assert lora.is_adapter_dir(out / "final") and info["lora"]["base_dtype"] == "fp8"


def test_fp8_base_with_expert_adapters_is_one_line_and_writes_nothing(base, fp8_base, tmp_path, capsys):  # noqa: F811
    argv = ["sft", "--init", str(fp8_base), "--data", str(base / "chats.jsonl"), "--out", str(tmp_path / "x"),
            "--lora-rank", "4", *STEPS]
    for extra, words in ((["--lora-base-dtype", "fp8", "lora.experts=true"], "FP8-resident"),
                         (["lora.base_dtype=int8"], "lora.base_dtype")):
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and not (tmp_path / "x").exists()
