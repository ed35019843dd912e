"""Before/after evaluation of a run: base vs tuned vs a BM25 retrieval baseline, on two populations kept apart.

- seen: products the model was trained on (train.jsonl). Did it learn the catalogue?
- heldout: products it never saw (test.jsonl, else val.jsonl). Does the style carry over to new products?
With `data_path`, products of any trn-format file are split the same way: a title in train.jsonl makes it seen.
Metrics: ROUGE-1/2/L F1 (mean over products), corpus BLEU (sacrebleu, 0-100), and the teacher-forced loss and
perplexity of base and tuned on the reference answers (completion tokens only, as in training).
Writes <run>/report.json, report.md and report.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from titletune import files, generate, prompts
from titletune.errors import UserError
from titletune.runs import Run

log = logging.getLogger(__name__)

POPULATIONS = ("seen", "heldout")
EXAMPLE_CHARS = 300  # report.md cuts long texts here; report.json keeps them whole
# Used only with rag=True: the base model answers with the retrieved description in front of the question.
RAG_TEMPLATE = "Catalogue entry of the most similar product we know:\n{context}\n\n{question}"


@dataclass(frozen=True)
class EvalSettings:
    """How a run is scored: the one record that train.py's evaluation after training and infer.py --evaluate both
    build, saved in report.json as `settings`, so two reports of one run differ only where their settings do."""

    samples: int = 20  # products per population; train.py passes --eval_samples (10 in the CPU run)
    # Greedy answers of at most this many tokens: the CPU run's answers are cut at 400 characters, ~100 tokens.
    max_new_tokens: int = 128
    seed: int | None = None  # which products are sampled; None: the run's own seed
    data: str | None = None  # a trn-format file to sample from; None: the run's own splits

    def check(self) -> None:
        problems = []
        if self.samples < 1:
            problems.append(f"samples must be >= 1, got {self.samples}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if problems:
            raise UserError("; ".join(problems) + ".")

    def for_run(self, run: Run) -> EvalSettings:
        """These settings with the run's own seed filled in."""
        return dataclasses.replace(self, seed=run.seed if self.seed is None else self.seed)


