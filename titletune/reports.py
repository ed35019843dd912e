"""Rendering a run's evaluation: report.json's numbers as Markdown tables and verdicts (report.md, the model card,
the terminal) and as a plot (report.png), with the export's fidelity table (export.json). Nothing here measures.

The stages (evaluate.py, export.py) return their numbers; `write_reports` is called by the steps that run them
(pipeline.py), once the numbers are in, so report.md always describes the report.json and export.json beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from titletune import files, metrics
from titletune.capacity import FILE as CAPACITY_FILE
from titletune.evaluate import POPULATIONS, SYSTEMS
from titletune.runs import read_json

EXAMPLE_CHARS = 300  # report.md cuts long texts here; report.json keeps them whole
LABELS = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L F1",
    "rougeL_p": "ROUGE-L P",
    "rougeL_r": "ROUGE-L R",
    "numbers": "numbers supported",
    "bleu": "BLEU",
}
# capacity.json's keys that the capacity table needs (training.py writes them before training).
CAPACITY_KEYS = ("ratio", "trainable", "products", "answer_tokens", "views", "recall")


def table(report: dict, pop: str) -> str:
    """A markdown table of one population: one row per system, each mean with its 95% interval."""
    names = [*metrics.METRICS, "loss", "ppl"]
    head = "| system | " + " | ".join(LABELS.get(n, n) for n in names) + " |\n|---" + "|---" * len(names) + "|"
    rows = []
    for system, m in report[pop].items():
        cells = [_with_ci(m[n], 2 if n == "bleu" else 3) for n in metrics.METRICS]
        cells += ["-" if m.get(n) is None else f"{m[n]:.2f}" for n in ("loss", "ppl")]
        rows.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join([head, *rows])


def _with_ci(m: dict, digits: int) -> str:
    if m["mean"] is None:
        return "-"
    low, high = m["ci"]
    return f"{m['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def verdicts(report: dict, pop: str) -> list[str]:
    """One sentence per tested pair: the ROUGE-L F1 difference, its interval, and whether it is significant."""
    out = []
    for pair, by_metric in (report.get("differences") or {}).get(pop, {}).items():
        d = by_metric["rougeL"]
        if d["mean"] is None:
            continue
        low, high = d["ci"]
        verdict = "significant at the 5% level" if d["significant"] else "not significant: the interval includes 0"
        out.append(
            f"- **{pair.replace(' - ', ' vs ')}**: ROUGE-L F1 {d['mean']:+.3f} (95% CI {low:+.3f} to {high:+.3f}, "
            f"paired bootstrap over {d['n']} products): {verdict}."
        )
    return out


def summary(report: dict) -> str:
    """The tables and the verdicts, for the terminal."""
    parts = []
    for pop in POPULATIONS:
        if pop in report:
            extra = new_phrasing_lines(report) if pop == "seen" and report.get("seen_new_phrasing") else []
            parts.append(
                f"{pop} ({report['counts'][pop]} products)\n{table(report, pop)}\n"
                + "\n".join([*verdicts(report, pop), *extra])
            )
    return "\n\n".join(parts)


def render_md(report: dict, exported: dict | None = None, capacity: dict | None = None) -> str:
    """report.md: the report; the capacity table beside the seen recall when capacity.json (`capacity`) is there;
    and the export's fidelity table when export.json (`exported`) has one."""
    s = report["settings"]
    d = s["sampling"]
    lines = [
        "# Evaluation report",
        "",
        f"Run `{report['run']}`, engine {report['engine']}, data: {report['data']}. Up to {s['samples']} products per "
        f"population (seed {s['seed']}). Every system decodes the same way: {decoding(d)}, at most "
        f"{d['max_new_tokens']} new tokens, repetition penalty {d['repetition_penalty']}. RAG puts the top "
        f"{s['rag_k']} entries of the index ({report['index']}) into the prompt; retrieval answers with the best "
        "entry's description.",
        "",
        "Each cell is the mean with its 95% bootstrap interval. ROUGE is stemmed, 0-1, the mean over products; "
        "numbers supported is the share of the numbers in an answer found in the reference or the title (answers "
        "without numbers do not count); BLEU is sacrebleu corpus BLEU (0-100); loss and perplexity are teacher-forced "
        "on the reference answer tokens only.",
        "",
        *_populations(report, capacity),
        *_examples(report),
        "![ROUGE-L F1 and numbers supported per system, with 95% intervals](report.png)",
    ]
    fidelity = fidelity_table(exported["files"], exported.get("fidelity_merged")) if exported else []
    if fidelity:
        lines += ["", "## Export fidelity", "", *fidelity]
    return "\n".join(lines) + "\n"


