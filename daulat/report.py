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


def _architecture(c) -> str:
    """The model card's one-line description of the architecture of config `c`."""
    moe = (f"{c.n_routed_experts} routed + {c.n_shared_experts} shared experts, top-{c.num_experts_per_tok}")
    if c.model_type == "deepseek_v4":
        return (f"DeepSeek-V4 decoder (shared-KV multi-query attention with a {c.sliding_window}-token sliding "
                f"window, compressed sparse and heavily compressed attention, {c.hc_mult} hyper-connection "
                f"streams, DeepSeekMoE): {c.num_hidden_layers} layers ({', '.join(c.layer_types)}), hidden "
                f"{c.hidden_size}, {c.num_attention_heads} heads of {c.head_dim}, {moe}")
    sparse = (f"MLA with DeepSeek Sparse Attention: a lightning indexer picks {c.index_topk} keys per query"
              if c.model_type == "deepseek_v32" else "MLA")
    name = "DeepSeek-V3.2" if c.model_type == "deepseek_v32" else "DeepSeek-V3"
    return (f"{name} decoder ({sparse} + DeepSeekMoE): {c.num_hidden_layers} layers ({c.first_k_dense_replace} "
            f"dense), hidden {c.hidden_size}, {c.num_attention_heads} heads, kv_lora_rank {c.kv_lora_rank}, {moe}")


def annex_xi(model, info: dict) -> dict:
    """The machine-readable card: every ANNEX_XI_FIELDS key filled from the model and its history."""
    c = model.config
    v3 = c.model_type == "deepseek_v3"  # what llama.cpp (GGUF) takes
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
                    "distribution": f"a transformers {c.model_type} checkpoint directory (safetensors + JSON)"
                                    + ("; GGUF via `daulat export`" if v3 else "")},
        "architecture": _architecture(c),
        "parameters_total": model.num_parameters(),
        "parameters_active": model.num_parameters(active=True),
        "modalities": {"input": "text", "output": "text"},
        "format": f"safetensors weights, JSON config (model_type {c.model_type}), tokenizers BPE tokenizer.json",
        "context_length": c.max_position_embeddings,
        "license": _license(info, stages),
        "integration": ("transformers AutoModelForCausalLM / vLLM / llama.cpp (GGUF)" if v3 else
                        "transformers AutoModelForCausalLM") + "; `daulat serve` (OpenAI-compatible API)",
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
    attention = {"deepseek_v4": "compressed-sparse-attention", "deepseek_v32": "deepseek-sparse-attention"}
    tags = ["daulat", model.config.model_type, "mixture-of-experts",
            attention.get(model.config.model_type, "multi-head-latent-attention"), *stages]
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
    export carries its source's). Other keywords go to daulat.checkpoint.save_model, or for a model
    with LoRA adapters to daulat.lora.save_adapter, which writes a PEFT adapter directory instead.
    """
    from daulat import lora
    from daulat.checkpoint import save_model

    record = dict(info) if info else {"stage": "save_model",
                                      "method": "saved from Python with daulat.save_model; no training record given"}
    record.setdefault("created", _now())
    if "environment" not in record:
        from daulat.provenance import environment

        record["environment"] = environment()
    record.setdefault("architecture", {"model_type": model.config.model_type, "parameters_total": model.num_parameters(),
                                       "parameters_active": model.num_parameters(active=True),
                                       "config": model.config.to_hf_dict()})
    if lora.is_lora(model):
        _, record = lora.adapter_record(model, record)
        return lora.save_adapter(model, path, info=record, tokenizer=tokenizer, train_state=train_state,
                                 model_card=card or model_card(model, record), **kwargs)
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
#
# What a newcomer reads after `daulat speedrun`: whether the model passes its task (one sentence, against
# TARGETS), a table of the stages, the distillation against the same student trained directly, the
# accuracy by stage, each stage's loss on its own axis, and a few held-out problems with each stage's
# answer. Every number is read from the stages' metrics.jsonl, daulat.json and OUT/eval/STAGE.json.

STAGE_TITLES = {"pretrain": "pretrained", "sft": "SFT", "grpo": "GRPO", "distill": "distilled student",
                "student-direct": "student trained directly"}
# what each stage's `loss` measures (the distillation's depends on its mode)
LOSS_NAMES = {"pretrain": "next-token loss (nats/token)", "sft": "answer-token loss (nats/token)",
              "grpo": "surrogate loss (policy gradient, not a likelihood)",
              "student-direct": "answer-token loss (nats/token)"}
DISTILL_LOSS_NAMES = {"sft": "answer-token loss on teacher answers", "fkl": "forward KL to the teacher",
                      "rkl": "reverse KL to the teacher on its own samples"}
# what the speedrun has to show, each stage against the one before
TARGETS = {"sft_accuracy": 0.60, "grpo_gain": 0.10, "student_share": 0.80, "direct_gain": 0.10, "smaller": 5.0}


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


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion (sensible at 0 and 1, unlike p +- 2 se)."""
    import math

    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def fmt_fraction(v) -> str:
    """An accuracy as the report shows it: three decimals."""
    return "" if v is None else f"{v:.3f}"


