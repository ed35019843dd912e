"""Before/after evaluation of a run: six systems on two populations kept apart, every mean with its 95% interval.

- seen: products the model was trained on (train.jsonl). Did it learn the catalogue?
- heldout: products it never saw (test.jsonl, else val.jsonl). Does it carry over to new products?
With `data`, products of any trn-format file are split the same way: a title in train.jsonl makes it seen.

Systems: base, tuned, retrieval (the best catalogue match's description, word for word), base + RAG and tuned + RAG
(the top k catalogue entries in the prompt, through the run's prompt set), and tuned + distractors (k entries with the
product's own left out: does a wrong entry override what the model learned?). Retrieval and RAG search one index
(titletune/retrieval.py): the run's training products, or any catalogue file (`rag_index`). Every system decodes with
the same settings, recorded in the report. Metrics (titletune/metrics.py): ROUGE-1/2/L F1, ROUGE-L precision and
recall, numbers supported, corpus BLEU, each with a 95% bootstrap interval; paired bootstrap differences for tuned vs
base, tuned + RAG vs tuned and tuned + distractors vs tuned; and the teacher-forced loss and perplexity of base and
tuned on the reference answers.
Writes <run>/report.json, report.md and report.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from titletune import fidelity, files, generate, metrics, prompts, ragrows, retrieval
from titletune.capacity import FILE as CAPACITY_FILE
from titletune.config import RAG_K
from titletune.errors import UserError
from titletune.generate import Sampling
from titletune.runs import Run, read_json

log = logging.getLogger(__name__)

POPULATIONS = ("seen", "heldout")
SYSTEMS = ("base", "tuned", "retrieval", "base+rag", "tuned+rag", "tuned+distractors")
# system -> (model, prompt): the plain question, the top k entries, or k entries with the product's own left out.
GENERATED = {
    "base": ("base", "plain"),
    "tuned": ("tuned", "plain"),
    "base+rag": ("base", "rag"),
    "tuned+rag": ("tuned", "rag"),
    "tuned+distractors": ("tuned", "distractors"),
}
PROMPTS = {"plain": "row_prompt", "rag": "rag_prompt", "distractors": "distractor_prompt"}
# The paired differences the report tests. tuned+distractors vs tuned: does a wrong entry override what the model
# learned? (RAG-aware training's rows with distractors only are there so that it does not.)
PAIRS = (("tuned", "base"), ("tuned+rag", "tuned"), ("tuned+distractors", "tuned"))
# Hits searched per question for the distractors-only prompt, beyond k: room to leave the product's own entry out.
DISTRACTOR_SLACK = 3
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


@dataclass(frozen=True)
class EvalSettings:
    """How a run is scored: the one record that train.py's evaluation after training and infer.py --evaluate both
    build, saved in report.json as `settings`, so two reports of one run differ only where their settings do."""

    samples: int = 20  # products per population; train.py passes --eval_samples
    seed: int | None = None  # which products are sampled; None: the run's own seed
    data: str | None = None  # a trn-format file to sample from; None: the run's own splits
    rag_k: int = RAG_K  # catalogue entries in a RAG prompt
    rag_index: str | None = None  # a trn-format file to search; None: the run's training products
    sampling: Sampling = field(default_factory=Sampling)  # the decoding of every system: infer.py's defaults

    def check(self) -> None:
        problems = []
        if self.samples < 1:
            problems.append(f"samples must be >= 1, got {self.samples}")
        if self.rag_k < 1:
            problems.append(f"--rag-k must be >= 1, got {self.rag_k}")
        if problems:
            raise UserError("; ".join(problems) + ".")
        self.sampling.check()

    def for_run(self, run: Run) -> EvalSettings:
        """These settings with the run's own seed and answer length filled in."""
        seed = run.seed if self.seed is None else self.seed
        return dataclasses.replace(self, seed=seed, sampling=self.sampling.for_run(run))


