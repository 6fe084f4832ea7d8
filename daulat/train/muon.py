"""Muon for MLA + MoE, with AdamW for what is not a matrix, and QK-clip (Kimi-K2's MuonClip).

Muon (Keller Jordan 2024; Moonlight, arXiv 2502.16982) replaces a weight matrix's update by the
orthogonalised momentum of its gradient: U = NS(M) ~ U_G V_G^T, made by five steps of the quintic
Newton-Schulz iteration. Here:

  * 2-D weight matrices (attention projections, dense and shared-expert MLPs, the router, MTP's
    eh_proj) are one matrix each;
  * the stacked routed experts are handled per expert, batched: `down_proj` [E, D, I] is E matrices
    [D, I]; `gate_up_proj` [E, 2I, D] is 2E matrices [I, D], because gate and up are two separate
    weight matrices fused only for speed (transformers and the dense MLP hold them apart as
    `gate_proj` / `up_proj`): orthogonalising the fused [2I, D] would couple the two halves'
    singular directions and give a different update from a per-expert `gate_proj`/`up_proj` Muon;
  * every other parameter (token embedding, output head, norms, biases) takes AdamW; the router's
    correction bias is a buffer moved by the aux-loss-free rule, no optimizer touches it;
  * Moonlight's RMS matching: the update of an A x B matrix is scaled by 0.2 * sqrt(max(A, B)), so
    its RMS is about AdamW's and AdamW-tuned learning rates and weight decay carry over; weight
    decay is decoupled (p <- p * (1 - lr * wd)), as in AdamW;
  * momentum and Nesterov follow torch.optim.Muon (buf <- lerp(buf, g, 1 - mu), update g.lerp(buf, mu)),
    so that on a 2-D matrix the update is torch.optim.Muon's with adjust_lr_fn="match_rms_adamw".

State per parameter, saved in train_state/ for exact resume: Muon's `momentum_buffer`; AdamW's
`step`, `exp_avg`, `exp_avg_sq` (torch.optim.AdamW's names and arithmetic).

QK-clip (Kimi K2, arXiv 2507.20534, section 2.1): the model tracks each attention head's largest
logit during the training forward (only when asked: `MLA.max_logit`); after the optimizer step every
head whose maximum S exceeds tau is rescaled by gamma = tau / S: its q_nope and k_nope rows (in
q_proj or q_b_proj, and kv_b_proj) by sqrt(gamma) and its q_rope rows by gamma, so that its logits
scale by gamma; the shared rotary key (kv_a_proj_with_mqa) and the values are left alone.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: the steepest slope at zero
NS_EPS = 1e-7


def orthogonalize(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G [..., A, B] -> about U V^T of each matrix's SVD (singular values pushed into ~[0.7, 1.2]).
    Batched over the leading dims; computed in `dtype` (bf16 on GPU, as Muon is usually run)."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix X X^T is then the smaller one
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = X @ X.mT
        X = a * X + (b * gram + c * gram @ gram) @ X
    return X.mT if tall else X


def rms_scale(rows: int, cols: int) -> float:
    """Moonlight's factor: an orthogonal A x B update has RMS 1/sqrt(max(A, B)); times 0.2 sqrt(max(A, B))
    gives AdamW's typical update RMS of about 0.2."""
    return 0.2 * math.sqrt(max(rows, cols))


class Muon(torch.optim.Optimizer):
    """One optimizer over the whole model: groups with `muon=True` take Muon, the others AdamW.

    A Muon group's parameters are 2-D [A, B] or stacked [E, R, C]; `split` (default 1) says into how
    many row blocks each stacked matrix falls (2 for gate_up_proj: gate rows, then up rows).
    Hyper-parameters per group as in torch's AdamW and Muon: lr, weight_decay, betas, eps (AdamW),
    momentum, nesterov, ns_steps (Muon).
    """

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, muon=False, split=1)
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"] if group["muon"] else []:
                if p.ndim not in (2, 3) or p.shape[-2] % group["split"]:
                    raise ValueError(f"Muon takes matrices or stacks of them, not a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        rows, cols = p.shape[-2] // group["split"], p.shape[-1]
        dtype = self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
        update = orthogonalize(update.reshape(-1, rows, cols), group["ns_steps"], dtype).reshape(p.shape)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"] * rms_scale(rows, cols))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's single-tensor arithmetic (decoupled decay, bias-corrected moments)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        (beta1, beta2), lr, grad = group["betas"], group["lr"], p.grad
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


# ------------------------------------------------------------------------------------------------
# QK-clip
# ------------------------------------------------------------------------------------------------


def attention_modules(model) -> list:
    """The model's MLA modules (main stack and MTP), in order."""
    return [m for m in model.modules() if hasattr(m, "kv_b_proj") and hasattr(m, "max_logit")]


def track_max_logits(model, on: bool = True) -> None:
    """Start (or stop) tracking each head's largest attention logit in the training forward."""
    for attn in attention_modules(model):
        attn.max_logit = torch.full((attn.n_heads,), float("-inf"), device=attn.kv_b_proj.weight.device) if on else None


def max_logits(model) -> list[torch.Tensor]:
    """Per attention module, [H] largest logit seen since tracking (re)started (-inf: no forward)."""
    return [attn.max_logit for attn in attention_modules(model) if attn.max_logit is not None]


@torch.no_grad()
def qk_clip(model, tau: float) -> int:
    """Rescale every head whose tracked maximum logit exceeds tau (see the module docstring).
    Returns how many heads were clipped."""
    clipped = 0
    for attn in attention_modules(model):
        if attn.max_logit is None:
            continue
        gamma = (tau / attn.max_logit.float()).clamp(max=1.0)  # [H]; 1 for heads within the bound
        over = gamma < 1
        if not over.any():
            continue
        clipped += int(over.sum())
        H, n, r, v = attn.n_heads, attn.nope, attn.rope, attn.v_dim
        q = attn.q_proj if hasattr(attn, "q_proj") else attn.q_b_proj
        q_scale = torch.cat([gamma.sqrt()[:, None].expand(H, n), gamma[:, None].expand(H, r)], dim=1)  # [H, n+r]
        q.weight.mul_(q_scale.reshape(-1, 1).to(q.weight.dtype))
        k_scale = torch.cat([gamma.sqrt()[:, None].expand(H, n), torch.ones(H, v, device=gamma.device)], dim=1)  # [H, n+v]
        attn.kv_b_proj.weight.mul_(k_scale.reshape(-1, 1).to(attn.kv_b_proj.weight.dtype))
    return clipped