def fmt_number(v) -> str:
    """A count or a measurement, rounded for reading: 1,234,567 / 12.3 / 0.0123."""
    if v is None:
        return ""
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 100):
        return f"{int(v):,}"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def _top_pass(evaluation: dict) -> tuple[str | None, float | None]:
    """(k, pass@k) for the largest k measured."""
    passes = evaluation.get("pass@k") or {}
    if not passes:
        return None, None
    k = max(passes, key=int)
    return k, passes[k]


def stage_row(name: str, stage_dir, evaluation: dict | None) -> dict:
    """One row of the report's stage table as numbers, every one read from the stage's files."""
    from pathlib import Path

    from daulat.checkpoint import load_info

    stage_dir = Path(stage_dir)
    records = read_metrics(stage_dir / "metrics.jsonl")
    info = load_info(stage_dir / "final") if (stage_dir / "final").is_dir() else {}
    compute = info.get("compute", {})
    evaluation = evaluation or {}
    k, top = _top_pass(evaluation)
    return {
        "stage": name, "parameters": compute.get("parameters_total") or info.get("parameters"),
        "steps": _last(records, "step"), "tokens": compute.get("tokens", _last(records, "tokens")),
        "wall_time_s": compute.get("wall_time_s"), "final_loss": _last(records, "loss"),
        "loss_name": _loss_name(name, info), "problems": evaluation.get("problems"),
        "accuracy": evaluation.get("accuracy"), "accuracy_ci95": evaluation.get("accuracy_ci95"),
        "pass@1": (evaluation.get("pass@k") or {}).get("1"), "k": k, "pass@k": top,
    }


def _loss_name(name: str, info: dict) -> str:
    if name == "distill":
        return DISTILL_LOSS_NAMES.get(info.get("mode"), "distillation loss")
    return LOSS_NAMES.get(name, "loss")


STAGE_COLUMNS = ["Stage", "Parameters", "Steps", "Tokens", "Train time (s)", "Final loss", "Greedy accuracy",
                 "95% interval", "pass@1", "pass@k"]


def stage_cells(row: dict) -> list[str]:
    """A stage row as the table shows it (columns STAGE_COLUMNS; pass@k names its k)."""
    ci = row.get("accuracy_ci95")
    return [STAGE_TITLES.get(row["stage"], row["stage"]), fmt_number(row["parameters"]), fmt_number(row["steps"]),
            fmt_number(row["tokens"]), fmt_number(row["wall_time_s"]), fmt_number(row["final_loss"]),
            fmt_fraction(row["accuracy"]), f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "", fmt_fraction(row["pass@1"]),
            f"{fmt_fraction(row['pass@k'])} (k={row['k']})" if row.get("k") else ""]


def distillation_comparison(evaluations: dict) -> dict | None:
    """Teacher (GRPO), distilled student and the same student trained directly, side by side."""
    teacher, student, direct = (evaluations.get(n) for n in ("grpo", "distill", "student-direct"))
    if not (teacher and student and direct):
        return None
    acc = {n: e.get("accuracy") or 0.0 for n, e in (("teacher", teacher), ("student", student), ("direct", direct))}
    return {
        "teacher_accuracy": acc["teacher"], "student_accuracy": acc["student"], "direct_accuracy": acc["direct"],
        "smaller": (teacher.get("parameters") or 0) / max(1, student.get("parameters") or 0),
        "share_of_teacher": acc["student"] / acc["teacher"] if acc["teacher"] else 0.0,
        "gain_over_direct": acc["student"] - acc["direct"],
    }


