"""Model cards: what a checkpoint is and how it was made, for people (README.md with Hugging Face
front matter) and machines (the Annex XI dict), rendered from daulat.json (see daulat/provenance.py).

The fields follow the EU AI Act's Annex XI, section 1, for providers of general-purpose AI models:
general description (tasks, acceptable use, release and distribution, architecture and parameters,
modalities and format, licence) and detailed description (integration, design and training method,
data provenance and curation, compute, energy).

`daulat card CKPT` prints a checkpoint's card (`--json` for the machine-readable form).
"""

from __future__ import annotations

import json

ANNEX_XI_FIELDS = [
    "intended_tasks", "acceptable_use", "release", "architecture", "parameters_total", "parameters_active",
    "modalities", "format", "license", "integration", "training_method", "design_choices", "data",
    "compute_flops", "training_time_s", "hardware", "energy",
]


def _stages(info: dict) -> list[dict]:
    """Every stage record that led to this checkpoint, oldest first, ending with its own."""
    own = {k: v for k, v in info.items() if k != "history"}
    return list(info.get("history", [])) + ([own] if own.get("stage") else [])


def _license(info: dict, stages: list[dict]) -> str:
    if info.get("license"):
        return info["license"]
    licences = set()
    for stage in stages:
        for source in (stage.get("data") or {}).get("manifest", {}).get("sources", []):
            if source.get("license"):
                licences.add(source["license"])
    return licences.pop() if len(licences) == 1 else "other"


def _data_summary(stage: dict) -> dict:
    data = dict(stage.get("data") or {})
    manifest = data.pop("manifest", None)
    if manifest:
        documents = manifest.get("documents", manifest.get("files", []))
        data["documents"] = len(documents) if isinstance(documents, list) else documents
        data["bytes"] = manifest.get("total_bytes", sum(d.get("bytes", 0) for d in documents)
                                     if isinstance(documents, list) else None)
        data["sources"] = manifest.get("sources", [])
        data["skipped"] = manifest.get("skipped", {})
        data["sha256"] = [d.get("sha256") for d in documents][:1000] if isinstance(documents, list) else None
    return data


def annex_xi(model, info: dict) -> dict:
    """The machine-readable card: every ANNEX_XI_FIELDS key filled from the model and its history."""
    c = model.config
    stages = _stages(info)
    flops = sum(float((s.get("compute") or {}).get("flops", 0) or 0) for s in stages)
    seconds = sum(float((s.get("compute") or {}).get("wall_time_s", 0) or 0) for s in stages)
    kwh = sum(float(((s.get("compute") or {}).get("energy") or {}).get("kwh", 0) or 0) for s in stages)
    assumptions = sorted({((s.get("compute") or {}).get("energy") or {}).get("assumptions", "") for s in stages} - {""})
    hardware = []
    for s in stages:
        env = s.get("environment") or {}
        hw = env.get("gpu") or env.get("cpu")
        if hw and hw not in hardware:
            hardware.append(hw)
    return {
        "name": info.get("name", "daulat model"),
        "intended_tasks": info.get("intended_tasks", "Text generation and chat in the domain of its training data; "
                                   "research and internal use by the organisation that trained it."),
        "acceptable_use": info.get("acceptable_use", "Not for decisions about people or safety-critical control "
                                   "without human review; outputs can be wrong."),
        "release": {"date": (stages[-1].get("created") if stages else None),
                    "distribution": "a transformers deepseek_v3 checkpoint directory (safetensors + JSON); "
                                    "GGUF via `daulat export`"},
        "architecture": (f"DeepSeek-V3 decoder (MLA + DeepSeekMoE): {c.num_hidden_layers} layers "
                         f"({c.first_k_dense_replace} dense), hidden {c.hidden_size}, {c.num_attention_heads} heads, "
                         f"kv_lora_rank {c.kv_lora_rank}, {c.n_routed_experts} routed + {c.n_shared_experts} shared "
                         f"experts, top-{c.num_experts_per_tok}"),
        "parameters_total": model.num_parameters(),
        "parameters_active": model.num_parameters(active=True),
        "modalities": {"input": "text", "output": "text"},
        "format": "safetensors weights, JSON config (model_type deepseek_v3), tokenizers BPE tokenizer.json",
        "context_length": c.max_position_embeddings,
        "license": _license(info, stages),
        "integration": "transformers AutoModelForCausalLM / vLLM / llama.cpp (GGUF); `daulat serve` "
                       "(OpenAI-compatible API)",
        "training_method": [{"stage": s.get("stage"), "method": s.get("method"), "metrics": s.get("metrics", {}),
                             "seed": (s.get("config") or {}).get("train", {}).get("seed", s.get("seed"))}
                            for s in stages],
        "design_choices": "Multi-head Latent Attention to shrink the KV cache; fine-grained experts with shared "
                          "experts for compute per token; auxiliary-loss-free load balancing; objectives: "
                          "next-token prediction, then supervised and reinforcement learning on checked answers.",
        "data": [{"stage": s.get("stage"), **_data_summary(s)} for s in stages],
        "compute_flops": flops,
        "training_time_s": seconds,
        "hardware": hardware,
        "energy": {"kwh": kwh, "assumptions": "; ".join(assumptions) or "not recorded"},
    }


