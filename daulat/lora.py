"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on a frozen daulat model, saved as PEFT directories.

    model, tokenizer, info = load_checkpoint(base)
    lora.prepare(model, LoraConfig(rank=16), base)     # freezes the base, wraps the target linears
    ...train...                                        # only lora_A / lora_B have gradients
    daulat.save_model(model, "runs/x/final")           # adapter_config.json + adapter_model.safetensors
    model, tokenizer, info = load_checkpoint("runs/x/final", merge_adapter=False)   # base from the directory

Also: `adapters_disabled(model)` (the base alone), `FrozenBase(model)` (a KL reference without a
second copy), `merge_lora(model)` (plain weights again), `parameter_counts`, and for the Trainer
`adapter_state_dict`, `resume_into`.

A wrapped linear computes  y = x W^T + b + (alpha / rank) * B A dropout(x),  with A [rank, in]
Kaiming-uniform and B [out, rank] zero (PEFT's initialisation), so a fresh adapter leaves the model
unchanged. The base weight keeps its parameter and its name (`layers.0.self_attn.q_proj.weight`);
the adapter adds `...q_proj.lora_A.weight` and `...q_proj.lora_B.weight`, held in float32 whatever the
base's dtype.

On disk an adapter is what `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
adapter)` reads: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
base_model_name_or_path, ...) and `adapter_model.safetensors` with PEFT's names
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), plus daulat's record
(daulat.json, which also holds the base's architecture so that a wrong base is refused) and a model
card. Like a checkpoint it is written to a temporary directory and renamed into place; the base's
files are only ever read.

Default targets: the attention projections (q_proj, or q_a_proj and q_b_proj; kv_a_proj_with_mqa,
kv_b_proj, o_proj; DeepSeek-V4's kv_proj, o_a_proj, o_b_proj) and the dense and shared-expert SwiGLU
MLPs (gate_proj, up_proj, down_proj): the linears directly in a layer's `self_attn`, `mlp` or
`mlp.shared_experts`, so never V3.2's indexer nor V4's compressors and indexers (whose kv_proj,
gate_proj and q_b_proj are not attention projections or MLPs). For all of these daulat's module names
are transformers' (as `DeepseekV4ForCausalLM` holds them in memory too), so adapter tensors need no
renaming either way.
`experts = true` also adapts the routed experts (the stacked `gate_up_proj` [E, 2I, D] and `down_proj`
[E, D, I] of every MoE layer), each expert its own rank-r pair, in the layout PEFT uses for
transformers 5's fused experts (see ExpertLora); like PEFT, daulat then forms W + dW for all experts
at each forward, so this costs memory and time in proportion to the experts' size.
The router's correction bias belongs to the frozen base, so `prepare` switches its balancing update
off (restored by `merge_lora`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from daulat import quant
from daulat.errors import DaulatError
from daulat.weights import (INFO_FILE, TRAIN_STATE_DIR, Checkpoint, fsync_dir, read_json, read_safetensors,
                            replace_dir, write_json)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model."  # PeftModel > LoraModel > DeepseekV3ForCausalLM.model (V4 alike)
ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                     "kv_proj", "o_a_proj", "o_b_proj")  # the last three: DeepSeek-V4's
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETABLE = ATTENTION_TARGETS + MLP_TARGETS
# a targetable linear sits directly in a layer's attention, dense MLP or shared expert
TARGET_NAME = re.compile(rf"^layers\.\d+\.(?:self_attn\.(?:{'|'.join(ATTENTION_TARGETS)})"
                         rf"|mlp\.(?:shared_experts\.)?(?:{'|'.join(MLP_TARGETS)}))$")
# the layers PEFT must adapt through their weight (target_parameters), not as modules: the MLPs (see
# _peft_targets) and V4's o_a_proj, a grouped linear (transformers' DeepseekV4GroupedLinear) whose
# forward multiplies by its weight group by group, so an adapter added to its output would not fit
# (daulat applies it through its weight too, W + B A, so with no dropout, as PEFT's parameter targets)
PARAMETER_TARGETS = MLP_TARGETS + ("o_a_proj",)
# the routed experts' stacked parameters -> the PEFT module that adapts them (transformers 5 holds them
# fused in `mlp.experts`; PEFT nests its two wrappers there, gate_up_proj's inside down_proj's)
EXPERT_PARAMETERS = {"gate_up_proj": "experts.base_layer", "down_proj": "experts"}


BASE_DTYPES = ("float32", "bfloat16", "fp8")  # lora.base_dtype: how the frozen base is held (daulat.precision)


@dataclass
class LoraConfig:
    """The [lora] section. LoRA is off while `rank` is unset (full fine-tuning)."""

    rank: int | None = None  # r: the adapters' inner size; None: no LoRA
    alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = 2 * rank
    dropout: float = 0.0  # on the adapter's input only, while training
    targets: list[str] | None = None  # linear layers by name or dotted suffix; None: attention + dense/shared MLPs
    experts: bool = False  # also the routed experts (no dropout there: PEFT has none for them either)
    # the frozen base as held while adapters train: "float32", "bfloat16", or "fp8": FP8-resident, its
    # linear layers and experts one byte per weight with block scales (an FP8 checkpoint as published;
    # any other quantized in 128 x 128 blocks at load), everything else in bfloat16
    base_dtype: str = "float32"

    def __post_init__(self):
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0):
            raise DaulatError(f"config lora.rank = {self.rank!r}: must be a positive integer")
        if self.alpha is not None and not self.alpha > 0:
            raise DaulatError(f"config lora.alpha = {self.alpha!r}: must be positive")
        if not 0 <= self.dropout < 1:
            raise DaulatError(f"config lora.dropout = {self.dropout!r}: must be in [0, 1)")
        if self.base_dtype not in BASE_DTYPES:
            raise DaulatError(f"config lora.base_dtype = {self.base_dtype!r}: expected one of {', '.join(BASE_DTYPES)}")
        if self.targets is not None:
            if not (self.targets or self.experts) or not all(isinstance(t, str) and t.strip(".") for t in self.targets):
                raise DaulatError(f"config lora.targets = {self.targets!r}: must be a non-empty list of layer names")

    @property
    def enabled(self) -> bool:
        return self.rank is not None

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else 2.0 * self.rank) / self.rank


