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
            licence = source.get("licence") or source.get("license")  # the manifest spells it "licence"
            if licence:
                licences.add(licence)
    return licences.pop() if len(licences) == 1 else "other"


def _data_summary(stage: dict) -> dict:
    data = dict(stage.get("data") or {})
    manifest = data.pop("manifest", None)
    if manifest:  # daulat.data.corpus: sources, files [{path, bytes, sha256, licence}], documents, bytes, skipped
        files = manifest.get("files", [])
        data["files"] = len(files)
        data["documents"] = manifest.get("documents", len(files))
        data["bytes"] = manifest.get("bytes", sum(f.get("bytes", 0) for f in files))
        data["sources"] = manifest.get("sources", [])
        data["skipped"] = {k: v for k, v in (manifest.get("skipped") or {}).items() if v}
        data["sha256"] = [f.get("sha256") for f in files][:1000]
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
            licence = source.get("licence") or source.get("license") or "unspecified"
            lines.append(f"  - source `{source.get('path')}`: licence {licence}")
        if d.get("skipped"):
            lines.append(f"  - skipped: {json.dumps(d['skipped'])}")
    lines += ["", "The full manifest (every document's path, bytes and sha256) is in `daulat.json`.", "",
              "## Compute and energy", "",
              f"- Training compute: {card['compute_flops']:.3g} FLOPs (6 x active parameters x tokens, plus attention)",
              f"- Training time: {card['training_time_s']:.0f} s",
              f"- Hardware: {', '.join(card['hardware']) or 'not recorded'}",
              f"- Energy: {card['energy']['kwh']:.4g} kWh, estimated ({card['energy']['assumptions']})", ""]
    return "\n".join(front + lines)


def save_documented(model, path, tokenizer=None, info: dict | None = None, train_state: dict | None = None,
                    card: str | None = None, **kwargs):
    """Save a checkpoint that documents itself: daulat.json and the model card rendered from it.

    This is `daulat.save_model`, and what the Trainer calls with its stage record (daulat/provenance.py).
    Without a record, a minimal one says when, where and what was saved, so that even a model saved by
    hand from Python has a card with a "How it was made" section. card: a card to keep instead (an
    export carries its source's). Other keywords go to daulat.checkpoint.save_model.
    """
    from daulat.checkpoint import save_model

    record = dict(info) if info else {"stage": "save_model",
                                      "method": "saved from Python with daulat.save_model; no training record given"}
    record.setdefault("created", _now())
    if "environment" not in record:
        from daulat.provenance import environment

        record["environment"] = environment()
    record.setdefault("architecture", {"model_type": "deepseek_v3", "parameters_total": model.num_parameters(),
                                       "parameters_active": model.num_parameters(active=True),
                                       "config": model.config.to_hf_dict()})
    return save_model(model, path, tokenizer=tokenizer, info=record, train_state=train_state,
                      model_card=card or model_card(model, record), **kwargs)


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def add_arguments(p):
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the Annex XI fields as one JSON object")


def run(args) -> int:
    from daulat.checkpoint import load_checkpoint

    model, _, info = load_checkpoint(args.path)
    if args.json:
        print(json.dumps(annex_xi(model, info), default=str))
    else:
        print(model_card(model, info))
    return 0


# ------------------------------------------------------------------------------------------------
# Report card of a pipeline run (daulat speedrun): tables and plots from the runs' own metrics files
# ------------------------------------------------------------------------------------------------


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    from pathlib import Path

    records = []
    file = Path(path)
    if not file.is_file():
        return records
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict], key: str) -> tuple[list, list]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _last(records: list[dict], key: str):
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def stage_row(name: str, stage_dir, evaluation: dict | None) -> dict:
    """One row of the report's stage table, every number read from the stage's files."""
    from pathlib import Path

    from daulat.checkpoint import load_info

    stage_dir = Path(stage_dir)
    records = read_metrics(stage_dir / "metrics.jsonl")
    info = load_info(stage_dir / "final") if (stage_dir / "final").is_dir() else {}
    compute = info.get("compute", {})
    row = {
        "stage": name,
        "wall_time_s": compute.get("wall_time_s"),
        "tokens": compute.get("tokens", _last(records, "tokens")),
        "flops": compute.get("flops"),
        "parameters_total": compute.get("parameters_total"),
        "parameters_active": compute.get("parameters_active"),
        "final_loss": _last(records, "loss"),
        "final_val_loss": _last(records, "val_loss"),
    }
    if evaluation:  # held-out task accuracy of the stage's final checkpoint
        row["accuracy"] = evaluation.get("accuracy")
        for k, v in (evaluation.get("pass@k") or {}).items():
            row[f"pass@{k}"] = v
        row["answer_tokens"] = evaluation.get("mean_answer_tokens")
    return row