def _populations(report: dict, capacity: dict | None) -> list[str]:
    """report.md's section of each population: its note, the table and verdicts, and for the seen products the new
    phrasings and the capacity table."""
    lines = []
    for pop, title, note in (
        (
            "seen",
            "Seen products (from the training set)",
            "Did the model learn the catalogue? When the index holds the training products, retrieval finds the very "
            "product asked about and scores near 1 by construction: it is the ceiling, not a baseline.",
        ),
        (
            "heldout",
            "Held-out products (never trained on)",
            "Does the tuned model carry over to new products? Retrieval and RAG find them only in an index that holds "
            "them (--rag-index with the full catalogue); over the training products they find the most similar ones.",
        ),
    ):
        lines += [f"## {title}", "", note, ""]
        if pop in report:
            lines += [table(report, pop), "", *verdicts(report, pop), ""]
        else:
            lines += ["_No products in this population._", ""]
        if pop == "seen" and report.get("seen_new_phrasing"):
            lines += [*new_phrasing_lines(report), ""]
        if pop == "seen" and "seen" in report and all(k in (capacity or {}) for k in CAPACITY_KEYS):
            lines += [*capacity_lines(report, capacity), ""]
    return lines


def _examples(report: dict) -> list[str]:
    """Up to three examples, held-out products first: the question, what was retrieved, and every system's answer."""
    systems = list(report.get("systems") or SYSTEMS)
    lines = ["## Examples", ""]
    picked = [e for e in report["examples"] if e["population"] == "heldout"][:3]
    picked += [e for e in report["examples"] if e["population"] == "seen"][: 3 - len(picked)]
    for e in picked:
        lines += [
            f"**{e['population']}**: {_cell(e['question'])} (retrieved: {_cell('; '.join(e['retrieved']))})",
            "",
            "| reference | " + " | ".join(systems) + " |",
            "|---" * (len(systems) + 1) + "|",
            "| " + " | ".join(_cell(e[k]) for k in ["reference", *systems]) + " |",
            "",
        ]
    return lines


def capacity_lines(report: dict, capacity: dict) -> list[str]:
    """What the adapter was asked to hold (capacity.json, written before training) beside the seen recall reached."""
    reached = _with_ci(report["seen"]["tuned"]["rougeL"], 3)
    per_1000 = round(capacity["trainable"] * 1000 / max(capacity["products"], 1))
    return [
        "### Capacity",
        "",
        "| capacity ratio (answer tokens per trainable parameter) | trainable parameters | products trained | "
        "trainable parameters per 1,000 products | mean answer tokens | views | predicted seen ROUGE-L | seen ROUGE-L "
        "reached | products scored |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        f"| {capacity['ratio']:.3g} | {capacity['trainable']:,} | {capacity['products']:,} | {per_1000:,} | "
        f"{capacity['answer_tokens']:.1f} | {capacity['views']:g} | {capacity['recall']:.2f} | {reached} | "
        f"{report['counts']['seen']} |",
        "",
        "The prediction was made before training by the capacity law (titletune/config.py; bench/README.md, "
        "Capacity): seen ROUGE-L against log10 of the ratio, fitted on the 135M model. The seen recall reached is "
        f"scored on {report['counts']['seen']} of the {capacity['products']:,} products trained; compare a run with "
        "the law through its ratio, or through the adapter per 1,000 products at the same answer length.",
    ]


