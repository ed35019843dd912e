"""Will the catalogue fit? How much of it an adapter can hold, predicted before training.

The capacity ratio is the answer tokens a run asks the adapter to store (train products x mean answer tokens) per
trainable parameter. Seen recall (ROUGE-L F1 of the tuned answers on trained products) falls with it along a logistic
in log10(ratio), from 1 down to `floor`, what the base model scores (the catalogue's voice, none of the product).
Fewer views of each product act as a larger ratio: ratio x (law views / views) ** views_exponent.

The law's constants live in config.py (CAPACITY_*), fitted by `bench/bench_capacity.py --fit` to the rows of
bench/capacity_results.jsonl; bench/README.md ("Capacity") has the figures. Nothing here reads files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from titletune import config

FILE = "capacity.json"  # in the run folder: what train.py computed before training (card.py, evaluate.py read it)
EDGE = 0.01  # recall shares closer than this to the floor or to 1 are clipped before the logit in fit()


@dataclass(frozen=True)
class Law:
    """recall(ratio, views) = floor + (1 - floor) / (1 + exp(slope * (z - midpoint))), z = log10 of the ratio at the
    law's views: log10(ratio) + views_exponent * log10(self.views / views)."""

    floor: float = config.CAPACITY_FLOOR
    midpoint: float = config.CAPACITY_MIDPOINT
    slope: float = config.CAPACITY_SLOPE
    views: float = config.CAPACITY_VIEWS
    views_exponent: float = config.CAPACITY_VIEWS_EXPONENT

    def z(self, ratio: float, views: float) -> float:
        return math.log10(ratio) + self.views_exponent * math.log10(self.views / views)

    def recall(self, ratio: float, views: float | None = None) -> float:
        x = self.slope * (self.z(ratio, views or self.views) - self.midpoint)
        return self.floor + (1 - self.floor) / (1 + math.exp(min(x, 700.0)))

    def ratio_for(self, recall: float, views: float | None = None) -> float:
        """The largest ratio predicted to reach `recall` at `views` (the inverse of recall())."""
        share = min(max((recall - self.floor) / (1 - self.floor), EDGE), 1 - EDGE)
        z = self.midpoint + math.log((1 - share) / share) / self.slope
        return 10 ** (z - self.views_exponent * math.log10(self.views / (views or self.views)))


@dataclass(frozen=True)
class Estimate:
    """What train.py prints before training and writes to <run>/capacity.json."""

    trainable: int
    products: int
    answer_tokens: float  # mean, over the train split (or a sample of it)
    views: float  # of each product over the whole run (passes x epochs, or what --max-steps allows)
    ratio: float
    recall: float  # predicted seen ROUGE-L F1
    fits_products: int  # train products this adapter holds at WARN_BELOW, at these views and answer lengths

    @property
    def catalogue_tokens(self) -> int:
        return round(self.products * self.answer_tokens)

    def to_json(self, law: Law | None = None) -> dict:
        return {**asdict(self), "catalogue_tokens": self.catalogue_tokens, "law": asdict(law or Law())}


def ratio(products: int, answer_tokens: float, trainable: int) -> float:
    """Answer tokens to store per trainable parameter."""
    return products * answer_tokens / max(trainable, 1)


def estimate(trainable: int, products: int, answer_tokens: float, views: float, law: Law | None = None) -> Estimate:
    law = law or Law()
    r = ratio(products, answer_tokens, trainable)
    fits = law.ratio_for(config.CAPACITY_WARN, views) * trainable / max(answer_tokens, 1e-9)
    return Estimate(trainable, products, answer_tokens, views, r, law.recall(max(r, 1e-12), views), int(fits))


def mean_tokens(tokenizer, texts: list[str]) -> float:
    """Mean tokens of `texts` under the model's tokenizer, without special tokens (0.0 for none)."""
    if not texts:
        return 0.0
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(len(x) for x in ids) / len(ids)


def line(e: Estimate) -> str:
    """The one line train.py prints before training."""
    return (
        f"capacity: {_count(e.trainable)} trainable parameters; catalogue {e.products:,} products x "
        f"{e.answer_tokens:.0f} answer tokens = {_count(e.catalogue_tokens)} tokens; capacity ratio {e.ratio:.3g} "
        f"tokens per parameter; predicted seen ROUGE-L {e.recall:.2f} at {e.views:g} views (provisional law: "
        "bench/README.md, Capacity)"
    )


def warning(e: Estimate) -> str | None:
    """One line when the predicted recall is below config.CAPACITY_WARN: what to expect, and the fixes."""
    if e.recall >= config.CAPACITY_WARN:
        return None
    return (
        f"capacity: predicted seen ROUGE-L {e.recall:.2f} < {config.CAPACITY_WARN:g}: most answers will be "
        f"plausible catalogue text, not the product's own description (this adapter holds about "
        f"{e.fits_products:,} such products at {e.views:g} views). Fix: a higher --lora-r, more --passes, fewer "
        "products (--max-samples), or RAG at inference (--rag-share trains for it; infer.py serve serves "
        "tuned+rag)."
    )


def fit(points: list[tuple[float, float, float]], floor: float, law: Law | None = None) -> Law:
    """A law through (ratio, views, recall) points: midpoint and slope by least squares of the logit of the recall
    share against log10(ratio), over the points at the law's views (at least two ratios); then views_exponent, the
    log10 shift that puts the other points on that curve, least squares through 0 (kept when there are none)."""
    law = law or Law()
    share = [(r, v, min(max((y - floor) / (1 - floor), EDGE), 1 - EDGE)) for r, v, y in points]
    at = [(math.log10(r), math.log((1 - s) / s)) for r, v, s in share if v == law.views]  # logit of 1 - share
    if len({z for z, _ in at}) < 2:
        raise ValueError(f"fit needs points at {law.views:g} views and two ratios at least, got {len(at)}")
    mz, mt = sum(z for z, _ in at) / len(at), sum(t for _, t in at) / len(at)
    slope = sum((z - mz) * (t - mt) for z, t in at) / sum((z - mz) ** 2 for z, _ in at)
    midpoint = mz - mt / slope
    shifts = [
        (math.log10(law.views / v), midpoint + math.log((1 - s) / s) / slope - math.log10(r))
        for r, v, s in share
        if v != law.views
    ]
    exponent = law.views_exponent
    if shifts:
        exponent = sum(x * d for x, d in shifts) / sum(x * x for x, _ in shifts)
    return Law(floor=floor, midpoint=midpoint, slope=slope, views=law.views, views_exponent=exponent)


def _count(n: float) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"
