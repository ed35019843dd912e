"""Seeded selection and splitting: filter, dedupe and sample products, and write each to its split file.

Which products are kept depends only on the file, the filters and the seed: the sample is the max_samples smallest
seeded title hashes (`hashes`) among the distinct valid products, and a product's split depends on its title alone
(`split_of`). The parallel path (--data-workers) is here too, beside the code it must match: it writes byte for byte
what one process writes (its processes and chunks: chunks.py).
"""

from __future__ import annotations

import hashlib
import heapq
import os
from array import array
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from titletune import chunks, files
from titletune import prompts as prompts_lib
from titletune.config import DataArguments
from titletune.errors import UserError
from titletune.prompts import PromptSet
from titletune.reading import is_gzip, rows_of, sniff
from titletune.text import clean_text, clean_title, title_key, truncate

if TYPE_CHECKING:
    import numpy as np

SPLITS = ("train", "val", "test")


def hashes(key: str, seed: int) -> tuple[int, float]:
    """(rank, u) for one title_key: rank orders the seeded sample and dedupes; u in [0, 1) picks the split.

    Both come from one blake2b digest (stable across runs and machines, unlike Python's salted hash) and are
    independent, so taking the N smallest ranks leaves the split shares unbiased.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little") / 2.0**64


def split_of(u: float, val_size: float, test_size: float) -> str:
    """train for u below 1 - val_size - test_size, then val, then test; depends on the product alone."""
    if u < 1 - val_size - test_size:
        return "train"
    if u < 1 - test_size:
        return "val"
    return "test"


def render_line(prompts: PromptSet, seed: int, pid: str, title: str, content: str) -> bytes:
    """One product as the JSON line of a split file: id, title, content and the prompt/completion messages."""
    row = {"id": pid, "title": title, "content": content}
    row.update(prompts_lib.render(prompts, title, content, key=pid, seed=seed))
    return orjson.dumps(row) + b"\n"


def clean_product(row: dict, min_chars: int) -> tuple[str, str, str] | str:
    """The filter every raw row passes before dedupe: (title, title_key, content), cleaned, or the drop reason
    (empty_title, empty_content, short_content). Training data and the evaluation's samples both go through it."""
    title = clean_title(row["title"])
    if not title:
        return "empty_title"
    content = clean_text(row["content"])
    if not content:
        return "empty_content"
    if len(content) < min_chars:
        return "short_content"
    key = title_key(title)  # after the content checks: a third of the real rows stop there
    if not key:
        return "empty_title"  # punctuation only, e.g. "!!!"
    return title, key, content


class SplitWriter:
    """Rows go straight to temporary split files; close() tops up empty val/test and renames them into place."""

    def __init__(self, folder: Path, prompts: PromptSet, seed: int, val_size: float, test_size: float):
        self.folder, self.prompts, self.seed = folder, prompts, seed
        self.val_size, self.test_size = val_size, test_size
        self.tmp = {s: files.tmp_name(folder / f"{s}.jsonl") for s in SPLITS}
        # Closed in close() or abort(); a 1 MB buffer because rows are small and there are up to 1.4M of them.
        self.files = {s: open(p, "wb", buffering=1 << 20) for s, p in self.tmp.items()}  # noqa: SIM115
        self.counts = Counter({s: 0 for s in SPLITS})
        self.truncated = 0
        self.markers = 0
        self.last_train: list[tuple[float, int]] = []  # the two train rows with the largest u: (u, line index)

    def add(self, pid: str, title: str, content: str, u: float, truncated: bool) -> None:
        self.add_line(render_line(self.prompts, self.seed, pid, title, content), u, truncated)

    def add_line(self, line: bytes, u: float, truncated: bool) -> None:
        """One rendered row (render_line), written to the split that u picks."""
        split = split_of(u, self.val_size, self.test_size)
        self.files[split].write(line)
        if split == "train" and (len(self.last_train) < 2 or u > self.last_train[-1][0]):
            self.last_train = sorted([*self.last_train, (u, self.counts["train"])], reverse=True)[:2]
        self.counts[split] += 1
        self.truncated += truncated
        # A marker made plain text (prompts.defang); decoded only in the rare row that holds a zero-width space.
        if b"\xe2\x80\x8b" in line and prompts_lib.DEFANGED.search(line.decode("utf-8", "replace")):
            self.markers += 1

    def close(self) -> dict[str, int]:
        for f in self.files.values():
            f.close()
        self._top_up()
        total = sum(self.counts[s] for s in SPLITS)
        if total and not self.counts["train"]:
            self.abort()
            raise UserError(
                f"none of the {total} kept product(s) fell in the train split (val {self.counts['val']}, test "
                f"{self.counts['test']}): raise --max-samples, or pass --val-size 0 --test-size 0 to train on them all."
            )
        for split in SPLITS:
            files.sync(self.tmp[split])  # on disk before the rename (files.py)
            os.replace(self.tmp[split], self.folder / f"{split}.jsonl")
        files.sync_dir(self.folder)
        return {s: self.counts[s] for s in SPLITS}

    def abort(self) -> None:
        for split in SPLITS:
            self.files[split].close()
            self.tmp[split].unlink(missing_ok=True)

    def _top_up(self) -> None:
        """With >= 10 products, move the train rows nearest the val/test range so neither held-out split is empty."""
        empty = [
            s for s, size in (("val", self.val_size), ("test", self.test_size)) if size > 0 and not self.counts[s]
        ]
        if sum(self.counts.values()) < 10 or not empty or self.counts["train"] <= len(empty):
            return
        # The train rows with the largest u sit nearest the held-out ranges: the largest moves first.
        moves = {split: index for split, (_, index) in zip(empty, self.last_train[: len(empty)], strict=True)}
        lines = self.tmp["train"].read_bytes().splitlines(keepends=True)
        for split, index in moves.items():
            self.tmp[split].write_bytes(lines[index])
            self.counts[split] += 1
            self.counts["train"] -= 1
        taken = set(moves.values())
        self.tmp["train"].write_bytes(b"".join(line for i, line in enumerate(lines) if i not in taken))


