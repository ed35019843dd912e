"""RAG-aware training rows: a share of each pass's products is also asked with catalogue entries in the prompt.

    prepare: data/train.jsonl -> the search index over the training products -> data/rag_train.jsonl
             (one line per train product, in train.jsonl's order: its nearest neighbours, the product left out)
    training: each pass, a seeded share of the products (--rag_share) gets one more row, asked through the run's
              rag.txt / rag_entry.txt with 1 to RAG_TRAIN_ENTRIES entries in a seeded order:
              - its own entry, plus neighbours as distractors;
              - or, for a share of those rows (--rag_distractors), neighbours only, so that the answer must come from
                memory and no row teaches the model to copy whatever entry it is given.
              The completion is the product's own description: the loss stays on the answer.

Neighbours are the training products whose titles the search index ranks nearest the product's (bm25 over the titles,
retrieval.Index.neighbours), so near-identical titles ("Girls Ballet Tutu Neon Blue" for "... Neon Pink") are the
distractors, as they are at answer time. Every
choice is a hash of the product, the pass and the seed: the same rows on every run, every rank and every resume.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

import orjson

from titletune import files, prompts

log = logging.getLogger(__name__)

FILE = "rag_train.jsonl"
# Neighbours kept per product: enough for RAG_TRAIN_ENTRIES distractors whatever the row draws.
NEIGHBOURS = 3
# Entries in a training RAG row, at most. Answers use --rag_k entries (1 by default, config.RAG_K); 2 here puts the
# right entry beside a near-duplicate, so the model learns to pick the entry whose title is the one asked, and keeps a
# row within config.RAG_MAX_LENGTH tokens at the CPU default's 400-character descriptions.
RAG_TRAIN_ENTRIES = 2


def write_neighbours(folder: Path, progress: bool = True) -> int:
    """data/rag_train.jsonl beside data/train.jsonl: each train product's neighbours ({"title", "content"}, best
    first), the nearest titles in an index of the train products (Index.neighbours), topped up with other products when
the title shares no word with enough of them. Returns the products written."""
    from titletune import retrieval

    folder = Path(folder)
    rows = [orjson.loads(line) for line in (folder / "train.jsonl").read_bytes().splitlines() if line.strip()]
    scratch = Path(tempfile.mkdtemp(prefix=".rag-", dir=folder))
    try:
        index = retrieval.for_rows(scratch, "train", rows)
        with files.atomic_path(folder / FILE) as tmp, open(tmp, "wb") as out:
            for row in _progress(rows, progress):
                hits = index.neighbours(row["title"], NEIGHBOURS + 1)
                near = [{"title": h["title"], "content": h["content"]} for h in hits if h["id"] != str(row["id"])]
                near += _others(rows, row, NEIGHBOURS - len(near), {n["title"] for n in near})
                out.write(orjson.dumps({"id": str(row["id"]), "neighbours": near[:NEIGHBOURS]}) + b"\n")
        index.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return len(rows)


def _others(rows: list[dict], product: dict, n: int, taken: set[str]) -> list[dict]:
    """Up to n other products at positions hashed from the product's id: distractors for a title that shares no
    word with another product (short titles such as "Harlequin" do in the real file)."""
    out: list[dict] = []
    for attempt in range(4 * n if len(rows) > 1 else 0):
        other = rows[int(_draw(0, str(product["id"]), attempt, "other") * len(rows))]
        if other["id"] != product["id"] and other["title"] not in taken and len(out) < n:
            out.append({"title": other["title"], "content": other["content"]})
            taken.add(other["title"])
    return out


def _progress(rows: list, show: bool):
    if not show or len(rows) < 1000:
        return rows
    from tqdm.auto import tqdm

    return tqdm(rows, desc="rag neighbours", unit=" products", mininterval=2)


def _draw(seed: int, key: str, turn: int, what: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{key}:{turn}:{what}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def entries(product: dict, neighbours: list[dict], seed: int, turn: int, distractors: float) -> list[dict]:
    """The entries of one product's RAG row in pass `turn`: own entry and distractors, or distractors only, in a
    seeded order. [] when the product has no neighbour to stand in for a distractors-only row."""
    key = str(product["id"])
    own = {"title": product["title"], "content": product["content"]}
    count = 1 + int(_draw(seed, key, turn, "count") * RAG_TRAIN_ENTRIES)
    if _draw(seed, key, turn, "distractors") < distractors:
        chosen = neighbours[:count]
    else:
        chosen = [own, *neighbours[: count - 1]]
    order = sorted(range(len(chosen)), key=lambda i: _draw(seed, key, turn, f"order{i}"))
    return [chosen[i] for i in order]


def row(
    ps: prompts.PromptSet,
    product: dict,
    neighbours: list[dict],
    seed: int,
    turn: int,
    share: float,
    distractors: float,
) -> dict | None:
    """Product -> its RAG row in pass `turn` (prompt/completion, as prompts.render), or None when the seeded draw
    leaves it out of this pass's share."""
    key = str(product["id"])
    if _draw(seed, key, turn, "share") >= share:
        return None
    chosen = entries(product, neighbours, seed, turn, distractors)
    if not chosen:
        return None
    plain = prompts.render(ps, product["title"], product["content"], key=key, seed=seed, turn=turn)
    asked = plain["prompt"][-1]["content"]
    # rag_messages makes the entries plain text with the rest of the user message (prompts.defang).
    return {"prompt": prompts.rag_messages(ps, asked, chosen), "completion": plain["completion"]}