def evaluate_run(run: Run, settings: EvalSettings | None = None, engine=None, batch_size: int = 8) -> dict:
    """Score the six systems on `settings.samples` seen and as many held-out products; write the reports.

    engine: a loaded generate.TransformersEngine/LlamaCppEngine (reused, not reloaded), "transformers",
    "llamacpp", or None (transformers). Loss and perplexity need transformers; with llamacpp they are null.
    """
    settings = (settings or EvalSettings()).for_run(run)
    settings.check()
    started = time.perf_counter()
    ps = run.prompts
    train = run.split("train")
    if not train:
        raise UserError(f"{run.data / 'train.jsonl'} is missing or empty; the run's data split is needed.")
    pops = sample_populations(run, train, settings.samples, settings.seed, settings.data)
    if not any(pops.values()):
        raise UserError(f"no products to evaluate in {settings.data or run.data}.")
    index = retrieval.open_index(run, settings.rag_index)
    if engine is None or isinstance(engine, str):
        engine = generate.load_engine(run, engine or "transformers")
    missing = [s for s in generate.SYSTEMS if s not in engine.systems]
    if missing:
        raise UserError(f"evaluation compares base and tuned; the engine was loaded without {missing}.")

    items = []
    for pop, products in pops.items():
        for p in products:
            # The question phrasing training picked for each product (the run's seed), and the answer it learned.
            row = prompts.render(ps, p["title"], p["content"], key=str(p["id"]), seed=run.seed)
            question = row["prompt"][-1]["content"]
            hits = index.search(question, settings.rag_k + DISTRACTOR_SLACK)
            others = [h for h in hits if not _same_product(h, p)][: settings.rag_k]
            if len(others) < settings.rag_k:  # the nearest titles, as training's distractors are found
                found = {h["id"] for h in others}
                near = index.neighbours(p["title"], settings.rag_k + DISTRACTOR_SLACK)
                others += [h for h in near if h["id"] not in found and not _same_product(h, p)]
                others = others[: settings.rag_k]
            hits = hits[: settings.rag_k]
            items.append(
                {
                    "population": pop,
                    "id": str(p["id"]),
                    "title": p["title"],
                    "row": row,
                    "row_prompt": row["prompt"],
                    "question": question,
                    "reference": row["completion"][0]["content"],
                    "retrieved": [h["title"] for h in hits],
                    "retrieval": ps.answer.replace("{content}", hits[0]["content"]) if hits else "",
                    "rag_prompt": prompts.rag_messages(ps, question, hits),
                    "distractors": [h["title"] for h in others],
                    "distractor_prompt": prompts.rag_messages(ps, question, others),
                }
            )
    for item in items:
        entries = len(item["retrieved"])
        for key in ("rag_prompt", "distractor_prompt"):
            generate.check_length(engine, item[key], settings.sampling.max_new_tokens, entries, settings.rag_k)

    timing = {}
    for system, (model, prompt) in GENERATED.items():
        t0 = time.perf_counter()
        convs = [i[PROMPTS[prompt]] for i in items]
        answers = engine.generate(convs, model, settings.sampling, batch_size=batch_size, progress=True)
        timing[system] = round(time.perf_counter() - t0, 2)
        for item, answer in zip(items, answers, strict=True):
            item[system] = answer

    report: dict = {"differences": {}}
    for pop in POPULATIONS:
        group = [i for i in items if i["population"] == pop]
        if not group:
            continue
        refs, titles = [i["reference"] for i in group], [i["title"] for i in group]
        report[pop], values = {}, {}
        for system in SYSTEMS:
            report[pop][system], values[system] = metrics.score([i[system] for i in group], refs, titles)
        for system in ("base", "tuned"):
            loss, ppl = None, None
            if engine.supports_loss:
                loss, ppl = generate.perplexity(*engine.loss([i["row"] for i in group], system, batch_size))
            report[pop][system].update(loss=_round(loss), ppl=_round(ppl))
        report["differences"][pop] = {
            f"{a} - {b}": {m: metrics.paired(values[a][m], values[b][m]) for m in values[a]} for a, b in PAIRS
        }
    report.update(
        settings=dataclasses.asdict(settings),
        systems=list(SYSTEMS),
        counts={pop: sum(i["population"] == pop for i in items) for pop in POPULATIONS},
        run=str(run.dir),
        engine=engine.name,
        data=settings.data or "run splits",
        index=index.source,
        scales="ROUGE and numbers supported 0-1; BLEU is sacrebleu corpus BLEU, 0-100",
        seconds=timing,
        examples=[
            {
                k: i[k]
                for k in ("population", "id", "title", "question", "reference", "retrieved", "distractors", *SYSTEMS)
            }
            for i in items
        ],
    )
    seen = [i for i in items if i["population"] == "seen"]
    if seen and ps.held_out:
        t0 = time.perf_counter()
        report["seen_new_phrasing"] = new_phrasing(run, seen, engine, settings, batch_size)
        report["seconds"]["new_phrasing"] = round(time.perf_counter() - t0, 2)
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)
    write_reports(run.dir, report)
    from titletune import card  # imported here: card imports this module for its tables

    card.write(run)  # the card's results follow the new report
    log.info(
        "evaluate: %s",
        " ".join(f"{p}: tuned rougeL {report[p]['tuned']['rougeL']['mean']}" for p in POPULATIONS if p in report),
    )
    return report


def _same_product(hit: dict, product: dict) -> bool:
    """Whether a search hit is the product itself: the same id in the same file, or the same title key (the run's
    index and a catalogue file number products differently)."""
    from titletune.text import title_key

    return hit["id"] == str(product["id"]) or title_key(hit["title"]) == title_key(product["title"])