class Selection:
    """Filter, dedupe and sample products one row at a time.

    Memory: one 8-byte hash per distinct valid title (dedupe), two lengths per product (EDA), and with max_samples
    a heap of at most max_samples products. Nothing else of a row outlives its turn.
    """

    def __init__(self, seed: int, max_samples: int | None, min_chars: int, max_chars: int, counts: Counter):
        self.seed, self.max_samples, self.min_chars, self.max_chars = seed, max_samples, min_chars, max_chars
        self.counts = counts
        self.seen: set[int] = set()
        self.title_lengths, self.content_lengths = array("I"), array("I")
        # (-rank, order, id, title, content, u, truncated): a max-heap that keeps the smallest ranks seen so far
        self.heap: list[tuple] = []
        self.order = 0
        # Set in a worker of select_parallel: the rank of every distinct product in order, and a rank that
        # max_samples products of earlier chunks are already below (none of this chunk's can be chosen above it).
        self.ranks: array | None = None
        self.bound = 1 << 64

    def add(self, row: dict) -> tuple | None:
        """Take one raw row. Returns (id, title, content, u, truncated) to write now when every product is kept."""
        self.order += 1
        product = clean_product(row, self.min_chars)
        if isinstance(product, str):
            self.counts[product] += 1
            return None
        title, key, content = product
        rank, u = hashes(key, self.seed)
        # A set of 64-bit hashes, not titles: ~70 bytes per product, and a false duplicate among 1.4M distinct
        # titles has odds of about 1 in 10 million.
        if rank in self.seen:
            self.counts["duplicate_title"] += 1
            return None
        self.seen.add(rank)
        self.title_lengths.append(len(title))
        self.content_lengths.append(len(content))
        if self.ranks is not None:
            self.ranks.append(rank)
        heap = self.heap
        if self.max_samples is None:
            short = content if len(content) <= self.max_chars else truncate(content, self.max_chars)
            return row["id"], title, short, u, len(short) < len(content)
        if rank >= self.bound:
            return None
        if len(heap) == self.max_samples:
            self.counts["over_max_samples"] += 1  # this product, or the one it pushes out of the heap
            if rank >= -heap[0][0]:
                return None
        short = content if len(content) <= self.max_chars else truncate(content, self.max_chars)
        item = (-rank, self.order, row["id"], title, short, u, len(short) < len(content))
        if len(heap) < self.max_samples:
            heapq.heappush(heap, item)
        else:
            heapq.heapreplace(heap, item)
        return None

    def chosen(self) -> list[tuple]:
        """The sampled products, (id, title, content, u, truncated), in file order; empties the heap."""
        items, self.heap = self.heap, []
        return [item[2:] for item in sorted(items, key=lambda item: item[1])]


# Parallel reading (--data-workers): a plain JSON-lines file is cut at line ends into chunks that worker processes
# read, clean, filter and dedupe on their own. The main process then dedupes across chunks (the first occurrence in
# file order wins, as in one process) and takes the max_samples smallest ranks, so the output is byte for byte the
# one a single process writes.
PARALLEL_MIN_BYTES = 64 * 1024**2  # below this, starting the workers costs more than they save ('auto' only)
CHUNK_BYTES = 32 * 1024**2  # one task: ~37k real rows, ~0.4 s; small enough for a smooth bar and flat memory
MAX_WORKERS = 8


def data_workers(value: str | int, path: Path) -> int:
    """--data-workers as a number of processes: 'auto' is one per usable CPU (at most 8) for a plain JSON-lines file
    of 64 MB or more, else 1. A gzip file or a JSON array is always read by one process."""
    text = str(value).strip().lower()
    if text == "auto":
        workers = min(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, MAX_WORKERS
        )
        if path.stat().st_size < PARALLEL_MIN_BYTES:
            return 1
    else:
        try:
            workers = int(text)
        except ValueError:
            workers = 0
        if workers < 1:
            raise UserError(f"--data-workers must be 'auto' or a number of processes >= 1, got {value!r}.")
    if workers > 1 and (is_gzip(path) or sniff(path) == b"["):
        return 1
    return workers


