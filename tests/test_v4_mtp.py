"""DeepSeek-V4 multi-token prediction, as V3's: the MTP term joins the training loss and trains every
MTP parameter; with no MTP nothing changes; MTP weights go to mtp.safetensors under the published
`mtp.{k}.*` names and come back exactly, while transformers still loads the main weights alone; a
pretrain run with MTP switched on saves it."""

import json

import pytest
import torch
from conftest import require
from safetensors import safe_open

from daulat.checkpoint import MTP_FILE, load_checkpoint, load_model, save_model
from daulat.errors import DaulatError
from daulat.model import linear_cross_entropy
from daulat.model_v4 import DeepseekV4, ModelConfigV4

# small and quick: one sliding, one CSA layer (learned and hash routing); the MTP block is sliding
SMALL = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "compressed_sparse_attention"],
         "mlp_layer_types": ["hash_moe", "moe"]}


def _model(depth: int, seed: int = 0, **overrides) -> DeepseekV4:
    torch.manual_seed(seed)
    return DeepseekV4(ModelConfigV4(**SMALL, num_nextn_predict_layers=depth, **overrides))


def _perturb(model: DeepseekV4, seed: int) -> None:
    """Random values everywhere, so that a tensor read into the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _batch(config, B=2, T=21, seed=1):
    tokens = torch.randint(0, config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def test_the_mtp_term_joins_the_loss_and_every_mtp_parameter_learns():
    model = _model(depth=2, seq_aux_loss_alpha=0.01).train()
    ids, targets = _batch(model.config)
    loss, stats = model.training_loss(ids, targets)
    assert set(stats) == {"ce", "mtp", "balance"}
    expected = stats["ce"] + model.config.mtp_loss_weight * stats["mtp"] + stats["balance"]
    assert torch.allclose(loss.detach(), expected)
    loss.backward()
    mtp = {n: p for n, p in model.named_parameters() if n.startswith("mtp.")}
    assert {n.split(".")[1] for n in mtp} == {"0", "1"}
    assert not [n for n, p in mtp.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert model.mtp[0].block.self_attn.compressor is None and not model.mtp[0].block.mlp.is_hash
    assert len(model.moe_layers()) == 4  # the MTP blocks' MoE are balanced as the main stack's
    # depth k predicts token i+k+1 from position i: the MTP term is the mean of the depths' CE
    with torch.no_grad():
        streams, losses = model._streams(ids), []
        for k, module in enumerate(model.mtp, start=1):
            streams, head_input = model.mtp_depth(module, k, streams, ids)
            losses.append(linear_cross_entropy(head_input.flatten(0, 1), model.lm_head.weight,
                                               targets[:, k:].flatten()))
    assert torch.allclose(torch.stack(losses).mean(), stats["mtp"])


def test_mtp_leaves_the_main_model_as_it_was():
    """With no MTP the model holds no MTP tensor and its loss is the plain CE; with MTP modules on the
    same main weights, forward, decoding's forward, the CE and the parameter count ignore them."""
    plain, with_mtp = _model(depth=0).train(), _model(depth=1).train()
    assert not len(plain.mtp) and not any(n.startswith("mtp.") for n in plain.state_dict())
    missing, unexpected = with_mtp.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(n.startswith("mtp.") for n in missing)
    assert with_mtp.num_parameters() == plain.num_parameters()
    assert with_mtp.num_parameters(active=True) == plain.num_parameters(active=True)
    ids, targets = _batch(plain.config)
    loss, stats = plain.training_loss(ids, targets)
    assert set(stats) == {"ce"} and torch.equal(loss, stats["ce"])
    ce = linear_cross_entropy(plain.norm(plain.hidden_states(ids)).flatten(0, 1), plain.lm_head.weight,
                              targets.flatten())
    assert torch.equal(loss.detach(), ce.detach())
    _, stats_mtp = with_mtp.training_loss(ids, targets)
    assert torch.equal(stats_mtp["ce"], stats["ce"])
    with torch.no_grad():
        assert torch.equal(with_mtp.eval()(ids), plain.eval()(ids))
        steps = torch.arange(ids.shape[1]).expand(2, -1)
        assert torch.equal(with_mtp(ids, steps, with_mtp.make_cache(2, 32)), plain(ids, steps, plain.make_cache(2, 32)))


def test_mtp_weights_round_trip_under_the_published_names(tmp_path):
    model = _model(depth=2)
    _perturb(model, seed=2)
    save_model(model, tmp_path / "m")
    with safe_open(tmp_path / "m" / MTP_FILE, "pt") as f:
        keys = set(f.keys())
    assert {"mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
            "mtp.0.norm.weight", "mtp.0.hc_head_fn", "mtp.1.hc_attn_fn", "mtp.1.attn.wq_a.weight",
            "mtp.1.attn.attn_sink", "mtp.1.ffn.gate.bias", "mtp.1.ffn.experts.7.w3.weight",
            "mtp.1.attn_norm.weight"} <= keys
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert not any(k.startswith("mtp.") for k in f.keys())
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert not [n for n, t in ours.items() if not torch.equal(t, theirs[n])]


def test_a_checkpoint_without_its_mtp_file_loads_without_mtp_and_a_missing_depth_is_named(tmp_path):
    """As V3's: transformers' save_pretrained drops MTP weights, so a checkpoint without them loads
    without MTP; one that holds some depths but not all, or more than config.json says, is refused."""
    from safetensors.torch import load_file, save_file

    model = _model(depth=2)
    save_model(model, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_nextn_predict_layers": 1}))
    with pytest.raises(DaulatError, match=r"unexpected tensor 'mtp\.1\..*num_nextn_predict_layers = 1"):
        load_model(tmp_path / "m")
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_nextn_predict_layers": 2}))
    mtp = load_file(tmp_path / "m" / MTP_FILE)
    save_file({k: v for k, v in mtp.items() if not k.startswith("mtp.1.")}, tmp_path / "m" / MTP_FILE)
    with pytest.raises(DaulatError, match=r"missing tensors of MTP layer 'mtp\.1\.\*'.*num_nextn_predict_layers = 2"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / MTP_FILE).unlink()
    loaded = load_model(tmp_path / "m")
    assert loaded.config.num_nextn_predict_layers == 0 and not len(loaded.mtp)
    ids, _ = _batch(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))


def test_transformers_loads_the_main_weights_of_a_checkpoint_with_mtp(tmp_path):
    require("transformers")
    from transformers import DeepseekV4ForCausalLM

    model = _model(depth=1).eval()
    _perturb(model, seed=3)
    save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    hf, info = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager",
                                                     output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    ids, _ = _batch(model.config)
    with torch.no_grad():
        assert (hf.eval()(ids).logits - model(ids)).abs().max() <= 1e-4


def test_pretrain_with_mtp_on_tiny_v4_saves_it(tmp_path):
    from daulat import cli

    out = tmp_path / "run"
    assert cli.main(["pretrain", "--preset", "tiny-v4", "--out", str(out), "--steps", "2", "--threads", "1",
                     "model.num_nextn_predict_layers=1", "data.builtin_docs=200", "train.batch_size=2",
                     "train.seq_len=64", "train.eval_batches=1"]) == 0
    assert (out / "final" / MTP_FILE).is_file()
    model = load_checkpoint(out / "final").model
    assert type(model) is DeepseekV4 and len(model.mtp) == 1