def evaluate_run(
    run: Run, settings: EvalSettings | None = None, engine=None, rag: bool = False, batch_size: int = 8
) -> dict:
    """Score base, tuned and retrieval on `settings.samples` seen and as many held-out products; write the reports.

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
    if engine is None or isinstance(engine, str):
        engine = generate.load_engine(run, engine or "transformers")
    missing = [s for s in generate.SYSTEMS if s not in engine.systems]
    if missing:
        raise UserError(f"evaluation compares base and tuned; the engine was loaded without {missing}.")

    run_seed = run.seed  # the question phrasing training picked for each product
    items = []
    for pop, products in pops.items():
        for p in products:
            row = prompts.render(ps, p["title"], p["content"], key=str(p["id"]), seed=run_seed)
            items.append(
                {
                    "population": pop,
                    "id": str(p["id"]),
                    "title": p["title"],
                    "row": row,
                    "question": row["prompt"][-1]["content"],
                    "reference": row["completion"][0]["content"],
                }
            )

    retriever = Retriever(train)
    for item in items:
        best = retriever.best(item["title"])
        item["retrieval"] = ps.answer.replace("{content}", best["content"])
        item["retrieved_title"] = best["title"]

    sampling = generate.Sampling(max_new_tokens=settings.max_new_tokens)  # greedy: the report is repeatable
    conversations = [item["row"]["prompt"] for item in items]
    timing = {}
    systems = ["base", "tuned"] + (["rag"] if rag else [])
    for system in systems:
        t0 = time.perf_counter()
        convs = conversations
        if system == "rag":
            convs = [
                prompts.messages(ps, RAG_TEMPLATE.format(context=i["retrieval"], question=i["question"]))
                for i in items
            ]
        answers = engine.generate(
            convs, "base" if system == "rag" else system, sampling, batch_size=batch_size, progress=True
        )
        timing[system] = round(time.perf_counter() - t0, 2)
        for item, answer in zip(items, answers):
            item[system] = answer

    report: dict = {}
    for pop in POPULATIONS:
        group = [i for i in items if i["population"] == pop]
        if not group:
            continue
        refs = [i["reference"] for i in group]
        report[pop] = {}
        for system in systems + ["retrieval"]:
            report[pop][system] = text_metrics([i[system] for i in group], refs)
        for system in ("base", "tuned"):
            loss, ppl = None, None
            if engine.supports_loss:
                loss, ppl = generate.perplexity(*engine.loss([i["row"] for i in group], system, batch_size))
            report[pop][system].update(loss=_round(loss), ppl=_round(ppl))
    report.update(
        settings=dataclasses.asdict(settings),
        greedy=True,
        counts={pop: sum(i["population"] == pop for i in items) for pop in POPULATIONS},
        run=str(run.dir),
        engine=engine.name,
        data=settings.data or "run splits",
        bleu_scale="sacrebleu corpus BLEU, 0-100; ROUGE F1 0-1",
        seconds=timing,
        examples=[
            {
                k: i[k]
                for k in (
                    "population",
                    "id",
                    "title",
                    "question",
                    "reference",
                    *systems,
                    "retrieval",
                    "retrieved_title",
                )
            }
            for i in items
        ],
    )
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)
    write_reports(run.dir, report)
    log.info(
        "evaluate: %s",
        " ".join(f"{p}: tuned rougeL {report[p]['tuned']['rougeL']}" for p in POPULATIONS if p in report),
    )
    return report


# ---------------------------------------------------------------- data


def sample_populations(
    run: Run, train: list[dict], samples: int, seed: int, data_path: str | Path | None
) -> dict[str, list[dict]]:
    """`samples` products per population, chosen with `seed` (the same products every time)."""
    if data_path is None:
        pools = {"seen": train, "heldout": run.split("test") or run.split("val")}
        return {pop: _sample(rows, samples, seed) for pop, rows in pools.items()}
    return _sample_file(Path(data_path), run.config, train, samples, seed)


def _sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in picked]


def _sample_file(path: Path, cfg: dict, train: list[dict], n: int, seed: int) -> dict[str, list[dict]]:
    """Stream any trn-format file once, cleaned and filtered as training did it, reservoir-sampling each population.

    The data settings are the run's (run_config.yaml), else DataArguments' defaults, as train.py would use them."""
    import dataclasses

    from titletune.config import DataArguments
    from titletune.reading import iter_products
    from titletune.selection import clean_product
    from titletune.text import title_key, truncate

    data_cfg = {f.name: f.default for f in dataclasses.fields(DataArguments)}
    data_cfg.update({k: v for k, v in (cfg.get("data") or {}).items() if v is not None})
    min_chars, max_chars = int(data_cfg["min_content_chars"]), int(data_cfg["max_content_chars"])
    train_keys = {title_key(r["title"]) for r in train}
    rngs = {pop: random.Random(f"{seed}:{pop}") for pop in POPULATIONS}
    pools: dict[str, list[dict]] = {pop: [] for pop in POPULATIONS}
    counts = dict.fromkeys(POPULATIONS, 0)
    done: set[str] = set()
    for row in iter_products(path, data_cfg["title_field"], data_cfg["content_field"]):
        cleaned = clean_product(row, min_chars)
        if isinstance(cleaned, str):  # a drop reason: training would not have kept this product either
            continue
        title, key, content = cleaned
        if key in done:
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


class Retriever:
    """BM25 over the training titles; returns the best-matching training product."""

    def __init__(self, train: list[dict]):
        from rank_bm25 import BM25Okapi

        self.train = train
        self.bm25 = BM25Okapi([tokens(r["title"]) or ["_"] for r in train])

    def best(self, title: str) -> dict:
        scores = self.bm25.get_scores(tokens(title))
        return self.train[max(range(len(scores)), key=scores.__getitem__)]


def tokens(text: str) -> list[str]:
    from titletune.text import title_key

    return title_key(text).split()


# ---------------------------------------------------------------- metrics


def text_metrics(hypotheses: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F1 over products (stemmed) and corpus BLEU (0-100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        for name, score in scorer.score(ref, hyp).items():
            sums[name] += score.fmeasure
    out = {name: _round(total / len(references)) for name, total in sums.items()}
    out["bleu"] = _round(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


# ---------------------------------------------------------------- reports


def table(report: dict, pop: str) -> str:
    """A markdown table of one population: one row per system."""
    head = "| system | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU | loss | ppl |\n|---|---|---|---|---|---|---|"
    rows = []
    for system, m in report[pop].items():
        cells = [m.get(k) for k in ("rouge1", "rouge2", "rougeL", "bleu", "loss", "ppl")]
        rows.append(
            f"| {system} | "
            + " | ".join("-" if c is None else f"{c:.3f}" if i < 3 else f"{c:.2f}" for i, c in enumerate(cells))
            + " |"
        )
    return "\n".join([head, *rows])


def summary(report: dict) -> str:
    """The tables, for the terminal."""
    parts = []
    for pop in POPULATIONS:
        if pop in report:
            parts.append(f"{pop} ({report['counts'][pop]} products)\n{table(report, pop)}")
    return "\n\n".join(parts)


def render_md(report: dict) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Run `{report['run']}`, engine {report['engine']}, data: {report['data']}. "
        f"Up to {report['settings']['samples']} products per population (seed {report['settings']['seed']}), greedy "
        f"answers of at most {report['settings']['max_new_tokens']} new tokens. ROUGE is F1 (0-1, mean over products, stemmed); BLEU is sacrebleu "
        "corpus BLEU (0-100); loss and perplexity are teacher-forced on the reference answer tokens only.",
        "",
    ]
    for pop, title, note in (
        (
            "seen",
            "Seen products (from the training set)",
            "Did the model learn the catalogue? **Retrieval here is not a real baseline:** it searches the training "
            "catalogue, so it finds the very product asked about and scores ROUGE near 1 by construction.",
        ),
        (
            "heldout",
            "Held-out products (never trained on)",
            "Does the tuned model carry the style over to new products? Retrieval answers with the description of the "
            "most similar training title (BM25): the number to beat.",
        ),
    ):
        lines += [f"## {title}", "", note, ""]
        lines += [table(report, pop) if pop in report else "_No products in this population._", ""]
    systems = [s for s in ("base", "tuned", "rag", "retrieval") if report["examples"] and s in report["examples"][0]]
    lines += ["## Examples", ""]
    picked = [e for e in report["examples"] if e["population"] == "heldout"][:3]
    picked += [e for e in report["examples"] if e["population"] == "seen"][: 3 - len(picked)]
    for e in picked:
        lines += [
            f"**{e['population']}**: {_cell(e['question'])}",
            "",
            "| reference | " + " | ".join(systems) + " |",
            "|---" * (len(systems) + 1) + "|",
            "| " + " | ".join(_cell(e[k]) for k in ["reference", *systems]) + " |",
            "",
        ]
    lines.append("![ROUGE-L and BLEU per system](report.png)")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    text = " ".join((text or "").split())
    if len(text) > EXAMPLE_CHARS:
        text = text[: EXAMPLE_CHARS - 1] + "\u2026"
    return text.replace("|", "\\|") or "(empty)"


def plot(report: dict, path: Path) -> None:
    """Grouped bars: ROUGE-L and BLEU per system, one group per population."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pops = [p for p in POPULATIONS if p in report]
    systems = list(report[pops[0]])
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / len(systems)
    for ax, metric, label in zip(fig.subplots(1, 2), ("rougeL", "bleu"), ("ROUGE-L F1", "BLEU (0-100)")):
        for k, system in enumerate(systems):
            values = [report[p][system][metric] or 0.0 for p in pops]
            ax.bar([i + (k - (len(systems) - 1) / 2) * width for i in range(len(pops))], values, width, label=system)
        ax.set_xticks(range(len(pops)), pops)
        ax.set_title(label)
    fig.axes[0].legend()
    if "seen" in pops:
        fig.suptitle("retrieval on seen products finds the product itself (ROUGE near 1 by construction)")
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_reports(run_dir: Path, report: dict) -> None:
    files.write_atomic(run_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    files.write_atomic(run_dir / "report.md", render_md(report))
    plot(report, run_dir / "report.png")