def decoding(sampling: dict) -> str:
    """How report.json's `settings.sampling` decodes, in words: greedy, or its temperature and top-p."""
    if sampling["temperature"] == 0:
        return "greedy"
    return f"temperature {sampling['temperature']}, top-p {sampling['top_p']}"


def new_phrasing_lines(report: dict) -> list[str]:
    """The seen products asked in phrasings training never used, beside the trained phrasing's ROUGE-L F1."""
    n = report["seen_new_phrasing"]
    seen = report["seen"]
    return [
        "Asked in a phrasing training never used (the prompt set's heldout.txt), ROUGE-L F1: "
        f"base {_with_ci(n['base'], 3)}, tuned {_with_ci(n['tuned'], 3)}; in the trained phrasing: "
        f"base {_with_ci(seen['base']['rougeL'], 3)}, tuned {_with_ci(seen['tuned']['rougeL'], 3)}.",
    ]


def _cell(text: str) -> str:
    text = " ".join((text or "").split())
    if len(text) > EXAMPLE_CHARS:
        text = text[: EXAMPLE_CHARS - 1] + "\u2026"
    return text.replace("|", "\\|") or "(empty)"


def plot(report: dict, path: Path) -> None:
    """Grouped bars with 95% intervals: ROUGE-L F1 and numbers supported per system, one group per population."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pops = [p for p in POPULATIONS if p in report]
    systems = list(report[pops[0]])
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / len(systems)
    for ax, metric in zip(fig.subplots(1, 2), ("rougeL", "numbers"), strict=True):
        for k, system in enumerate(systems):
            cells = [report[p][system][metric] for p in pops]
            means = [c["mean"] or 0.0 for c in cells]
            errors = [
                [m - (c["ci"][0] if c["ci"][0] is not None else m) for m, c in zip(means, cells, strict=True)],
                [(c["ci"][1] if c["ci"][1] is not None else m) - m for m, c in zip(means, cells, strict=True)],
            ]
            xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(pops))]
            ax.bar(xs, means, width, yerr=errors, capsize=3, label=system)
        ax.set_xticks(range(len(pops)), pops)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{LABELS[metric]} (95% CI)")
    fig.axes[0].legend(fontsize=8)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_reports(run_dir: Path, report: dict) -> None:
    files.write_atomic(run_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    exported = run_dir / "export.json"
    exported = json.loads(exported.read_text()) if exported.is_file() else None
    capacity = read_json(run_dir / CAPACITY_FILE)
    files.write_atomic(run_dir / "report.md", render_md(report, exported, capacity))
    plot(report, run_dir / "report.png")


def fidelity_table(entries: list[dict], merged: dict | None = None) -> list[str]:
    """The "Export fidelity" Markdown table of export.json's files (those with numbers)."""
    rows = [e for e in entries if e.get("fidelity")]
    if not rows:
        return []
    f0 = rows[0]["fidelity"]
    lines = [
        (
            f"On {f0['prompts']} products of the run (test and train), greedy answers of at most {f0['max_tokens']} "
            "tokens are compared with merged/ in transformers; perplexity and KL divergence (merged/ || file) are "
            "teacher-forced on the reference descriptions."
        ),
        "",
        (
            "| file | identical answers | agreeing prefix (tokens) | KL divergence (mean / max) | perplexity "
            "(merged/) | ROUGE-L | tokens/s | MB |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        f = e["fidelity"]
        lines.append(
            f"| {e['name']} | {f['identical']:.0%} | {f['agreeing_prefix']} | {f['kl_divergence']:.4g} / "
            f"{f['kl_divergence_max']:.4g} | {f['perplexity']} ({f['perplexity_merged']}) | {f['rougeL']} | "
            f"{f['tokens_per_second']} | {e['bytes'] / 1e6:.0f} |"
        )
    if merged:
        lines += ["", f"merged/ in transformers: {merged['tokens_per_second']} tokens/s."]
    return lines
