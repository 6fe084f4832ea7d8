"""Muon and QK-clip: a stacked expert tensor is updated as its experts' matrices would be one by one
(against torch.optim.Muon), non-matrix parameters take AdamW (against torch.optim.AdamW), and QK-clip
bounds an exceeding head's logit while leaving the other heads and the shared rotary key alone."""

import pytest
import torch

from daulat.model import DeepseekV3, ModelConfig
from daulat.train.muon import Muon, max_logits, orthogonalize, qk_clip, track_max_logits
from daulat.train.optim import TrainConfig, build_optimizer, muon_groups

E, I, D = 3, 8, 12  # experts, expert intermediate size, hidden size
LR, WD, MOMENTUM = 0.02, 0.1, 0.95


def _tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**dict(dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                   num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                                   qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                   first_k_dense_replace=1, attention_bias=True), **kw))


def _experts(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)


def _stacked_run(ns_dtype, grads):
    """Our Muon on the stacked tensors gate_up [E, 2I, D] and down [E, D, I]; returns them after the steps."""
    w_gate_up, w_down = (torch.nn.Parameter(t.clone()) for t in _experts(0))
    opt = Muon([{"params": [w_down], "muon": True, "weight_decay": WD},
                {"params": [w_gate_up], "muon": True, "split": 2, "weight_decay": WD}],
               lr=LR, momentum=MOMENTUM, ns_dtype=ns_dtype)
    for g_gate_up, g_down in grads:
        w_gate_up.grad, w_down.grad = g_gate_up.clone(), g_down.clone()
        opt.step()
    return w_gate_up.detach(), w_down.detach()


def _per_expert_matrices():
    """Each expert's gate_proj [I, D], up_proj [I, D] and down_proj [D, I] as separate parameters."""
    gate_up, down = _experts(0)
    return ([torch.nn.Parameter(gate_up[e, :I].clone()) for e in range(E)],
            [torch.nn.Parameter(gate_up[e, I:].clone()) for e in range(E)],
            [torch.nn.Parameter(down[e].clone()) for e in range(E)])


def _per_expert_run(make_optimizer, grads):
    gate, up, down = _per_expert_matrices()
    opt = make_optimizer(gate + up + down)
    for g_gate_up, g_down in grads:
        for e in range(E):
            gate[e].grad, up[e].grad = g_gate_up[e, :I].clone(), g_gate_up[e, I:].clone()
            down[e].grad = g_down[e].clone()
        opt.step()
    return (torch.stack([torch.cat([gate[e].detach(), up[e].detach()]) for e in range(E)]),
            torch.stack([down[e].detach() for e in range(E)]))


@pytest.fixture(scope="module")
def grads():
    return [_experts(seed) for seed in (1, 2, 3)]  # three steps: momentum and Nesterov take part


