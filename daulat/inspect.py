"""`daulat inspect PATH`: a checkpoint's architecture, parameter counts and KV-cache size per token."""

from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("path", nargs="?", help="checkpoint directory (daulat's or transformers' save_pretrained)")
    p.add_argument("--preset", help="inspect a preset's architecture instead of a checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def describe(model) -> dict:
    """The facts `inspect` prints, as a dict."""
    from daulat.export import vllm_fit
    from daulat.model_v32 import DeepseekV32Config, kv_cache_bytes_per_token

    c = model.config
    kv = kv_cache_bytes_per_token(c, bytes_per_number=2)
    v32 = isinstance(c, DeepseekV32Config)
    return {
        "architecture": "DeepseekV32 (MLA + lightning indexer + DeepSeekMoE)" if v32 else "DeepseekV3 (MLA + DeepSeekMoE)",
        "layers": c.num_hidden_layers,
        "dense_layers": min(c.first_k_dense_replace, c.num_hidden_layers),
        "moe_layers": max(c.num_hidden_layers - c.first_k_dense_replace, 0),
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "attention": {
            "heads": c.num_attention_heads, "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
            "qk_nope_head_dim": c.qk_nope_head_dim, "qk_rope_head_dim": c.qk_rope_head_dim,
            "v_head_dim": c.v_head_dim, "rope_scaling": (c.rope_scaling or {}).get("rope_type", "none"),
        },
        "moe": {
            "routed_experts": c.n_routed_experts, "shared_experts": c.n_shared_experts,
            "experts_per_token": c.num_experts_per_tok, "groups": c.n_group, "topk_groups": c.topk_group,
            "expert_width": c.moe_intermediate_size, "routed_scaling_factor": c.routed_scaling_factor,
        },
        "mtp_depth": c.num_nextn_predict_layers,
        "parameters_total": model.num_parameters(),
        "parameters_active_per_token": model.num_parameters(active=True),
        "sparse_attention": {"index_topk": c.index_topk, "index_heads": c.index_n_heads,
                             "index_head_dim": c.index_head_dim} if v32 else None,
        "kv_cache_bytes_per_token_bf16": {"mla_latent": kv["latent"], "indexer_keys": kv["indexer"],
                                          "total": kv["total"], "full_per_head_kv": kv["mha"],
                                          "saving": round(kv["saving"], 4)},
        "vllm": vllm_fit(c),
    }


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run(args) -> int:
    import torch

    from daulat.checkpoint import load_checkpoint
    from daulat.errors import DaulatError

    if (args.path is None) == (args.preset is None):
        raise DaulatError("give a checkpoint PATH or --preset NAME (one of them)")
    if args.preset:
        from daulat.architectures import ModelSection, build_model
        from daulat.config import load_config

        with torch.device("meta"):
            model = build_model(load_config({"model": ModelSection}, preset=args.preset)["model"])
        source = f"preset {args.preset}"
    else:
        model = load_checkpoint(args.path).model
        source = args.path
    facts = describe(model)
    if args.json:
        print(json.dumps({"source": source, **facts}))
        return 0
    a, m, kv = facts["attention"], facts["moe"], facts["kv_cache_bytes_per_token_bf16"]
    print(f"{source}: {facts['architecture']}")
    print(f"  layers              {facts['layers']} ({facts['dense_layers']} dense, {facts['moe_layers']} MoE)"
          f", hidden {facts['hidden_size']}, vocab {facts['vocab_size']}")
    print(f"  attention (MLA)     {a['heads']} heads, q_lora_rank {a['q_lora_rank']}, kv_lora_rank {a['kv_lora_rank']}"
          f", qk {a['qk_nope_head_dim']}+{a['qk_rope_head_dim']} (rope), v {a['v_head_dim']}"
          f", rope scaling {a['rope_scaling']}")
    print(f"  MoE                 {m['routed_experts']} routed + {m['shared_experts']} shared experts of width"
          f" {m['expert_width']}, top-{m['experts_per_token']}, groups {m['topk_groups']}/{m['groups']}")
    if facts["mtp_depth"]:
        print(f"  MTP depth           {facts['mtp_depth']}")
    print(f"  parameters          {_human(facts['parameters_total'])} total, "
          f"{_human(facts['parameters_active_per_token'])} active per token")
    if facts["sparse_attention"]:
        s = facts["sparse_attention"]
        print(f"  sparse attention    top-{s['index_topk']} keys by a {s['index_heads']}-head indexer of dim"
              f" {s['index_head_dim']}")
    parts = f" + {kv['indexer_keys']:,} indexer keys" if kv["indexer_keys"] else ""
    print(f"  KV cache per token  {kv['total']:,} bytes ({kv['mla_latent']:,} MLA latent{parts}, bf16) vs"
          f" {kv['full_per_head_kv']:,} bytes for full per-head K/V: {kv['saving']:.1%} less")
    print(f"  vLLM                {facts['vllm']}")
    return 0