def verdict(evaluations: dict) -> tuple[bool, str]:
    """Whether the run meets TARGETS, as one sentence that names every figure it rests on."""
    acc = {n: (evaluations.get(n) or {}).get("accuracy") or 0.0 for n in ("sft", "grpo")}
    passes = {n: _top_pass(evaluations.get(n) or {}) for n in ("sft", "grpo")}
    d = distillation_comparison(evaluations) or {"smaller": 0, "share_of_teacher": 0, "gain_over_direct": 0,
                                                 "student_accuracy": 0}
    t = TARGETS
    checks = [
        (acc["sft"] >= t["sft_accuracy"], f"SFT answers {acc['sft']:.0%} of the held-out problems (target "
                                          f"{t['sft_accuracy']:.0%})"),
        (acc["grpo"] >= acc["sft"] + t["grpo_gain"] and (passes["grpo"][1] or 0) >= (passes["sft"][1] or 0),
         f"GRPO {acc['grpo'] - acc['sft']:+.0%} over SFT (target {t['grpo_gain']:+.0%}, pass@{passes['grpo'][0]} "
         f"{passes['grpo'][1] or 0:.0%} against SFT's {passes['sft'][1] or 0:.0%})"),
        (d["smaller"] >= t["smaller"] and d["share_of_teacher"] >= t["student_share"]
         and d["gain_over_direct"] >= t["direct_gain"],
         f"the {d['smaller']:.1f}x smaller distilled student reaches {d['share_of_teacher']:.0%} of the teacher "
         f"(target {t['student_share']:.0%}) and {d['gain_over_direct']:+.0%} over the same student trained directly "
         f"(target {t['direct_gain']:+.0%})"),
    ]
    ok = all(c for c, _ in checks)
    head = "The model passes its task" if ok else "The model does not pass its task yet"
    return ok, f"{head}: " + "; ".join(f"{text} {'(met)' if c else '(missed)'}" for c, text in checks) + "."


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(rows: list[dict], out_dir) -> str | None:
    """accuracy.png: greedy held-out accuracy of each stage with its 95% interval, and the SFT target."""
    from pathlib import Path

    rows = [r for r in rows if r.get("accuracy") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(rows))
    acc = [r["accuracy"] for r in rows]
    ci = [r.get("accuracy_ci95") or (a, a) for r, a in zip(rows, acc)]
    ax.bar(x, acc, color=["#999", "#4a7", "#27b", "#c73", "#bbb"][:len(rows)],
           yerr=[[a - lo for a, (lo, _) in zip(acc, ci)], [hi - a for a, (_, hi) in zip(acc, ci)]], capsize=4)
    ax.axhline(TARGETS["sft_accuracy"], color="grey", lw=0.8, ls=":", label=f"SFT target {TARGETS['sft_accuracy']}")
    ax.set_xticks(list(x), [STAGE_TITLES.get(r["stage"], r["stage"]) for r in rows], fontsize=8)
    ax.set(ylim=(0, 1), ylabel="greedy accuracy",
           title=f"Held-out accuracy by stage ({rows[0].get('problems')} problems, 95% intervals)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "accuracy.png", dpi=110)
    plt.close(fig)
    return "accuracy.png"


def plot_losses(stages: dict, rows: list[dict], out_dir) -> str | None:
    """loss.png: one panel per stage, each with its own quantity on its own axis (train and validation
    loss of that stage share it: they are the same quantity)."""
    from pathlib import Path

    panels = [(r, read_metrics(Path(stages[r["stage"]]) / "metrics.jsonl")) for r in rows]
    panels = [(r, m) for r, m in panels if _series(m, "loss")[0]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), squeeze=False)
    for ax, (row, records) in zip(axes[:, 0], panels):
        for key, style in (("loss", "-"), ("val_loss", "o--")):
            x, y = _series(records, key)
            if x:
                ax.plot(x, y, style, label="train" if key == "loss" else "validation")
        ax.set_title(f"{STAGE_TITLES.get(row['stage'], row['stage'])}: {row['loss_name']}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "loss.png", dpi=110)
    plt.close(fig)
    return "loss.png"


def _stage_plot(out_dir, file: str, draw, title: str, **axes) -> str:
    """One 7 x 3.2 in figure: `draw(ax)` plots the curves, then title, axes, legend; saved as out_dir/file."""
    from pathlib import Path

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    draw(ax)
    ax.set(xlabel="step", title=title, **axes)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / file, dpi=110)
    plt.close(fig)
    return file