def test_stacked_experts_update_as_each_experts_matrices_alone(grads):
    # our batched 3-D update against our own 2-D update on each expert's matrices: the same to rounding
    ours = _stacked_run(torch.float32, grads)
    alone = _per_expert_run(lambda ps: Muon([{"params": ps, "muon": True, "weight_decay": WD}], lr=LR,
                                            momentum=MOMENTUM, ns_dtype=torch.float32), grads)
    for a, b in zip(ours, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    # and against torch.optim.Muon on each expert's gate, up and down matrices (Moonlight's RMS matching),
    # which cannot take the 3-D tensors themselves; torch runs Newton-Schulz in bf16, we do in float32 on
    # CPU, so the updates agree to bf16's rounding (about 1.5% here), per matrix
    reference = _per_expert_run(lambda ps: torch.optim.Muon(ps, lr=LR, weight_decay=WD, momentum=MOMENTUM,
                                                            adjust_lr_fn="match_rms_adamw"), grads)
    decayed = [w * (1 - LR * WD) ** len(grads) for w in _experts(0)]
    step_ours = [w - w0 for w, w0 in zip(ours, decayed)]
    step_torch = [w - w0 for w, w0 in zip(reference, decayed)]
    for a, b in zip(step_ours, step_torch):
        assert _relative_difference(a, b) < 0.03

    # orthogonalising gate and up as one fused [2I, D] matrix would be another update altogether
    fused = Muon([{"params": [p := torch.nn.Parameter(_experts(0)[0].clone())], "muon": True, "weight_decay": WD}],
                 lr=LR, momentum=MOMENTUM, ns_dtype=torch.float32)
    for g, _ in grads:
        p.grad = g.clone()
        fused.step()
    assert _relative_difference(p.detach() - decayed[0], step_torch[0]) > 0.2


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ||a - b|| / ||b|| over the matrices of two [E, R, C] stacks."""
    return ((a - b).norm(dim=(-2, -1)) / b.norm(dim=(-2, -1))).max().item()


def test_orthogonalize_flattens_the_spectrum():
    G = torch.randn(4, 16, 24, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(orthogonalize(G))
    assert singular.min() > 0.5 and singular.max() < 1.5  # Keller Jordan's quintic: ~[0.7, 1.2], not exactly 1
    tall = orthogonalize(G.mT)
    torch.testing.assert_close(tall, orthogonalize(G).mT, rtol=0, atol=1e-6)


def test_matrices_take_muon_and_everything_else_adamw():
    torch.manual_seed(0)
    model = DeepseekV3(_tiny_config(q_lora_rank=8, num_nextn_predict_layers=1))
    groups = muon_groups(model, 0.1)
    name = {id(p): n for n, p in model.named_parameters()}
    muon = {name[id(p)] for g in groups if g.get("muon") for p in g["params"]}
    adamw = {name[id(p)] for g in groups if not g.get("muon") for p in g["params"]}
    assert not muon & adamw and len(muon | adamw) == len(list(model.parameters()))
    fused = {name[id(p)] for g in groups if g.get("split") == 2 for p in g["params"]}
    assert fused == {n for n in name.values() if n.endswith("mlp.gate_up_proj")} and fused
    for n in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.0.input_layernorm.weight",
              "layers.0.self_attn.q_a_proj.bias", "layers.0.self_attn.q_a_layernorm.weight"):
        assert n in adamw, n
    for n in ("layers.0.self_attn.q_a_proj.weight", "layers.0.self_attn.q_b_proj.weight",
              "layers.0.self_attn.kv_a_proj_with_mqa.weight", "layers.0.self_attn.kv_b_proj.weight",
              "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight", "layers.1.mlp.down_proj",
              "layers.1.mlp.gate.weight", "layers.1.mlp.shared_experts.up_proj.weight", "mtp.0.eh_proj.weight"):
        assert n in muon, n
    assert all(p.ndim >= 2 for g in groups if g.get("muon") for p in g["params"])
    assert "e_score_correction_bias" not in str(muon | adamw)  # a buffer: the balancing rule moves it
    decayed = {name[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "lm_head.weight" in decayed and "embed_tokens.weight" not in decayed and "norm.weight" not in decayed


def test_the_adamw_half_is_torch_adamw():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = Muon([{"params": a[:1], "weight_decay": 0.1}, {"params": a[1:], "weight_decay": 0.0}], lr=1e-2)
    reference = torch.optim.AdamW([{"params": b[:1], "weight_decay": 0.1}, {"params": b[1:], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(4):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step(), reference.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert ours.state[p].keys() == reference.state[q].keys() == {"step", "exp_avg", "exp_avg_sq"}


def test_build_optimizer_follows_the_config():
    model = DeepseekV3(_tiny_config())
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="muon")), Muon)
    assert isinstance(build_optimizer(model, TrainConfig()), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def _logits_per_head(model, ids) -> torch.Tensor:
    """[layers, H] largest attention logit of each head in a training (grad-enabled) forward."""
    track_max_logits(model)
    with torch.enable_grad():
        model(ids)
    out = torch.stack(max_logits(model))
    track_max_logits(model, on=False)
    return out


@pytest.mark.parametrize("q_lora_rank", [None, 8])
def test_qk_clip_bounds_the_exceeding_head_and_leaves_the_others(q_lora_rank):
    torch.manual_seed(0)
    config = _tiny_config(q_lora_rank=q_lora_rank)
    model = DeepseekV3(config)
    attn = model.layers[1].self_attn
    q = attn.q_proj if q_lora_rank is None else attn.q_b_proj
    n, r, v, qk = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.qk_head_dim
    hot = 2  # this head's queries are blown up so that its logits exceed tau
    with torch.no_grad():
        q.weight[hot * qk : (hot + 1) * qk] *= 40.0
        attn.kv_b_proj.weight[hot * (n + v) : hot * (n + v) + n] *= 40.0
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    before = _logits_per_head(model, ids)
    tau = 4 * before[1, [h for h in range(4) if h != hot]].max().item()
    assert before[1, hot] > tau and (before[0] < tau).all()

    weights = {k: w.clone() for k, w in model.state_dict().items()}
    track_max_logits(model)
    with torch.enable_grad():
        model(ids)
    assert qk_clip(model, tau) == 1
    track_max_logits(model, on=False)
    after = _logits_per_head(model, ids)
    assert after[1, hot] == pytest.approx(tau, rel=1e-4)  # bounded, at tau exactly: logits scale by gamma
    others = [h for h in range(4) if h != hot]
    assert torch.equal(after[1, others], before[1, others]) and torch.equal(after[0], before[0])

    gamma = tau / before[1, hot].item()
    state = model.state_dict()
    prefix = "layers.1.self_attn."
    q_name = prefix + ("q_proj.weight" if q_lora_rank is None else "q_b_proj.weight")
    for key in state:
        if key not in (q_name, prefix + "kv_b_proj.weight"):
            assert torch.equal(state[key], weights[key]), key  # the shared rotary key (kv_a_proj_with_mqa) too
    q_old, q_new = weights[q_name].view(4, qk, -1), state[q_name].view(4, qk, -1)
    torch.testing.assert_close(q_new[hot, :n], q_old[hot, :n] * gamma**0.5)  # q_nope by sqrt(gamma)
    torch.testing.assert_close(q_new[hot, n:], q_old[hot, n:] * gamma)  # q_rope by gamma
    kv_old, kv_new = weights[prefix + "kv_b_proj.weight"].view(4, n + v, -1), state[prefix + "kv_b_proj.weight"].view(4, n + v, -1)
    torch.testing.assert_close(kv_new[hot, :n], kv_old[hot, :n] * gamma**0.5)  # k_nope by sqrt(gamma)
    assert torch.equal(kv_new[hot, n:], kv_old[hot, n:])  # values untouched
    assert torch.equal(q_new[others], q_old[others]) and torch.equal(kv_new[others], kv_old[others])


def test_max_logit_is_tracked_only_in_training_forwards():
    model = DeepseekV3(_tiny_config())
    ids = torch.randint(0, 64, (1, 8))
    model(ids)  # tracking off: nothing recorded
    assert max_logits(model) == []
    track_max_logits(model)
    with torch.no_grad():  # validation, rollouts: not counted
        model(ids)
    assert all(torch.isinf(t).all() for t in max_logits(model))
    with torch.enable_grad():
        model(ids)
    assert all(torch.isfinite(t).all() for t in max_logits(model))