def plot_stages(stages: dict, out_dir) -> list[str]:
    """PNG plots of the stages' metrics in out_dir; returns the file names written."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    metrics = {name: read_metrics(Path(d) / "metrics.jsonl") for name, d in stages.items()}

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, records in metrics.items():
        if name == "grpo":  # a policy-gradient surrogate, not a likelihood: it has its own plot
            continue
        for key, style in (("loss", "-"), ("val_loss", "o--")):
            x, y = _series(records, key)
            if x:
                ax.plot(x, y, style, label=f"{name} {key}")
    if ax.lines:
        ax.set(xlabel="step", ylabel="loss", title="Loss curves")
        _save(fig, ax, out_dir / "loss.png", written)
    plt.close(fig)

    for name, records in metrics.items():
        loads = [(r["step"], r["expert_load_max_over_mean"]) for r in records
                 if isinstance(r.get("expert_load_max_over_mean"), list)]
        if not loads:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for layer in range(len(loads[0][1])):
            ax.plot([s for s, _ in loads], [v[layer] for _, v in loads], label=f"MoE layer {layer}")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="step", ylabel="max / mean tokens per expert", title=f"Expert load balance ({name})")
        _save(fig, ax, out_dir / f"expert_load_{name}.png", written)
        plt.close(fig)

    for name, records in metrics.items():
        keys = [k for k in ("reward_mean", "accuracy", "eval_accuracy", "val_accuracy")
                if _series(records, k)[0]]
        if not keys or name == "pretrain":
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            x, y = _series(records, key)
            ax.plot(x, y, marker="." if len(x) < 40 else None, label=key)
        ax.set(xlabel="step", title=f"{name}: reward and accuracy")
        _save(fig, ax, out_dir / f"curves_{name}.png", written)
        plt.close(fig)
    return written


def _save(fig, ax, file, written: list[str]) -> None:
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    written.append(file.name)


def _table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    return lines


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def write_report(out_dir, stages: dict, evaluations: dict, title: str = "daulat report card",
                 extra: dict | None = None) -> dict:
    """OUT/report.md, OUT/report.html (self-contained: plots embedded) and the PNGs.

    stages: name -> stage output directory (holding metrics.jsonl and final/);
    evaluations: name -> the eval JSON of that stage's final checkpoint.
    Returns {"rows": [...], "plots": [...]}.
    """
    import base64
    import html
    from pathlib import Path

    out_dir = Path(out_dir)
    rows = [stage_row(name, d, evaluations.get(name)) for name, d in stages.items()]
    plots = plot_stages(stages, out_dir)
    md = [f"# {title}", ""]
    for key, value in (extra or {}).items():
        md.append(f"- {key}: {value}")
    md += ["", "## Stages", "", *_table(rows), "", "## Plots", ""]
    md += [f"![{p}]({p})" for p in plots]
    (out_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    body = [f"<h1>{html.escape(title)}</h1>", "<ul>"]
    body += [f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in (extra or {}).items()]
    body += ["</ul>", "<h2>Stages</h2>", "<table>"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    body.append("<tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>")
    for r in rows:
        body.append("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(k)))}</td>" for k in keys) + "</tr>")
    body += ["</table>", "<h2>Plots</h2>"]
    for p in plots:
        data = base64.b64encode((out_dir / p).read_bytes()).decode()
        body.append(f'<figure><img alt="{p}" src="data:image/png;base64,{data}"><figcaption>{p}</figcaption></figure>')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    return {"rows": rows, "plots": plots}