def plot_rewards(stages: dict, out_dir) -> list[str]:
    """curves_STAGE.png for the stages that log rewards or held-out accuracy while they train (fractions)."""
    from pathlib import Path

    written = []
    for name, d in stages.items():
        records = read_metrics(Path(d) / "metrics.jsonl")
        keys = [k for k in ("reward_mean", "eval_accuracy", "val_accuracy", "accuracy") if _series(records, k)[0]]
        if not keys or name == "pretrain":
            continue

        def draw(ax, records=records, keys=keys):
            for key in keys:
                x, y = _series(records, key)
                ax.plot(x, y, marker="." if len(x) < 40 else None, label=key)

        written.append(_stage_plot(out_dir, f"curves_{name}.png", draw, ylabel="fraction correct", ylim=(0, 1),
                                   title=f"{STAGE_TITLES.get(name, name)}: reward and held-out accuracy while training"))
    return written


def plot_expert_load(stages: dict, out_dir) -> list[str]:
    """expert_load_STAGE.png: each MoE layer's max / mean tokens per expert over training (1 is perfect
    balance), for the stages that log it."""
    from pathlib import Path

    written = []
    for name, d in stages.items():
        loads = [(r["step"], r["expert_load_max_over_mean"]) for r in read_metrics(Path(d) / "metrics.jsonl")
                 if isinstance(r.get("expert_load_max_over_mean"), list)]
        if not loads:
            continue

        def draw(ax, loads=loads):
            for layer in range(len(loads[0][1])):
                ax.plot([s for s, _ in loads], [v[layer] for _, v in loads], label=f"MoE layer {layer}")
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")

        written.append(_stage_plot(out_dir, f"expert_load_{name}.png", draw, ylabel="max / mean tokens per expert",
                                   title=f"{STAGE_TITLES.get(name, name)}: expert load balance"))
    return written


