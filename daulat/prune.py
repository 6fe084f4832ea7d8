"""Structured pruning: a DeepSeek-V3 model cut down to a smaller architecture, keeping what it uses most.

How NVIDIA's Minitron models and Meta's Llama 3.2 1B and 3B were made (Muralidharan et al. 2024,
"Compact Language Models via Pruning and Knowledge Distillation"): rather than start a small student
from random weights, cut the teacher down to the student's shape, keeping the channels, heads,
neurons, experts and layers that matter most on a calibration batch, and then distil the teacher
into it. The student starts with the teacher's embeddings and the circuits that survived the cut;
distillation repairs the rest.

    importance, measured by one forward of the teacher over the calibration rows:
      hidden channels   mean |output| of every RMSNorm over the residual stream, summed
      attention heads   mean L2 norm of each head's output (the input of o_proj)
      dense neurons     mean |activation| (the input of down_proj)
      routed experts    how many tokens the router sent to each
      expert neurons    |gate row| * |up row| * |down column| of that expert
      layers            the first `first_k_dense_replace` dense layers of the target are the teacher's
                        first ones; of the teacher's MoE layers, the combination whose model (at full
                        width) has the lowest calibration loss is kept

The target keeps the teacher's latent sizes (kv_lora_rank, q_lora_rank, head dimensions) and its
vocabulary; everything else may shrink. RMSNorm weights are kept for the kept channels (the norm is
then taken over fewer channels, which distillation adjusts to).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from daulat.errors import DaulatError

_SAME = ("vocab_size", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
         "attention_bias")
_SHRINK = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
           "n_routed_experts", "n_shared_experts", "first_k_dense_replace")
_MAX_LAYER_CHOICES = 64  # combinations of MoE layers tried; beyond that, the most important ones one at a time


def check_prunable(source, target) -> None:
    """A one-line error unless `target` is a cut-down `source` of the same architecture."""
    if type(source) is not type(target) or source.model_type != "deepseek_v3":
        raise DaulatError(f"pruning makes a deepseek_v3 student from a deepseek_v3 teacher (teacher: {source.model_type}, "
                          f"student: {target.model_type})")
    for name in _SAME:
        if getattr(source, name) != getattr(target, name):
            raise DaulatError(f"a pruned student keeps the teacher's {name} ({getattr(source, name)}), but its "
                              f"preset has {getattr(target, name)}")
    for name in _SHRINK:
        if getattr(target, name) > getattr(source, name):
            raise DaulatError(f"a pruned student cannot have more {name} ({getattr(target, name)}) than the teacher "
                              f"({getattr(source, name)})")
    moe_source = source.num_hidden_layers - source.first_k_dense_replace
    if target.num_hidden_layers - target.first_k_dense_replace > moe_source:
        raise DaulatError(f"a pruned student cannot have more MoE layers than the teacher ({moe_source})")
    if target.num_nextn_predict_layers:
        raise DaulatError("a pruned student has no multi-token prediction layers: set num_nextn_predict_layers = 0")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (so that the kept ones keep their layout)."""
    return scores.topk(k).indices.sort().values