def new_phrasing(run: Run, seen: list[dict], engine, settings: EvalSettings, batch_size: int) -> dict:
    """Base and tuned on the seen products asked in a phrasing training never used (the set's heldout.txt): is the
    product recalled, or only the trained question? ROUGE-L F1 with its interval, beside the trained phrasing's."""
    ps = run.prompts
    questions = [prompts.held_out_question(ps, i["title"], i["id"], run.seed) for i in seen]
    convs = [prompts.messages(ps, q) for q in questions]
    refs, titles = [i["reference"] for i in seen], [i["title"] for i in seen]
    out: dict = {"phrasings": list(ps.held_out), "examples": []}
    answers = {}
    for system in ("base", "tuned"):
        answers[system] = engine.generate(convs, system, settings.sampling, batch_size=batch_size, progress=True)
        out[system] = metrics.score(answers[system], refs, titles)[0]["rougeL"]
    out["examples"] = [{"question": q, "tuned": t} for q, t in zip(questions[:3], answers["tuned"][:3], strict=False)]
    return out


# ---------------------------------------------------------------- data


def sample_populations(
    run: Run, train: list[dict], samples: int, seed: int, data_path: str | Path | None
) -> dict[str, list[dict]]:
    """`samples` products per population, chosen with `seed` (the same products every time)."""
    if data_path is None:
        pools = {"seen": train, "heldout": run.split("test") or run.split("val")}
        return {pop: _sample(rows, samples, seed) for pop, rows in pools.items()}
    return _sample_file(Path(data_path), run, train, samples, seed)


def _sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in picked]


def _sample_file(path: Path, run: Run, train: list[dict], n: int, seed: int) -> dict[str, list[dict]]:
    """Stream any trn-format file once, cleaned and filtered as training did it, reservoir-sampling each population.

    The data settings are the run's (run_config.yaml), else DataArguments' defaults, as train.py would use them."""
    from titletune.reading import iter_products
    from titletune.selection import clean_product
    from titletune.text import title_key, truncate

    data_cfg = run.data_settings
    min_chars, max_chars = int(data_cfg["min_content_chars"]), int(data_cfg["max_content_chars"])
    train_keys = {title_key(r["title"]) for r in train}
    # RAG-aware training's read products (ragrows.py) were neither asked plainly nor held out: in no population.
    read_keys = {title_key(r["title"]) for r in ragrows.read_rows(run.data)}
    rngs = {pop: random.Random(f"{seed}:{pop}") for pop in POPULATIONS}
    pools: dict[str, list[dict]] = {pop: [] for pop in POPULATIONS}
    counts = dict.fromkeys(POPULATIONS, 0)
    done: set[str] = set()
    for row in iter_products(path, data_cfg["title_field"], data_cfg["content_field"]):
        cleaned = clean_product(row, min_chars)
        if isinstance(cleaned, str):  # a drop reason: training would not have kept this product either
            continue
        title, key, content = cleaned
        if key in done or key in read_keys:
            continue
        done.add(key)
        pop = "seen" if key in train_keys else "heldout"
        product = {"id": row["id"], "title": title, "content": truncate(content, max_chars)}
        counts[pop] += 1
        if len(pools[pop]) < n:
            pools[pop].append(product)
        else:  # reservoir sampling: every product has the same chance, in one pass over a file of any size
            j = rngs[pop].randrange(counts[pop])
            if j < n:
                pools[pop][j] = product
    return pools


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


# ---------------------------------------------------------------- reports


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
    ]
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
    systems = list(report.get("systems") or SYSTEMS)
    lines += ["## Examples", ""]
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
    lines.append("![ROUGE-L F1 and numbers supported per system, with 95% intervals](report.png)")
    fidelity_table = fidelity.table(exported["files"], exported.get("fidelity_merged")) if exported else []
    if fidelity_table:
        lines += ["", "## Export fidelity", "", *fidelity_table]
    return "\n".join(lines) + "\n"


CAPACITY_KEYS = ("ratio", "trainable", "products", "answer_tokens", "views", "recall")


def capacity_lines(report: dict, capacity: dict) -> list[str]:
    """What the adapter was asked to hold (capacity.json, written before training) beside the seen recall reached."""
    reached = _with_ci(report["seen"]["tuned"]["rougeL"], 3)
    return [
        "### Capacity",
        "",
        "| capacity ratio (answer tokens per trainable parameter) | trainable parameters | products trained | mean "
        "answer tokens | views | predicted seen ROUGE-L | seen ROUGE-L reached | products scored |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
        f"| {capacity['ratio']:.3g} | {capacity['trainable']:,} | {capacity['products']:,} | "
        f"{capacity['answer_tokens']:.1f} | {capacity['views']:g} | {capacity['recall']:.2f} | {reached} | "
        f"{report['counts']['seen']} |",
        "",
        "The prediction was made before training by the provisional capacity law (titletune/config.py; "
        "bench/README.md, Capacity): seen ROUGE-L against log10 of the ratio, fitted on the 135M model.",
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