class LoraLinear(nn.Linear):
    """An nn.Linear whose frozen `weight` / `bias` are the wrapped layer's own parameters, plus the
    trainable low-rank update: forward(x [..., in]) -> [..., out]. The wrapped layer may be an
    FP8-resident one (daulat.quant.FP8Linear): its one-byte weight and block scales are then kept as
    they are, and its product dequantizes slab by slab."""

    def __init__(self, base: nn.Linear | quant.FP8Linear, rank: int, scaling: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fp8 = isinstance(base, quant.FP8Linear)
        if self.fp8:  # the same buffers, under the same names
            for name in ("weight", "weight_scale_inv", "bias"):
                self.register_buffer(name, getattr(base, name))
            self.block, self.compute_dtype = base.block, base.compute_dtype
        else:
            self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and storage unchanged
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT (nn.Linear's default)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.adapter_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            out = quant.fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias)
        else:
            out = F.linear(x, self.weight, self.bias)
        if not self.adapter_on:
            return out
        delta = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return out + delta.to(out.dtype)

    def effective_weight(self) -> torch.Tensor:
        """W + (alpha / rank) B A [out, in] in W's dtype (W alone while switched off): the matrix this layer
        applies, for the paths that multiply by it directly (MLA's absorbed decoding)."""
        weight = self.base_weight()
        if not self.adapter_on:
            return weight
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return weight + delta.to(weight.dtype)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen W [out, in] (an FP8 one dequantized, into the model's working dtype by default)."""
        if self.fp8:
            return quant.dequantize(self.weight, self.weight_scale_inv, self.block, dtype=dtype or self.compute_dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) B A [out, in], in float32: what merging adds to `weight`."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.out_features}, scaling={self.scaling:g}"


class ExpertLora(nn.Module):
    """LoRA on stacked routed experts, as a parametrization of MoE.gate_up_proj / down_proj:
    forward(W [E, out, in]) -> W + (alpha / rank) dW, dW[e] = B_e A_e, in PEFT's fused-expert layout:
    lora_A [E * rank, in] holds A_e in rows e * rank ...; lora_B [out, rank * E] holds B_e in columns
    j * E + e (PEFT's ParamWrapper.get_delta_weight)."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float, peft_name: str):
        super().__init__()
        self.n_experts, (out_features, in_features) = weight.shape[0], weight.shape[1:]
        self.rank, self.scaling, self.peft_name = rank, scaling, peft_name
        E, device = self.n_experts, weight.device
        self.lora_A = nn.Linear(in_features, E * rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(E * rank, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.adapter_on = True

    def delta_weight(self) -> torch.Tensor:
        """dW [E, out, in] in float32."""
        A = self.lora_A.weight.view(self.n_experts, self.rank, -1)  # [E, r, in]
        B = self.lora_B.weight.view(-1, self.rank, self.n_experts)  # [out, r, E]
        return torch.einsum("ore,eri->eoi", B, A) * self.scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.adapter_on:
            return weight
        return weight + self.delta_weight().to(weight.dtype)


@dataclass
class _LoraState:
    """What `apply_lora` leaves on the model (as `model.lora`): its config, resolved targets and base."""

    config: LoraConfig
    targets: list[str]  # the leaf names actually adapted, for adapter_config.json
    base_path: str | None = None
    modules: list[str] = field(default_factory=list)  # the wrapped layers' names


# ------------------------------------------------------------------------------------------------
# Applying, switching off, merging
# ------------------------------------------------------------------------------------------------


def _target_linears(model: nn.Module, targets: list[str] | None) -> dict[str, nn.Linear]:
    """The linears of the main stack (never the MTP modules, the head, the router, an indexer or a
    compressor: see TARGET_NAME) named by `targets` (a leaf name or dotted suffix each); every target
    must match at least one."""
    candidates = {name: m for name, m in _stack_linears(model).items() if TARGET_NAME.match(name)}
    if targets is None:
        return candidates
    chosen = {}
    for target in targets:
        hits = {n: m for n, m in candidates.items() if n == target or n.endswith("." + target.strip("."))}
        if not hits:
            raise DaulatError(f"config lora.targets: {target!r} matches no linear layer of this model "
                              f"(targetable: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in candidates}))})")
        chosen.update(hits)
    return dict(sorted(chosen.items(), key=lambda kv: list(candidates).index(kv[0])))


def _stack_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of the main stack (`layers.*`), targetable or not."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, quant.FP8Linear)) and name.startswith("layers.")}


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze every parameter of `model` and wrap its target linears with LoRA, in place; returns it."""
    if not config.enabled:
        raise DaulatError("config lora.rank: unset, so there is no adapter to apply")
    if is_lora(model):
        raise DaulatError("this model already carries LoRA adapters")
    chosen = _target_linears(model, config.targets)
    if config.experts and not _main_moe_layers(model):
        raise DaulatError("config lora.experts = true: this model has no routed experts (no MoE layer)")
    if config.experts and any(moe.gate_up_proj.dtype == torch.float8_e4m3fn for moe in _main_moe_layers(model).values()):
        raise DaulatError("config lora.experts = true: the routed experts of this base are FP8-resident "
                          "(lora.base_dtype = \"fp8\"); adapting them needs a bfloat16 or float32 base")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, LoraLinear(linear, config.rank, config.scaling, config.dropout))
    if config.experts:
        _wrap_experts(model, config)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    model.lora = _LoraState(config, leaves, modules=list(chosen))
    return model


def _main_moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The MoE blocks of the main stack by module name (`layers.{i}.mlp`), MTP modules left out."""
    return {f"layers.{i}.mlp": layer.mlp for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "gate_up_proj")}


def _wrap_experts(model: nn.Module, config: LoraConfig) -> None:
    for prefix, moe in _main_moe_layers(model).items():
        for name, peft_leaf in EXPERT_PARAMETERS.items():
            weight = getattr(moe, name)
            unit = ExpertLora(weight, config.rank, config.scaling, f"{prefix}.{peft_leaf}")
            parametrize.register_parametrization(moe, name, unit, unsafe=True)
            moe.parametrizations[name].original.requires_grad_(False)  # the base stays frozen


def prepare(model: nn.Module, config: LoraConfig | None, base_path) -> dict | None:
    """A stage's one call on the model it will train, right after loading it; returns `record(model)`.

    LoRA on (config.rank set): a plain model gets new adapters on a frozen base (`base_path` becomes the
    adapter's base_model_name_or_path, and the router's correction bias stays frozen with the rest of
    the base); a model loaded from an adapter directory (`load_checkpoint(path, merge_adapter=False)`) keeps training its adapters
    on their own base, if they have config.rank. LoRA off: a model loaded from an adapter is merged and
    unfrozen for full fine-tuning; a plain model is left alone."""
    enabled = config is not None and config.enabled
    if is_lora(model) and not enabled:
        merge_lora(model)
        model.requires_grad_(True)
    elif is_lora(model):
        rank = model.lora.config.rank
        if rank != config.rank:
            raise DaulatError(f"config lora.rank = {config.rank}: the adapter this run starts from has rank {rank}")
    elif enabled:
        apply_lora(model, config)
        model.lora.base_path = str(Path(base_path).resolve())
    return record(model)


def record(model: nn.Module) -> dict | None:
    """The "lora" entry of a LoRA run's daulat.json (None for a model without adapters)."""
    if not is_lora(model):
        return None
    state = model.lora
    return {**asdict(state.config), "targets": state.targets, "base": state.base_path, **parameter_counts(model)}


class FrozenBase:
    """The policy as it is now, frozen, called like a model (no gradients), with no second copy of the
    base: GRPO's KL reference, `reference = lora.FrozenBase(policy)` before training starts.

    With fresh adapters (every B zero: a new LoRA run) the reference is the base with the adapters
    switched off. A run that continues an adapter (GRPO after a LoRA SFT) keeps a snapshot of the
    adapter tensors only, and each call swaps it in and back out."""

    def __init__(self, model: nn.Module):
        self.model = model
        units = adapter_units(model).values()
        fresh = all(not unit.lora_B.weight.detach().any() for unit in units)
        self.snapshot = None if fresh else [(w, w.detach().clone()) for u in units
                                            for w in (u.lora_A.weight, u.lora_B.weight)]

    @contextmanager
    def _reference_weights(self):
        if self.snapshot is None:
            with adapters_disabled(self.model):
                yield
            return
        live = [w.detach().clone() for w, _ in self.snapshot]
        try:
            for w, frozen in self.snapshot:
                w.data.copy_(frozen)
            yield
        finally:
            for (w, _), now in zip(self.snapshot, live):
                w.data.copy_(now)

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self._reference_weights():
            return self.model(*args, **kwargs)

    def to(self, *args, **kwargs) -> "FrozenBase":
        return self  # it lives wherever the policy does

    def __getattr__(self, name):
        return getattr(self.model, name)  # config, num_parameters, ...


def is_lora(model: nn.Module) -> bool:
    return isinstance(getattr(model, "lora", None), _LoraState)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_units(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapter (LoraLinear or ExpertLora) by the module name PEFT gives it (without "model.")."""
    units = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            units[name] = m
        elif isinstance(m, ExpertLora):
            units[m.peft_name] = m
    return units


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model alone for the duration (GRPO's frozen reference, with no second copy)."""
    layers = list(adapter_units(model).values())
    before = [m.adapter_on for m in layers]
    for m in layers:
        m.adapter_on = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.adapter_on = on


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (alpha / rank) B A, summed in float32) and put plain
    nn.Linear layers back, in place: the result is an ordinary DeepseekV3 that `save_model` writes.
    Parameters stay frozen; the router's balancing speed is restored."""
    for name, layer in lora_layers(model).items():
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        if layer.fp8:  # the merged weight cannot stay one byte: it goes to the working dtype
            merged = layer.base_weight(torch.float32) + (layer.delta_weight() if layer.adapter_on else 0)
            plain.weight = nn.Parameter(merged.to(layer.compute_dtype), requires_grad=False)
            plain.bias = None if layer.bias is None else nn.Parameter(layer.bias, requires_grad=False)
        else:
            if layer.adapter_on:
                layer.weight.copy_((layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype))
            plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, plain)
    for moe in _main_moe_layers(model).values():
        for name in [n for n in EXPERT_PARAMETERS if parametrize.is_parametrized(moe, n)]:
            parametrize.remove_parametrizations(moe, name, leave_parametrized=moe.parametrizations[name][0].adapter_on)
    if is_lora(model):
        del model.lora
    return model


def parameter_counts(model: nn.Module) -> dict:
    """{"parameters_trainable", "parameters_total", "trainable_fraction"} (shared parameters once)."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params) + quant.resident_numel(model)
    return {"parameters_trainable": trainable, "parameters_total": total,
            "trainable_fraction": round(trainable / total, 6) if total else 0.0}


# ------------------------------------------------------------------------------------------------
# Adapter directories (PEFT's format)
# ------------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names, on CPU. Gathers FSDP shards: call it on every rank."""
    out = {}
    for name, layer in adapter_units(model).items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part).weight
            if hasattr(weight, "full_tensor"):
                weight = weight.full_tensor()
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = weight.detach().cpu().contiguous()
    return out