class _Importance:
    """Forward hooks that add up the activation statistics of one teacher forward."""

    def __init__(self, model, mask: torch.Tensor):
        self.model, self.handles, self.real = model, [], mask.reshape(-1).bool()  # statistics over real tokens only
        self.hidden = torch.zeros(model.config.hidden_size)
        self.energy = {}  # RMSNorm name -> mean x^2 of its input per channel
        self.heads, self.neurons, self.shared, self.experts = {}, {}, {}, {}

    def __enter__(self):
        cfg = self.model.config

        def add(store, key, value):
            store[key] = store.get(key, 0) + value

        def on(module, fn):
            def hook(m, args, out):
                fn(args[0], out)  # returns None: the output is left as it is

            self.handles.append(module.register_forward_hook(hook))

        def flat(x):
            return x.detach().float().reshape(-1, x.shape[-1])[self.real]

        for name, norm in _residual_norms(self.model):
            def stats(x, out, name=name):
                self.hidden.add_(flat(out).abs().mean(0))
                add(self.energy, name, flat(x).square().mean(0))

            on(norm, stats)
        for i, layer in enumerate(self.model.layers):
            on(layer.self_attn.o_proj, lambda x, out, i=i: add(
                self.heads, i, flat(x).view(-1, cfg.num_attention_heads, cfg.v_head_dim).norm(dim=-1).mean(0)))
            if cfg.is_moe_layer(i):
                on(layer.mlp.gate, lambda x, out, i=i: add(
                    self.experts, i, torch.bincount(out[2][self.real].reshape(-1), minlength=cfg.n_routed_experts).float()))
                if layer.mlp.shared_experts is not None:
                    on(layer.mlp.shared_experts.down_proj, lambda x, out, i=i: add(self.shared, i, flat(x).abs().mean(0)))
            else:
                on(layer.mlp.down_proj, lambda x, out, i=i: add(self.neurons, i, flat(x).abs().mean(0)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _residual_norms(model):
    """(state-dict prefix, module) of every RMSNorm over the residual stream."""
    yield "norm", model.norm
    for i, layer in enumerate(model.layers):
        yield f"layers.{i}.input_layernorm", layer.input_layernorm
        yield f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm


def _calibration_loss(model, rows: torch.Tensor, mask: torch.Tensor) -> float:
    logits = model(rows[:, :-1]).float()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
    return float((losses * mask[:, 1:]).sum() / mask[:, 1:].sum().clamp(min=1))


def _kept_layers(model, target, rows, mask) -> list[int]:
    """The teacher's first dense layers, then the MoE layers whose full-width model scores best."""
    src = model.config
    dense = list(range(target.first_k_dense_replace))
    moe = list(range(src.first_k_dense_replace, src.num_hidden_layers))
    want = target.num_hidden_layers - target.first_k_dense_replace
    choices = list(itertools.combinations(moe, want))
    if len(choices) == 1:
        return dense + list(choices[0])
    if len(choices) > _MAX_LAYER_CHOICES:  # the layers whose removal alone costs most
        cost = {j: _cut_loss(model, dense + [i for i in moe if i != j], len(dense), rows, mask) for j in moe}
        return dense + sorted(sorted(moe, key=lambda j: -cost[j])[:want])
    return dense + list(min(choices, key=lambda c: _cut_loss(model, dense + list(c), len(dense), rows, mask)))


def _cut_loss(model, kept: list[int], dense: int, rows, mask) -> float:
    """Calibration loss of `model` with only the layers `kept` (the first `dense` of them dense), at full width."""
    from daulat.model import DeepseekV3

    cfg = dataclasses.replace(model.config, num_hidden_layers=len(kept), first_k_dense_replace=dense,
                              num_nextn_predict_layers=0)
    cut = DeepseekV3(cfg).eval()
    cut.load_state_dict(_renumbered(model.state_dict(), kept))
    with torch.no_grad():
        return _calibration_loss(cut, rows, mask)


def _renumbered(state: dict, kept: list[int]) -> dict:
    """The state of the kept layers, renumbered 0..len(kept)-1 (embeddings, final norm and head as they are)."""
    new = {}
    for name, value in state.items():
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            if int(index) in kept:
                new[f"layers.{kept.index(int(index))}.{rest}"] = value
        elif not name.startswith("mtp"):
            new[name] = value
    return new


def _head_rows(heads: torch.Tensor, per_head: int) -> torch.Tensor:
    return (heads[:, None] * per_head + torch.arange(per_head)).reshape(-1)


def _slice_attention(state, prefix, h, heads, src):
    qk = src.qk_nope_head_dim + src.qk_rope_head_dim
    q = f"{prefix}q_proj.weight" if src.q_lora_rank is None else f"{prefix}q_b_proj.weight"
    state[q] = state[q][_head_rows(heads, qk)]
    if src.q_lora_rank is None:
        state[q] = state[q][:, h]
    else:
        state[f"{prefix}q_a_proj.weight"] = state[f"{prefix}q_a_proj.weight"][:, h]
    state[f"{prefix}kv_a_proj_with_mqa.weight"] = state[f"{prefix}kv_a_proj_with_mqa.weight"][:, h]
    kv = f"{prefix}kv_b_proj.weight"
    state[kv] = state[kv][_head_rows(heads, src.qk_nope_head_dim + src.v_head_dim)]
    o = f"{prefix}o_proj.weight"
    state[o] = state[o][h][:, _head_rows(heads, src.v_head_dim)]
    if src.attention_bias:  # the latent projections' biases keep their (unpruned) sizes
        state[f"{prefix}o_proj.bias"] = state[f"{prefix}o_proj.bias"][h]


def _slice_mlp(state, prefix, h, neurons):
    state[f"{prefix}gate_proj.weight"] = state[f"{prefix}gate_proj.weight"][neurons][:, h]
    state[f"{prefix}up_proj.weight"] = state[f"{prefix}up_proj.weight"][neurons][:, h]
    state[f"{prefix}down_proj.weight"] = state[f"{prefix}down_proj.weight"][h][:, neurons]


def _slice_experts(state, prefix, h, experts, width):
    """Keep `experts` (routed), each with its `width` strongest neurons, over hidden channels `h`."""
    gate_up, down = state[f"{prefix}gate_up_proj"], state[f"{prefix}down_proj"]
    inter = down.shape[-1]
    new_gate_up, new_down = [], []
    for e in experts.tolist():
        gate, up = gate_up[e, :inter], gate_up[e, inter:]
        strength = gate.norm(dim=1) * up.norm(dim=1) * down[e].norm(dim=0)
        keep = _top(strength, width)
        new_gate_up.append(torch.cat([gate[keep], up[keep]])[:, h])
        new_down.append(down[e][h][:, keep])
    state[f"{prefix}gate_up_proj"], state[f"{prefix}down_proj"] = torch.stack(new_gate_up), torch.stack(new_down)
    state[f"{prefix}gate.weight"] = state[f"{prefix}gate.weight"][experts][:, h]
    state[f"{prefix}gate.e_score_correction_bias"] = state[f"{prefix}gate.e_score_correction_bias"][experts]


def _norm_rescale(energy: torch.Tensor, h: torch.Tensor) -> float:
    """What an RMSNorm's weights are multiplied by when only channels `h` of its input are kept: its
    output is x / rms(x), and the rms over the kept channels is sqrt(D * kept / (D' * all)) times the rms
    over all of them, where kept / all is the share of the input's energy (mean x^2) the kept channels
    hold on the calibration rows. Exact when the dropped channels are zero."""
    return float((len(energy) / len(h) * energy[h].sum() / energy.sum().clamp(min=1e-30)).sqrt())


def prune(model, target, rows: torch.Tensor, mask: torch.Tensor):
    """A `target`-shaped DeepseekV3 cut from `model`, judged on calibration `rows` [B, T] (token ids; `mask`
    marks the real tokens). Returns (student, what was kept: layers, heads, experts, loss before and after)."""
    from daulat.model import DeepseekV3

    src = model.config
    check_prunable(src, target)
    full = DeepseekV3(dataclasses.replace(src, num_nextn_predict_layers=0)).eval()  # a float32 copy on the CPU
    full.load_state_dict(_renumbered({k: v.detach().float().cpu() for k, v in model.state_dict().items()},
                                     list(range(src.num_hidden_layers))))
    model, rows, mask = full, rows.cpu(), mask.cpu()
    with torch.no_grad(), _Importance(model, mask[:, :-1]) as imp:
        teacher_loss = _calibration_loss(model, rows, mask)
    layers = _kept_layers(model, target, rows, mask)
    h = _top(imp.hidden, target.hidden_size)
    state = {k: v.clone() for k, v in _renumbered(model.state_dict(), layers).items()}
    state["embed_tokens.weight"] = state["embed_tokens.weight"][:, h]
    state["lm_head.weight"] = state["lm_head.weight"][:, h]
    norms = [("norm", "norm")] + [(f"layers.{old}.{n}", f"layers.{new}.{n}") for new, old in enumerate(layers)
                                  for n in ("input_layernorm", "post_attention_layernorm")]
    for source, name in norms:
        state[f"{name}.weight"] = state[f"{name}.weight"][h] * _norm_rescale(imp.energy[source], h)
    kept = {"layers": layers, "heads": {}, "experts": {}}
    for new, old in enumerate(layers):
        prefix = f"layers.{new}."
        heads = _top(imp.heads[old], target.num_attention_heads)
        kept["heads"][old] = heads.tolist()
        _slice_attention(state, f"{prefix}self_attn.", h, heads, src)
        if new < target.first_k_dense_replace:
            _slice_mlp(state, f"{prefix}mlp.", h, _top(imp.neurons[old], target.intermediate_size))
            continue
        experts = _top(imp.experts[old], target.n_routed_experts)
        kept["experts"][old] = experts.tolist()
        _slice_experts(state, f"{prefix}mlp.", h, experts, target.moe_intermediate_size)
        if target.n_shared_experts:
            width = target.moe_intermediate_size * target.n_shared_experts
            _slice_mlp(state, f"{prefix}mlp.shared_experts.", h, _top(imp.shared[old], width))
    student = DeepseekV3(target)
    student.load_state_dict(state)
    with torch.no_grad():
        kept.update(teacher_loss=round(teacher_loss, 4), student_loss=round(_calibration_loss(student.eval(), rows, mask), 4))
    return student.train(), kept
