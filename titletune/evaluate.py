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
Returns the report (report.json's content); pipeline.finish writes it with report.md and report.png (reports.py).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from titletune import engines, metrics, prompts, retrieval
from titletune.config import EVAL_SAMPLES, RAG_K
from titletune.engines import Sampling
from titletune.errors import Problems, UserError
from titletune.runs import Run

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
# What report.json keeps of each product asked: the question, the reference, what was retrieved, and every answer.
EXAMPLE_KEYS = ("population", "id", "title", "question", "reference", "retrieved", "distractors", *SYSTEMS)


@dataclass(frozen=True)
class EvalSettings:
    """How a run is scored: the one record that train.py's evaluation after training and infer.py evaluate both
    build, saved in report.json as `settings`, so two reports of one run differ only where their settings do."""

    samples: int = EVAL_SAMPLES  # products per population; train.py passes --eval-samples
    seed: int | None = None  # which products are sampled; None: the run's own seed
    data: str | None = None  # a trn-format file to sample from; None: the run's own splits
    rag_k: int = RAG_K  # catalogue entries in a RAG prompt
    rag_index: str | None = None  # a trn-format file to search; None: the run's training products
    sampling: Sampling = field(default_factory=Sampling)  # the decoding of every system: infer.py's defaults

    def check(self, problems: Problems | None = None) -> None:
        """Every problem with these settings (raised at once, or added to `problems`). The flags that set them:
        --samples (infer.py evaluate) or --eval-samples (train.py), --rag-k, and the sampling flags."""
        found = Problems() if problems is None else problems
        found.at_least("--samples", self.samples, 1)
        found.at_least("--rag-k", self.rag_k, 1)
        self.sampling.check(found)
        if problems is None:
            found.done()

    def for_run(self, run: Run) -> EvalSettings:
        """These settings with the run's own seed and answer length filled in."""
        seed = run.seed if self.seed is None else self.seed
        return dataclasses.replace(self, seed=seed, sampling=self.sampling.for_run(run))


def evaluate_run(run: Run, settings: EvalSettings | None = None, engine=None, batch_size: int = 8) -> dict:
    """Score the six systems on `settings.samples` seen and as many held-out products; return the report (written by
    pipeline.finish).

    engine: a loaded hf_engine.TransformersEngine/engines.LlamaCppEngine (reused, not reloaded), "transformers",
    "llamacpp", or None (transformers). Loss and perplexity need transformers; with llamacpp they are null.
    """
    settings = (settings or EvalSettings()).for_run(run)
    settings.check()
    started = time.perf_counter()
    train = run.split("train")
    if not train:
        raise UserError(f"{run.data / 'train.jsonl'} is missing or empty; the run's data split is needed.")
    pops = sample_populations(run, train, settings.samples, settings.seed, settings.data)
    if not any(pops.values()):
        raise UserError(f"no products to evaluate in {settings.data or run.data}.")
    index = retrieval.open_index(run, settings.rag_index)
    if engine is None or isinstance(engine, str):
        engine = engines.load_engine(run, engine or "transformers")
    missing = [s for s in engines.MODELS if s not in engine.systems]
    if missing:
        raise UserError(f"evaluation compares base and tuned; the engine was loaded without {missing}.")
    items = [_item(run, index, settings.rag_k, pop, p) for pop, products in pops.items() for p in products]
    for item in items:
        entries = len(item["retrieved"])
        for key in ("rag_prompt", "distractor_prompt"):
            engines.check_length(engine, item[key], settings.sampling.max_new_tokens, entries, settings.rag_k)
    timing = _answer(items, engine, settings.sampling, batch_size)
    report = _score(items, engine, batch_size)
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
        examples=[{k: i[k] for k in EXAMPLE_KEYS} for i in items],
    )
    seen = [i for i in items if i["population"] == "seen"]
    if seen and run.prompts.held_out:
        t0 = time.perf_counter()
        report["seen_new_phrasing"] = new_phrasing(run, seen, engine, settings, batch_size)
        report["seconds"]["new_phrasing"] = round(time.perf_counter() - t0, 2)
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)
    log.info(
        "evaluate: %s",
        " ".join(f"{p}: tuned rougeL {report[p]['tuned']['rougeL']['mean']}" for p in POPULATIONS if p in report),
    )
    return report


def _item(run: Run, index, k: int, pop: str, p: dict) -> dict:
    """One product's question (the phrasing training picked for it, at the run's seed), its reference answer, and
    every prompt the systems are asked: plain, with the top k entries, and with k entries not its own."""
    ps = run.prompts
    row = prompts.render(ps, p["title"], p["content"], key=str(p["id"]), seed=run.seed)
    question = row["prompt"][-1]["content"]
    hits = index.search(question, k + DISTRACTOR_SLACK)
    others = [h for h in hits if not _same_product(h, p)][:k]
    if len(others) < k:  # the nearest titles, as training's distractors are found
        found = {h["id"] for h in others}
        near = index.neighbours(p["title"], k + DISTRACTOR_SLACK)
        others += [h for h in near if h["id"] not in found and not _same_product(h, p)]
        others = others[:k]
    hits = hits[:k]
    return {
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


def _answer(items: list[dict], engine, sampling: Sampling, batch_size: int) -> dict:
    """Every generated system's answers into the items; the seconds each took."""
    timing = {}
    for system, (model, prompt) in GENERATED.items():
        t0 = time.perf_counter()
        convs = [i[PROMPTS[prompt]] for i in items]
        answers = engine.generate(convs, model, sampling, batch_size=batch_size, progress=True)
        timing[system] = round(time.perf_counter() - t0, 2)
        for item, answer in zip(items, answers, strict=True):
            item[system] = answer
    return timing


def _score(items: list[dict], engine, batch_size: int) -> dict:
    """Per population: each system's metrics with intervals, base's and tuned's loss and perplexity (when the engine
    has logits), and the paired differences of PAIRS."""
    report: dict = {"differences": {}}
    for pop in POPULATIONS:
        group = [i for i in items if i["population"] == pop]
        if not group:
            continue
        refs, titles = [i["reference"] for i in group], [i["title"] for i in group]
        report[pop], values = {}, {}
        for system in SYSTEMS:
            report[pop][system], values[system] = metrics.score([i[system] for i in group], refs, titles)
        for system in engines.MODELS:
            loss, ppl = None, None
            if engine.supports_loss:
                loss, ppl = engines.perplexity(*engine.loss([i["row"] for i in group], system, batch_size))
            report[pop][system].update(loss=_round(loss), ppl=_round(ppl))
        report["differences"][pop] = {
            f"{a} - {b}": {m: metrics.paired(values[a][m], values[b][m]) for m in values[a]} for a, b in PAIRS
        }
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
    convs = [prompts.messages(ps.system, q) for q in questions]
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
    read_keys = {title_key(r["title"]) for r in run.read_products()}
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
