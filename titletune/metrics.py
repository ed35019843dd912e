"""Scoring answers against reference descriptions, with 95% bootstrap intervals.

Per answer: ROUGE-1/2/L F1 and ROUGE-L precision and recall (rouge_score, stemmed), and "numbers supported": the share
of the numbers in the answer (sizes, ages, pages, counts) that appear in the reference or the product's title, which
shows made-up details that ROUGE hides. Per set: corpus BLEU (sacrebleu, 0-100). Every mean comes with a percentile
bootstrap interval over the products; `paired` bootstraps the difference of two systems on the same products.
"""

from __future__ import annotations

import logging
import re

import numpy as np

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeL_p", "rougeL_r")
METRICS = (*ROUGE, "numbers", "bleu")
RESAMPLES = 1000  # the usual count for 95% percentile intervals; see bench/README.md for their stability
LEVEL = 0.95
SEED = 0  # the resampling is seeded: a report is repeatable
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def numbers(text: str) -> set[str]:
    """The numbers in a text, normalised: "1,000" and "1000" are one number, "2.5" stays 2.5."""
    return {n.replace(",", "").rstrip(".") for n in _NUMBER.findall(text or "")}


def numbers_supported(answer: str, reference: str, title: str = "") -> float | None:
    """The share of the answer's distinct numbers found in the reference or the title; None for an answer with none."""
    said = numbers(answer)
    if not said:
        return None
    return len(said & (numbers(reference) | numbers(title))) / len(said)


def per_answer(answers: list[str], references: list[str], titles: list[str]) -> dict[str, list[float | None]]:
    """One value per answer for every metric but BLEU (which is a corpus statistic)."""
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs "Using default tokenizer." per scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out: dict[str, list[float | None]] = {name: [] for name in (*ROUGE, "numbers")}
    for answer, reference, title in zip(answers, references, titles, strict=True):
        scores = scorer.score(reference, answer)
        out["rouge1"].append(scores["rouge1"].fmeasure)
        out["rouge2"].append(scores["rouge2"].fmeasure)
        out["rougeL"].append(scores["rougeL"].fmeasure)
        out["rougeL_p"].append(scores["rougeL"].precision)
        out["rougeL_r"].append(scores["rougeL"].recall)
        out["numbers"].append(numbers_supported(answer, reference, title))
    return out


def bleu(answers: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(answers, [references]).score)


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(resampled) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap statistics, unrounded."""
    low, high = np.quantile(resampled, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


def interval(values: list[float | None], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Mean and 95% percentile bootstrap interval of the values that are not None; n is how many there were."""
    kept = np.array([v for v in values if v is not None], dtype=float)
    if kept.size == 0:
        return {"mean": None, "ci": [None, None], "n": 0}
    means = kept[_indices(kept.size, resamples, seed)].mean(axis=1)
    return {"mean": _r(kept.mean()), "ci": [_r(x) for x in _percentiles(means)], "n": int(kept.size)}


def bleu_interval(answers: list[str], references: list[str], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Corpus BLEU and its bootstrap interval, the corpus resampled by product."""
    if not answers:
        return {"mean": None, "ci": [None, None], "n": 0}
    scores = [
        bleu([answers[i] for i in rows], [references[i] for i in rows])
        for rows in _indices(len(answers), resamples, seed)
    ]
    return {"mean": _r(bleu(answers, references)), "ci": [_r(x) for x in _percentiles(scores)], "n": len(answers)}


def paired(a: list[float | None], b: list[float | None], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Mean of a - b over the products where both have a value, its 95% paired bootstrap interval, and whether the
    interval excludes 0 (significant at the 5% level)."""
    diffs = np.array([x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None], dtype=float)
    if diffs.size == 0:
        return {"mean": None, "ci": [None, None], "n": 0, "significant": False}
    low, high = _percentiles(diffs[_indices(diffs.size, resamples, seed)].mean(axis=1))
    return {
        "mean": _r(diffs.mean()),
        "ci": [low, high],
        "n": int(diffs.size),
        "significant": bool(low > 0 or high < 0),
    }


def score(answers: list[str], references: list[str], titles: list[str]) -> tuple[dict, dict]:
    """({metric: {mean, ci, n}}, the per-answer values) for one system on one population."""
    values = per_answer(answers, references, titles)
    summary = {name: interval(values[name]) for name in values}
    summary["bleu"] = bleu_interval(answers, references)
    return summary, values


def _r(x) -> float:
    return round(float(x), 4)
