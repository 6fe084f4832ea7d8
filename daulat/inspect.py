"""`daulat inspect PATH`: a checkpoint's architecture, parameter counts and KV-cache size per token."""

from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("path", nargs="?", help="checkpoint directory (daulat's or transformers' save_pretrained, an "
                   "open-weight release, or a LoRA adapter directory: its base is described)")
    p.add_argument("--preset", help="inspect a preset's architecture instead of a checkpoint")
    p.add_argument("--verify", action="store_true", help="also read every weight (finite values, FP8 scales "
                   "applied); by default only config.json and the tensor headers are read and checked")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def describe(model) -> dict:
    """The facts `inspect` prints, as a dict."""
    from daulat.model_v4 import ModelConfigV4

    return (_describe_v4 if isinstance(model.config, ModelConfigV4) else _describe_mla)(model)


def _describe_v4(model) -> dict:
    """DeepSeek-V4: shared-KV multi-query attention, sliding / compressed sparse / heavily compressed."""
    from collections import Counter

    from daulat.export import vllm_fit
    from daulat.model_v4 import kv_cache_bytes_per_token_v4

    c = model.config
    kv = kv_cache_bytes_per_token_v4(c, bytes_per_number=2)
    return {
        "architecture": "DeepseekV4 (shared-KV attention: sliding window, compressed sparse, heavily compressed; "
                        "hyper-connections; DeepSeekMoE)",
        "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
        "attention": {"heads": c.num_attention_heads, "key_value_heads": c.num_key_value_heads,
                      "head_dim": c.head_dim, "qk_rope_head_dim": c.qk_rope_head_dim, "q_lora_rank": c.q_lora_rank,
                      "sliding_window": c.sliding_window, "layer_types": dict(Counter(c.layer_types)),
                      "compress_rates": c.compress_rates, "index_topk": c.index_topk},
        "hyper_connections": c.hc_mult,
        "moe": {"routed_experts": c.n_routed_experts, "shared_experts": c.n_shared_experts,
                "experts_per_token": c.num_experts_per_tok, "expert_width": c.moe_intermediate_size,
                "layer_types": dict(Counter(c.mlp_layer_types)), "scoring": c.scoring_func},
        "parameters_total": model.num_parameters(),
        "parameters_active_per_token": model.num_parameters(active=True),
        "kv_cache_bytes_per_token_bf16": {"compressed": round(kv["v4"], 2), "full_per_head_kv": kv["mha"],
                                          "saving": round(kv["saving"], 4),
                                          "window_keys_per_layer": c.sliding_window - 1},
        "vllm": vllm_fit(c),
    }


def _describe_mla(model) -> dict:
    """DeepSeek-V3 and V3.2: MLA (+ the lightning indexer) and DeepSeekMoE."""
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


def _model(args):
    """(model, source): a preset's on the meta device, a checkpoint's from its headers (an adapter
    directory's base), or with --verify the checkpoint loaded whole."""
    import torch

    from daulat import lora
    from daulat.checkpoint import load_checkpoint, read_headers
    from daulat.errors import DaulatError

    if (args.path is None) == (args.preset is None):
        raise DaulatError("give a checkpoint PATH or --preset NAME (one of them)")
    if args.preset:
        from daulat.architectures import ModelSection, build_model
        from daulat.config import load_config

        with torch.device("meta"):
            return build_model(load_config({"model": ModelSection}, preset=args.preset)["model"]), f"preset {args.preset}"
    if args.verify:
        return load_checkpoint(args.path).model, args.path
    if lora.is_adapter_dir(args.path):
        base = lora.resolve_base(args.path)
        return read_headers(base).model, f"{args.path} (a LoRA adapter on {base})"
    return read_headers(args.path).model, args.path


def run(args) -> int:
    model, source = _model(args)
    facts = describe(model)
    if args.json:
        print(json.dumps({"source": source, **facts}))
        return 0
    print(f"{source}: {facts['architecture']}")
    if "hyper_connections" in facts:
        _print_v4(facts)
    else:
        _print_mla(facts)
    print(f"  vLLM                {facts['vllm']}")
    return 0


def _print_v4(facts: dict) -> None:
    a, m, kv = facts["attention"], facts["moe"], facts["kv_cache_bytes_per_token_bf16"]
    kinds = ", ".join(f"{n} {k}" for k, n in a["layer_types"].items())
    print(f"  layers              {facts['layers']} ({kinds}), hidden {facts['hidden_size']}, "
          f"vocab {facts['vocab_size']}, {facts['hyper_connections']} hyper-connection streams")
    print(f"  attention           {a['heads']} query heads, {a['key_value_heads']} shared key/value head of dim "
          f"{a['head_dim']} ({a['qk_rope_head_dim']} rotated), q_lora_rank {a['q_lora_rank']}, window "
          f"{a['sliding_window']}, compression {a['compress_rates']}, top-{a['index_topk']} compressed entries")
    print(f"  MoE                 {m['routed_experts']} routed + {m['shared_experts']} shared experts of width"
          f" {m['expert_width']}, top-{m['experts_per_token']}, {m['scoring']} routing, {m['layer_types']}")
    print(f"  parameters          {_human(facts['parameters_total'])} total, "
          f"{_human(facts['parameters_active_per_token'])} active per token")
    print(f"  KV cache per token  {kv['compressed']:,} bytes past the window (bf16; plus "
          f"{kv['window_keys_per_layer']} window keys per layer) vs {kv['full_per_head_kv']:,} bytes for full "
          f"per-head K/V: {kv['saving']:.1%} less")


def _print_mla(facts: dict) -> None:
    a, m, kv = facts["attention"], facts["moe"], facts["kv_cache_bytes_per_token_bf16"]
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