# PEFT's two lists: target_parameters or not -> the suffix lengths tried (in dotted components), shortest first
_PEFT_SUFFIXES = {False: (1, 2), True: (2,)}


def _peft_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) that make PEFT adapt exactly the layers daulat adapted.

    Attention projections go in target_modules. The dense and shared-expert MLPs must go in
    target_parameters ("mlp.gate_proj.weight", "shared_experts.down_proj.weight"): for deepseek_v3 PEFT
    reads a target_modules entry gate_proj / up_proj / down_proj as the fused routed experts of
    transformers 5 (its v4-to-v5 MoE conversion) and would leave those MLPs unadapted; so does V4's
    grouped o_a_proj (see PARAMETER_TARGETS). Each list uses the shortest suffixes that select no
    layer daulat left alone (a leaf name; else e.g. "self_attn.kv_proj", which V4's compressor's
    kv_proj does not end with), else full names."""
    linears = _stack_linears(model)
    lists = []
    for as_parameter, depths in _PEFT_SUFFIXES.items():
        names = [n for n in model.lora.modules if (n.rsplit(".", 1)[-1] in PARAMETER_TARGETS) == as_parameter]
        lists.append(_selecting(names, linears, depths, ".weight" if as_parameter else ""))
    if model.lora.config.experts:
        lists[1] += [f"mlp.experts.{name}" for name in EXPERT_PARAMETERS]
    return lists[0], lists[1]


def _selecting(names: list[str], linears, depths: tuple[int, ...], tail: str) -> list[str]:
    """PEFT entries (each a layer's name + tail, or a dotted suffix of one) that match exactly `names`
    among `linears`: the suffixes of the first length in `depths` that does, else the full names,
    grouped by their shortest suffix."""
    def suffix(name: str, depth: int) -> str:
        return ".".join(name.split(".")[-depth:]) + tail

    for depth in depths:
        suffixes = {suffix(n, depth) for n in names}
        if {n for n in linears if any((n + tail).endswith("." + s) for s in suffixes)} == set(names):
            return sorted(suffixes)
    order = list(dict.fromkeys(suffix(n, depths[0]) for n in names))
    return [f"model.{n}{tail}" for n in sorted(names, key=lambda n: order.index(suffix(n, depths[0])))]


def adapter_config(model: nn.Module, base: str) -> dict:
    """adapter_config.json, as PEFT's LoraConfig.save_pretrained spells it."""
    config = model.lora.config
    modules, parameters = _peft_targets(model)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": config.rank, "lora_alpha": config.rank * config.scaling,
            # PEFT refuses dropout on parameter targets; daulat's record keeps the dropout trained with
            "lora_dropout": 0.0 if parameters else config.dropout,
            "target_modules": modules, "target_parameters": parameters or None, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
            "alpha_pattern": {}}