def missing_fields(card: dict) -> list[str]:
    """Annex XI fields of `card` that are absent or empty (a complete card returns [])."""
    def empty(v):
        return v is None or v == "" or v == [] or v == {} or (isinstance(v, (int, float)) and v <= 0)

    missing = [f for f in ANNEX_XI_FIELDS if empty(card.get(f))]
    if not empty(card.get("energy")) and empty(card["energy"].get("kwh")):
        missing.append("energy")
    for d in card.get("data") or []:
        if len(d) <= 1:  # only the stage name: nothing said about its data
            missing.append(f"data[{d.get('stage')}]")
    return missing


def model_card(model, info: dict) -> str:
    """README.md in the Hugging Face model-card convention (YAML front matter + Markdown)."""
    card = annex_xi(model, info)
    stages = [s["stage"] for s in card["training_method"] if s.get("stage")]
    tags = ["daulat", "deepseek_v3", "mixture-of-experts", "multi-head-latent-attention", *stages]
    front = ["---", f"license: {card['license']}", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", *[f"- {t}" for t in dict.fromkeys(tags)], "---", ""]
    lines = [f"# {card['name']}", "", card["intended_tasks"], "",
             "## Model", "",
             f"- Architecture: {card['architecture']}",
             f"- Parameters: {card['parameters_total']:,} total, {card['parameters_active']:,} active per token",
             f"- Modalities: {card['modalities']['input']} in, {card['modalities']['output']} out; "
             f"context {card['context_length']} tokens",
             f"- Format: {card['format']}",
             f"- Licence: {card['license']}",
             f"- Use with: {card['integration']}",
             f"- Acceptable use: {card['acceptable_use']}", "",
             "## How it was made", ""]
    for stage in card["training_method"]:
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in (stage.get("metrics") or {}).items()
                            if isinstance(v, (int, float)))
        lines.append(f"- **{stage['stage']}**: {stage.get('method') or ''}" + (f" ({metrics})" if metrics else ""))
    lines += ["", f"Design: {card['design_choices']}", "", "## Data", ""]
    for d in card["data"]:
        parts = [f"{k} {_fmt(v)}" for k, v in d.items()
                 if k not in ("stage", "sources", "sha256", "skipped") and isinstance(v, (int, float, str))]
        lines.append(f"- **{d['stage']}**: " + (", ".join(parts) or "see daulat.json"))
        for source in d.get("sources") or []:
            lines.append(f"  - source `{source.get('path')}`: licence {source.get('license') or 'unspecified'}")
        if d.get("skipped"):
            lines.append(f"  - skipped: {json.dumps(d['skipped'])}")
    lines += ["", "The full manifest (every document's path, bytes and sha256) is in `daulat.json`.", "",
              "## Compute and energy", "",
              f"- Training compute: {card['compute_flops']:.3g} FLOPs (6 x active parameters x tokens, plus attention)",
              f"- Training time: {card['training_time_s']:.0f} s",
              f"- Hardware: {', '.join(card['hardware']) or 'not recorded'}",
              f"- Energy: {card['energy']['kwh']:.4g} kWh, estimated ({card['energy']['assumptions']})", ""]
    return "\n".join(front + lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def add_arguments(p):
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the Annex XI fields as one JSON object")


def run(args) -> int:
    from daulat.checkpoint import load_info, load_model

    model = load_model(args.path)
    info = load_info(args.path)
    if args.json:
        print(json.dumps(annex_xi(model, info), default=str))
    else:
        print(model_card(model, info))
    return 0