def _chunk_worker(task: dict) -> dict:
    """Read, clean, filter and dedupe one chunk; keep its max_samples smallest ranks under task['bound'], or with
    max_samples 'all' write every distinct product, rendered, to task['tmp']."""
    lines = chunks.read(task["path"], task["start"], task["end"]).split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the chunk ends with a newline
    counts: Counter = Counter()
    selection = Selection(task["seed"], task["max_samples"], task["min_chars"], task["max_chars"], counts)
    selection.ranks, selection.bound = array("Q"), task["bound"]
    us, cut = array("d"), array("B")
    out = open(task["tmp"], "wb", buffering=1 << 20) if task["max_samples"] is None else None  # noqa: SIM115
    try:
        for row in rows_of(lines, task["first"], task["title_field"], task["content_field"], counts):
            product = selection.add(row)
            if product is not None:  # max_samples 'all': every distinct product, in file order
                pid, title, content, u, truncated = product
                out.write(render_line(task["prompts"], task["seed"], pid, title, content))
                us.append(u)
                cut.append(truncated)
    finally:
        if out is not None:
            out.close()
    offset = task["index"] << 40  # file order across chunks: (chunk, row in chunk)
    items = [(-neg, offset + order, *rest) for neg, order, *rest in selection.heap]
    del counts["over_max_samples"]  # counted over the whole file by the main process
    return {
        "counts": counts,
        "items": items,
        "ranks": selection.ranks,
        "title_lengths": selection.title_lengths,
        "content_lengths": selection.content_lengths,
        "u": us,
        "truncated": cut,
    }


def select_parallel(
    path: Path,
    args: DataArguments,
    seed: int,
    max_samples: int | None,
    prompts: PromptSet,
    counts: Counter,
    writer: SplitWriter,
    workers: int,
) -> tuple[array, array]:
    """The parallel equivalent of the loop in prepare(); writes through `writer`, returns the EDA lengths.

    The workers read their chunks (chunks.run, _chunk_worker); the main process dedupes across them (_dedupe), then
    writes the sample's products, or every distinct product from the chunk files the workers rendered them to, in
    file order.
    """
    ranges = chunks.ranges(path, path.stat().st_size, CHUNK_BYTES)
    tmp = [files.tmp_name(writer.folder / f"chunk{i}.jsonl") for i in range(len(ranges))]
    settings = {
        "path": str(path),
        "seed": seed,
        "max_samples": max_samples,
        "min_chars": args.min_content_chars,
        "max_chars": args.max_content_chars,
        "title_field": args.title_field,
        "content_field": args.content_field,
        "prompts": prompts,
    }
    merged = chunks.run(_chunk_worker, path, ranges, settings, tmp, counts, workers)
    if not counts["rows_read"]:
        raise UserError(
            f"data file {path} holds no JSON rows (only blank lines); re-download it or pass another --data."
        )
    first, lengths = _dedupe(merged.results, counts)
    try:
        if max_samples is not None:
            chosen, _ = chunks.smallest(merged.candidates, max_samples)
            counts["over_max_samples"] += int(first.sum()) - len(chosen)
            for _rank, _order, *product in sorted(chosen, key=lambda item: item[1]):
                writer.add(*product)
        else:
            _write_all(merged.results, first, tmp, writer)
    finally:
        for file in tmp:
            file.unlink(missing_ok=True)
    return lengths


def _dedupe(results: list[dict], counts: Counter) -> tuple[np.ndarray, tuple[array, array]]:
    """Across chunks, the first occurrence of a rank in file order is the distinct product; later ones are duplicates
    (counted). Returns the mask of first occurrences over the chunks' products in order, and the distinct products'
    EDA lengths (titles, contents)."""
    import numpy as np

    ranks = np.concatenate([np.frombuffer(r["ranks"], dtype=np.uint64) for r in results])
    first = np.zeros(len(ranks), dtype=bool)
    first[np.unique(ranks, return_index=True)[1]] = True
    counts["duplicate_title"] += len(ranks) - int(first.sum())
    title_lengths, content_lengths = array("I"), array("I")
    for name, lengths in (("title_lengths", title_lengths), ("content_lengths", content_lengths)):
        lengths.frombytes(np.concatenate([np.frombuffer(r[name], np.uint32) for r in results])[first].tobytes())
    return first, (title_lengths, content_lengths)


def _write_all(results: list[dict], first: np.ndarray, tmp: list[Path], writer: SplitWriter) -> None:
    """max_samples 'all': each chunk file's distinct products, chunk by chunk, each file removed once written."""
    offset = 0
    for index, result in enumerate(results):
        keep = first[offset : offset + len(result["ranks"])].tolist()
        with open(tmp[index], "rb") as f:
            for line, wanted, u, truncated in zip(f, keep, result["u"], result["truncated"], strict=True):
                if wanted:
                    writer.add_line(line, u, bool(truncated))
        offset += len(result["ranks"])
        tmp[index].unlink()