_NOT_ARCHITECTURE = ("dtype", "bias_update_speed", "mtp_loss_weight", "seq_aux_loss_alpha", "num_nextn_predict_layers")


def _architecture(config) -> dict:
    """The base's config.json keys that decide whether an adapter fits (not dtype, nor training knobs)."""
    return {k: v for k, v in config.to_hf_dict().items() if k not in _NOT_ARCHITECTURE}


def adapter_record(model: nn.Module, info: dict | None, base_path=None) -> tuple[str, dict]:
    """(the base checkpoint's absolute path, the adapter's daulat.json): `info` with its "lora" entry
    holding what was trained, the base and the base's architecture (so a wrong base is refused)."""
    if not is_lora(model):
        raise DaulatError("save_adapter: this model has no LoRA adapters (see daulat.lora.apply_lora)")
    base = base_path if base_path is not None else model.lora.base_path
    if base is None:
        raise DaulatError("save_adapter: no base checkpoint given for base_model_name_or_path")
    base = str(Path(base).resolve())
    record = dict(info or {})
    trained = {**asdict(model.lora.config), "targets": model.lora.targets}
    record["lora"] = {**trained, **(record.get("lora") or {}), "base": base,
                      "base_architecture": _architecture(model.config)}
    return base, record


def save_adapter(model: nn.Module, path, base_path=None, info: dict | None = None, *, tokenizer=None,
                 train_state: dict | None = None, model_card: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters as a PEFT directory at `path`, atomically (temporary directory, then
    rename, as daulat.checkpoint.save_model does). The base is never written. `daulat.save_model`
    (report.save_documented) calls this for a LoRA model and adds the model card.

    base_path: the base checkpoint (default: the one given to `prepare`); stored absolute.
    info: daulat's record (daulat.json; its "lora" entry gets the base's architecture either way).
    train_state: {"tensors", "meta"} for exact resume, as save_model writes it (train_state/).
    model_card: Markdown written as README.md when given.
    tensors: `adapter_state_dict(model)` when it was gathered already (FSDP: every rank gathers,
        rank 0 writes).
    """
    base, record = adapter_record(model, info, base_path)
    if Path(path).resolve() == Path(base):
        raise DaulatError(f"save_adapter: {path} is the base checkpoint itself; the base is never written")
    files = {ADAPTER_WEIGHTS: tensors if tensors is not None else adapter_state_dict(model),
             ADAPTER_CONFIG: adapter_config(model, base), INFO_FILE: record}
    return _write_atomically(Path(path), files, tokenizer, model_card, train_state)


@contextmanager
def staged_directory(path: Path):
    """`with staged_directory(path) as tmp:` fill `tmp`; on success it becomes `path` whole (files made
    durable first, the previous directory replaced with daulat.checkpoint's helpers), on any error it
    is removed. The temporary name is the one the Trainer's clean-up knows (.NAME.tmp-*)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))  # private (0700) meanwhile
    except OSError as e:
        raise DaulatError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        for file in (f for f in tmp.rglob("*") if f.is_file()):
            with open(file, "rb+") as fh:
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # as mkdir would have made it
        fsync_dir(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_atomically(path: Path, files: dict, tokenizer, model_card: str | None, train_state: dict | None) -> Path:
    """Write `files` (name -> tensors for .safetensors, JSON otherwise), the tokenizer, the model card
    and the train state as the directory `path`, atomically."""
    if train_state is not None:
        files[f"{TRAIN_STATE_DIR}/state.safetensors"] = train_state.get("tensors", {})
        files[f"{TRAIN_STATE_DIR}/state.json"] = train_state.get("meta", {})
    with staged_directory(path) as tmp:
        if train_state is not None:
            (tmp / TRAIN_STATE_DIR).mkdir()
        for name, content in files.items():
            if name.endswith(".safetensors"):
                tensors = {k: v.detach().cpu().contiguous() for k, v in content.items()}
                save_file(tensors, tmp / name, metadata={"format": "pt"})
            else:
                write_json(tmp / name, content)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
    return path


def is_adapter_dir(path) -> bool:
    """Whether `path` is an adapter directory (adapter_config.json) rather than a checkpoint."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path) -> dict:
    """adapter_config.json, checked for what daulat applies: plain LoRA (no DoRA, rsLoRA, bias or extra
    trained modules), r > 0. A bad field is a one-line DaulatError naming the file and the field."""
    file = Path(path) / ADAPTER_CONFIG
    config = read_json(file)
    plain = {"peft_type": "LORA", "use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
             "fan_in_fan_out": False}
    for key, expected in plain.items():
        value = config.get(key, expected if key != "peft_type" else None)
        if value != expected and not (key == "modules_to_save" and value == []):
            raise DaulatError(f"{file}: {key} = {value!r}: daulat reads plain LoRA adapters ({key} = {expected!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise DaulatError(f"{file}: {key} = {config[key]!r}: not supported (one rank and alpha for every layer)")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise DaulatError(f"{file}: r = {r!r}: must be a positive integer")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise DaulatError(f"{file}: lora_alpha = {alpha!r}: must be positive")
    return config


def resolve_base(path) -> Path:
    """The base checkpoint an adapter names: an absolute base_model_name_or_path as it is, a relative one
    beside the adapter directory first, then from the current directory."""
    path = Path(path)
    file = path / ADAPTER_CONFIG
    base = read_adapter_config(path).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise DaulatError(f"{file}: base_model_name_or_path is missing: the adapter does not name its base")
    candidates = [Path(base)] if Path(base).is_absolute() else [path / base, path.parent / base, Path(base)]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise DaulatError(f"{file}: base_model_name_or_path {base!r}: no checkpoint there (missing config.json)")


def _adapter_modules(tensors: dict[str, torch.Tensor], file: Path) -> list[str]:
    """The adapted layers named by an adapter file's tensors (daulat's module names, in file order)."""
    modules = []
    for key in tensors:
        stem, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or part not in ("A.weight", "B.weight"):
            raise DaulatError(f"{file}: unexpected tensor {key!r} (expected {PEFT_PREFIX}...lora_A.weight / lora_B.weight)")
        if stem not in modules:
            modules.append(stem)
    if not modules:
        raise DaulatError(f"{file}: holds no adapter tensors")
    return modules


@torch.no_grad()
def fill_adapter(model: nn.Module, path) -> None:
    """Copy an adapter directory's tensors into `model`'s adapters (which must be exactly the layers
    and ranks the directory holds): for loading, and for resuming a LoRA run."""
    file = Path(path) / ADAPTER_WEIGHTS
    tensors = read_safetensors(file)
    layers = adapter_units(model)
    for name in _adapter_modules(tensors, file):
        if name not in layers:
            raise DaulatError(f"{file}: adapts {'model.' + name!r}, which this model does not adapt")
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            weight = getattr(layer, part).weight
            if key not in tensors:
                raise DaulatError(f"{file}: missing tensor {key!r}")
            if tuple(tensors[key].shape) != tuple(weight.shape):
                raise DaulatError(f"{file}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                  f"the model's adapter has {tuple(weight.shape)}")
            weight.copy_(tensors[key])


def check_base(path, base, base_config) -> None:
    """Refuse a base (the checkpoint `base`, whose ModelConfig is `base_config`) whose architecture differs from the one the adapter was trained on
    (as recorded in its daulat.json; an adapter written elsewhere is checked by its tensors' shapes alone)."""
    info_file = Path(path) / INFO_FILE
    recorded = (read_json(info_file).get("lora") or {}).get("base_architecture") if info_file.is_file() else None
    if not recorded:
        return
    actual = _architecture(base_config)
    differ = [k for k in sorted(set(recorded) | set(actual)) if recorded.get(k) != actual.get(k)]
    if differ:
        k = differ[0]
        raise DaulatError(f"{Path(base) / 'config.json'}: {k} = {actual.get(k)!r}, but the adapter {path} was "
                          f"trained on a base with {k} = {recorded.get(k)!r}")


def attach_adapter(base_checkpoint: Checkpoint, path, base, *, merge: bool = False) -> Checkpoint:
    """The adapter directory `path` put onto its base, already loaded (daulat.checkpoint.load_checkpoint
    reads an adapter directory this way): `model, tokenizer, info`.

    The adapters are float32. merge=True folds them into the weights (plain model, fastest for
    inference); otherwise they stay live (trainable, or switched off with `adapters_disabled`).
    tokenizer: the adapter's own if it has one, else the base's. info: the adapter's daulat.json ({}
    when it has none).
    """
    path = Path(path)
    config = read_adapter_config(path)
    file = path / ADAPTER_WEIGHTS
    modules = _adapter_modules(read_safetensors(file), file)
    model, tokenizer, _ = base_checkpoint
    experts = [m for m in modules if m.endswith(tuple("." + leaf for leaf in EXPERT_PARAMETERS.values()))]
    modules = [m for m in modules if m not in experts]
    candidates = _target_linears(model, None)
    missing = [m for m in modules if m not in candidates]
    if missing:
        raise DaulatError(f"{file}: adapts {'model.' + missing[0]!r}, which base {base} has no such linear layer for")
    info = read_json(path / INFO_FILE) if (path / INFO_FILE).is_file() else {}
    dropout = (info.get("lora") or {}).get("dropout", config.get("lora_dropout") or 0.0)  # as trained
    lora_config = LoraConfig(rank=config["r"], alpha=float(config.get("lora_alpha", 8)), dropout=float(dropout),
                             targets=modules, experts=bool(experts))
    prepare(model, lora_config, base)
    fill_adapter(model, path)
    if (path / "tokenizer.json").is_file():
        from daulat.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    if merge:
        merge_lora(model)
    return Checkpoint(model.eval(), tokenizer, info)


def resume_into(model: nn.Module, path) -> None:
    """The Trainer's resume of a LoRA run: `model` (prepared as the run was) gets the adapters of the step
    checkpoint `path`, which must be an adapter directory trained on this base's architecture."""
    path = Path(path)
    if not is_adapter_dir(path):
        raise DaulatError(f"cannot resume a LoRA run from {path}: it is not an adapter directory ({ADAPTER_CONFIG})")
    recorded = (read_json(path / INFO_FILE).get("lora") or {}) if (path / INFO_FILE).is_file() else {}
    ours = _architecture(model.config)
    theirs = recorded.get("base_architecture") or ours
    differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differ:
        k = differ[0]
        raise DaulatError(f"cannot resume from {path}: its base's {k} is {theirs.get(k)!r}, this run's is {ours.get(k)!r}")
    fill_adapter(model, path)