def example_rows(evaluations: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the first held-out problems with each stage's final answer, marked right or wrong."""
    from daulat.data.tasks import extract_answer

    names = [n for n, e in evaluations.items() if e and e.get("examples")]
    if not names:
        return [], []
    header = ["Problem", "Reference", *[STAGE_TITLES.get(n, n) for n in names]]
    rows = []
    for i, example in enumerate(evaluations[names[0]]["examples"]):
        cells = [example["prompt"], example["answer"]]
        for n in names:
            got = evaluations[n]["examples"][i] if i < len(evaluations[n]["examples"]) else None
            said = extract_answer(got["completion"]) if got else None
            said = said if said is None or len(said) <= 24 else said[:21] + "..."
            cells.append("" if got is None else f"{'✓' if got['correct'] else '✗'} {said or '(no answer)'}")
        rows.append(cells)
    return header, rows


def _distillation_blocks(evaluations: dict, rows: list[dict]) -> list[tuple]:
    d = distillation_comparison(evaluations)
    if d is None:
        return []
    by_stage = {r["stage"]: r for r in rows}
    table = [[STAGE_TITLES[n] if n != "grpo" else "teacher (GRPO)", fmt_number(by_stage[n]["parameters"]),
              fmt_fraction(by_stage[n]["accuracy"]), stage_cells(by_stage[n])[7]]
             for n in ("grpo", "distill", "student-direct")]
    beats = d["gain_over_direct"] > 0
    sentence = (f"The student has {d['smaller']:.1f}x fewer parameters than its teacher and reaches "
                f"{d['share_of_teacher']:.0%} of its accuracy; trained directly on the task's own solutions for the "
                f"same steps, the same student reaches {d['direct_accuracy']:.3f}, so distillation "
                + (f"adds {d['gain_over_direct']:+.3f}." if beats else
                   f"does not beat direct training here ({d['gain_over_direct']:+.3f})."))
    return [("h2", "Distillation against direct training"), ("p", sentence),
            ("table", ["Model", "Parameters", "Greedy accuracy", "95% interval"], table)]


def report_blocks(stages: dict, evaluations: dict, title: str, about: dict, plots: list[str],
                  rows: list[dict]) -> list[tuple]:
    """The report card as blocks (heading, paragraph, list, table, image), rendered as Markdown and HTML."""
    _, sentence = verdict(evaluations)
    problems = next((r["problems"] for r in rows if r.get("problems")), None)
    blocks = [("h1", title), ("p", sentence), ("ul", [f"{k}: {v}" for k, v in about.items()]),
              ("h2", f"Stages ({problems} held-out problems; greedy accuracy with its 95% Wilson interval)"),
              ("table", STAGE_COLUMNS, [stage_cells(r) for r in rows])]
    blocks += _distillation_blocks(evaluations, rows)
    header, examples = example_rows(evaluations)
    if examples:
        blocks += [("h2", "Held-out problems and each stage's answer"), ("table", header, examples)]
    blocks += [("h2", "Plots")] + [("img", p) for p in plots]
    return blocks


def _markdown(blocks: list[tuple]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            lines += [f"{'#' if kind == 'h1' else '##'} {rest[0]}", ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in rest[0]] + [""]
        elif kind == "table":
            header, rows = rest
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows] + [""]
        elif kind == "img":
            lines += [f"![{rest[0]}]({rest[0]})", ""]
    return "\n".join(lines)


def _html(blocks: list[tuple], out_dir) -> str:
    import base64
    import html
    from pathlib import Path

    e, body = html.escape, []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
        elif kind == "img":
            data = base64.b64encode((Path(out_dir) / rest[0]).read_bytes()).decode()
            body.append(f'<figure><img alt="{rest[0]}" src="data:image/png;base64,{data}"></figure>')
    title = e(blocks[0][1]) if blocks else "daulat report card"
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin-bottom:1em}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>")


def write_speedrun_report(out_dir, stages: dict, evaluations: dict, title: str = "daulat report card",
                          about: dict | None = None) -> dict:
    """OUT/report.md, OUT/report.html (self-contained: plots embedded) and the PNGs.

    stages: name -> stage output directory (holding metrics.jsonl and final/);
    evaluations: name -> the eval JSON of that stage's final checkpoint.
    Returns {"rows": [...], "plots": [...], "passes": bool}.
    """
    from pathlib import Path

    out_dir = Path(out_dir)
    rows = [stage_row(name, d, evaluations.get(name)) for name, d in stages.items()]
    plots = [p for p in (plot_accuracy(rows, out_dir), plot_losses(stages, rows, out_dir)) if p]
    plots += plot_rewards(stages, out_dir) + plot_expert_load(stages, out_dir)
    blocks = report_blocks(stages, evaluations, title, about or {}, plots, rows)
    (out_dir / "report.md").write_text(_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(_html(blocks, out_dir), encoding="utf-8")
    return {"rows": rows, "plots": plots, "passes": verdict(evaluations)[0]}


def evaluation_section(evaluation: dict) -> str:
    """The model card's Evaluation section (Markdown) from a checkpoint's `evaluation` record."""
    ci = evaluation.get("accuracy_ci95")
    lines = ["## Evaluation", "",
             f"Held-out split of the task `{evaluation.get('task')}`: {evaluation.get('problems')} problems, none "
             f"seen in training.", "",
             "| Metric | Value |", "|---|---|",
             f"| greedy accuracy | {fmt_fraction(evaluation.get('accuracy'))} |"]
    if ci:
        lines.append(f"| 95% interval (Wilson) | {ci[0]:.3f}–{ci[1]:.3f} |")
    for k, v in (evaluation.get("pass@k") or {}).items():
        lines.append(f"| pass@{k} ({evaluation.get('samples')} samples at temperature "
                     f"{evaluation.get('temperature')}) | {fmt_fraction(v)} |")
    return "\n".join(lines) + "\n"
