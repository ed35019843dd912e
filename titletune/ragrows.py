"""RAG-aware training rows: a share of each pass's products is also asked with catalogue entries in the prompt.

    prepare: data/train.jsonl -> a seeded share of it (--rag-read) moves to data/rag_read.jsonl: products the model
             reads, never recalls -> the search index over both -> data/rag_train.jsonl (one line per train product,
             in train.jsonl's order: its nearest neighbours, the product left out) and each read product's neighbours
    training: each pass, a seeded share of the products (--rag-share) gets one more row, asked through the run's
              rag.txt / rag_entry.txt with 1 to RAG_TRAIN_ENTRIES entries in a seeded order:
              - its own entry, plus neighbours as distractors;
              - or, for a share of those rows (--rag-distractors), neighbours only, so that the answer must come from
                memory and no row teaches the model to copy whatever entry it is given.
              The completion is the product's own description: the loss stays on the answer.
              Each pass also asks every read product with its own entry (and neighbours): it has no plain row, so
              the answer must be read from the entry whose title is the one asked, as for a product never trained.
              Without these rows nothing tells reading from recalling (the own entry is also what the model
              learned), and distractors-only rows teach it to ignore entries altogether (bench/README.md).

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
READ_FILE = "rag_read.jsonl"
# Neighbours kept per product: enough for RAG_TRAIN_ENTRIES distractors whatever the row draws.
NEIGHBOURS = 3
# Entries in a training RAG row, at most. Answers use --rag-k entries (1 by default, config.RAG_K); 2 here puts the
# right entry beside a near-duplicate, so the model learns to pick the entry whose title is the one asked, and keeps a
# row within config.RAG_MAX_LENGTH tokens at the CPU default's 400-character descriptions.
RAG_TRAIN_ENTRIES = 2


def write_neighbours(folder: Path, read: float = 0.0, seed: int = 0, progress: bool = True) -> int:
    """data/rag_train.jsonl beside data/train.jsonl: each train product's neighbours ({"title", "content"}, best
    first), the nearest titles in an index of the train and read products (Index.neighbours), topped up with other
    products when the title shares no word with enough of them. First a seeded share `read` of the train products
    moves out of train.jsonl into data/rag_read.jsonl (id, title, content, neighbours); at least one stays.
    Returns the products moved to rag_read.jsonl."""
    from titletune import retrieval

    folder = Path(folder)
    lines = [line for line in (folder / "train.jsonl").read_bytes().splitlines() if line.strip()]
    rows = [orjson.loads(line) for line in lines]
    picked = [_draw(seed, str(r["id"]), 0, "read") < read for r in rows]
    if all(picked):
        picked[0] = False
    products = [{"id": r["id"], "title": r["title"], "content": r["content"]} for r in rows]
    scratch = Path(tempfile.mkdtemp(prefix=".rag-", dir=folder))
    try:
        index = retrieval.for_rows(scratch, "train", products)
        with (
            files.atomic_path(folder / FILE) as tmp,
            files.atomic_path(folder / READ_FILE) as tmp_read,
            open(tmp, "wb") as out,
            open(tmp_read, "wb") as out_read,
        ):
            for product, is_read in zip(_progress(products, progress), picked, strict=True):
                hits = index.neighbours(product["title"], NEIGHBOURS + 1)
                near = [{"title": h["title"], "content": h["content"]} for h in hits if h["id"] != str(product["id"])]
                near += _others(products, product, NEIGHBOURS - len(near), {n["title"] for n in near})
                if is_read:
                    out_read.write(
                        orjson.dumps({**product, "id": str(product["id"]), "neighbours": near[:NEIGHBOURS]})
                    )
                    out_read.write(b"\n")
                else:
                    out.write(orjson.dumps({"id": str(product["id"]), "neighbours": near[:NEIGHBOURS]}) + b"\n")
        index.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    moved = sum(picked)
    if moved:
        kept = b"".join(line + b"\n" for line, is_read in zip(lines, picked, strict=True) if not is_read)
        files.write_atomic(folder / "train.jsonl", kept)
    return moved


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
    return _asked_with(ps, product, chosen, seed, turn) if chosen else None


def read_row(ps: prompts.PromptSet, product: dict, neighbours: list[dict], seed: int, turn: int) -> dict:
    """A read product's row in pass `turn`: asked with its own entry, beside up to RAG_TRAIN_ENTRIES - 1
    neighbours in a seeded order, never distractors only (it has no memory to answer from)."""
    return _asked_with(ps, product, entries(product, neighbours, seed, turn, distractors=0.0), seed, turn)


def _asked_with(ps: prompts.PromptSet, product: dict, chosen: list[dict], seed: int, turn: int) -> dict:
    """The product's question of pass `turn` with the chosen entries, and its own description as the completion."""
    plain = prompts.render(ps, product["title"], product["content"], key=str(product["id"]), seed=seed, turn=turn)
    asked = plain["prompt"][-1]["content"]
    # rag_messages makes the entries plain text with the rest of the user message (prompts.defang).
    return {"prompt": prompts.rag_messages(ps, asked, chosen), "completion": plain["completion"]}


def read_rows(folder: Path) -> list[dict]:
    """A run's read products (data/rag_read.jsonl: id, title, content, neighbours; [] without it): never trained
    plainly, and not held out either, as they were read in training."""
    path = Path(folder) / READ_FILE
    if not path.is_file():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
