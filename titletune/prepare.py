"""The prepare stage: products file -> cleaned, deduplicated, sampled, split chat rows, in one streaming pass.

    trn.json(.gz) -> iter_products -> clean_text -> filter -> dedupe (title_key) -> sample (seeded) -> split -> render
    -> <output_dir>/data/{train,val,test}.jsonl + stats.json + eda.md + lengths.png

    reading.py: iter_products    text.py: clean_text, title_key, truncate
    selection.py: filter, dedupe, sample, split, render (and the same with --data-workers processes)
    prepare.py (here): the arguments, the stats, the cache    eda.py: the EDA report (eda.md, lengths.png)

Memory does not grow with the file: rows stream through, and what is kept per product is one 8-byte hash (dedupe)
and two lengths (EDA). With --max-samples N, at most N products are held in a bounded heap; with 'all' every kept
row goes straight to its split file.

prepare_cached() keys that output by the input file, the settings, the prompts and the data code, and links a cached
copy into the run folder when one exists: a rerun with the same settings, in any run folder, skips the pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from array import array
from collections import Counter
from pathlib import Path

import orjson

from titletune import eda, files, ragrows, reading, selection, text
from titletune import prompts as prompts_lib
from titletune.config import DataArguments, parse_max_samples
from titletune.errors import Problems, UserError, flag
from titletune.prompts import PromptSet
from titletune.reading import check_path, first_fields, is_gzip, iter_products
from titletune.selection import SPLITS, Selection, SplitWriter, data_workers, select_parallel

log = logging.getLogger(__name__)

PERCENTILES = (25, 50, 75, 95)

# Reasons a row can be dropped, in pipeline order; stats.json and the "all rows dropped" error use these names.
# reading.py counts the first four, selection.py the rest.
DROP_REASONS = (
    "malformed_json",  # the line is not JSON
    "not_an_object",  # JSON, but not {...}
    "missing_field",  # the title or content field is absent (see --title-field / --content-field)
    "bad_field_type",  # the field holds a list or an object, not text
    "empty_title",  # no letter or digit left after cleaning (5.6% of the real rows)
    "empty_content",  # 33.4% of the real rows
    "short_content",  # cleaned content shorter than --min-content-chars
    "duplicate_title",  # same title_key as an earlier kept product; the first one wins
    "over_max_samples",  # a valid product that the seeded sample left out
)
# Counted while reading (bad_utf8, blank_lines) and writing (chat_markers) but not drops: the row is still used, or
# there was no row at all.
NOTES = ("bad_utf8", "blank_lines", "chat_markers")


def check_args(args: DataArguments, problems: Problems | None = None) -> int | None:
    """Every problem in the data arguments (raised at once, or added to `problems` for the caller to raise with its
    own); return max_samples parsed."""
    max_samples = parse_max_samples(args.max_samples)
    found = Problems() if problems is None else problems
    for name in ("val_size", "test_size"):
        value = getattr(args, name)
        if not 0 <= value < 1:
            found.add(f"{flag(name)} must be a fraction in [0, 1), got {value}")
    if args.val_size + args.test_size >= 1:
        found.add(
            f"--val-size + --test-size must leave some products for training, got {args.val_size + args.test_size}"
        )
    found.at_least("--min-content-chars", args.min_content_chars, 0)
    if args.max_content_chars < max(1, args.min_content_chars):
        found.add(
            f"--max-content-chars ({args.max_content_chars}) must be >= 1 and >= --min-content-chars "
            f"({args.min_content_chars})"
        )
    for name in ("rag_share", "rag_distractors"):
        if not 0 <= getattr(args, name) <= 1:
            found.add(f"{flag(name)} must be a fraction in [0, 1], got {getattr(args, name)}")
    if not 0 <= args.rag_read < 1:
        found.add(f"--rag-read must be a fraction in [0, 1), got {args.rag_read}")
    found.at_least("--passes", args.passes, 1, "views of each product per epoch")
    if not args.title_field or not args.content_field:
        found.add("--title-field and --content-field must name fields of the rows, e.g. title and content")
    if problems is None:
        found.done()
    return max_samples


def prepare(args: DataArguments, seed: int, out_dir: str | Path, prompts: PromptSet) -> dict:
    """Read, clean, filter, dedupe, sample, split and render in one pass; write out_dir/data/*. Returns the stats.

    Which products are kept depends only on the file, the filters and the seed: the sample is the max_samples
    smallest seeded title hashes among the distinct valid products, so a larger max_samples keeps a superset, and a
    product's split depends on its title alone. Rows are written in file order.
    """
    max_samples = check_args(args)
    started = time.perf_counter()
    path = check_path(args.data)
    folder = Path(out_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter({key: 0 for key in (*DROP_REASONS, *NOTES, "rows_read")})
    workers = data_workers(args.data_workers, path)
    writer = SplitWriter(folder, prompts, seed, args.val_size, args.test_size)
    split_counts, lengths = _select(path, args, seed, max_samples, prompts, counts, writer, workers)
    _write_neighbours(folder, args, seed, split_counts)
    counts["chat_markers"] = writer.markers
    stats = _stats(args, seed, path, counts, split_counts, writer.truncated, lengths, max_samples)
    stats["seconds"] = round(time.perf_counter() - started, 2)
    files.write_atomic(folder / "stats.json", orjson.dumps(stats, option=orjson.OPT_INDENT_2) + b"\n")
    files.write_atomic(folder / "eda.md", eda.render(stats).encode())
    eda.plot_lengths(*lengths, folder / "lengths.png")
    _log_done(stats, split_counts, writer)
    return stats


def _select(
    path: Path,
    args: DataArguments,
    seed: int,
    max_samples: int | None,
    prompts: PromptSet,
    counts: Counter,
    writer: SplitWriter,
    workers: int,
) -> tuple[dict[str, int], tuple[array, array]]:
    """The one pass: every product read, filtered, deduplicated and sampled into `writer`'s split files, by
    `workers` processes or this one. Returns (rows per split, (title lengths, content lengths)); on any failure the
    split files are removed."""
    try:
        if workers > 1:
            title_lengths, content_lengths = select_parallel(
                path, args, seed, max_samples, prompts, counts, writer, workers
            )
        else:
            selection = Selection(seed, max_samples, args.min_content_chars, args.max_content_chars, counts)
            for row in iter_products(path, args.title_field, args.content_field, stats=counts, progress=True):
                product = selection.add(row)
                if product is not None:
                    writer.add(*product)
            for product in selection.chosen():
                writer.add(*product)
            title_lengths, content_lengths = selection.title_lengths, selection.content_lengths
        if not sum(writer.counts.values()):
            raise UserError(_all_dropped_message(counts, args))
        split_counts = writer.close()
    except BaseException:
        writer.abort()
        raise
    return split_counts, (title_lengths, content_lengths)


def _write_neighbours(folder: Path, args: DataArguments, seed: int, split_counts: dict[str, int]) -> None:
    """With --rag-share, each train product's nearest neighbours for the RAG rows, and the --rag-read share of them
    moved from "train" to "rag_read" in `split_counts`; else the two files, empty."""
    if args.rag_share > 0:
        log.info("data: finding each train product's nearest neighbours for the RAG rows (--rag-share)")
        read = ragrows.write_neighbours(folder, args.rag_read, seed)
        split_counts["train"] -= read
        split_counts["rag_read"] = read
        if read:
            log.info("data: %s train products are read only, never asked without their entry (--rag-read)", read)
    else:
        files.write_atomic(folder / ragrows.FILE, b"")
        files.write_atomic(folder / ragrows.READ_FILE, b"")


def _log_done(stats: dict, split_counts: dict[str, int], writer: SplitWriter) -> None:
    """The stage's log line, and a warning when kept products held chat-control markers."""
    kept = sum(split_counts.values())
    dropped = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in stats["dropped"].items() if n)
    log.info(
        "data: read %s rows (%s) in %.1f s; kept %s (train %s, val %s, test %s, %s truncated); dropped %s (%s)",
        f"{stats['rows_read']:,}",
        eda.format_bytes(stats["input"]["bytes"]),
        stats["seconds"],
        f"{kept:,}",
        *(f"{split_counts[s]:,}" for s in SPLITS),
        f"{writer.truncated:,}",
        f"{stats['dropped_total']:,}",
        dropped or "none",
    )
    if writer.markers:
        log.warning(
            "data: %s kept products had chat-control markers (e.g. <|im_end|>, [INST]) in their title or "
            "description; they were made plain text, so they never act as special tokens",
            f"{writer.markers:,}",
        )


CACHE_FILES = (*(f"{s}.jsonl" for s in SPLITS), ragrows.FILE, ragrows.READ_FILE, "stats.json", "eda.md", "lengths.png")
CACHE_KEEP = 8  # most recently used entries kept; runs hold hard links, so evicting an entry never breaks a run
_EDGE = 1 << 20  # bytes hashed at each end of the input: a quick content check on top of size and mtime
# The code that prepare()'s output depends on: a change to any of these files gives new cache keys.
CODE = (
    text.__file__,
    reading.__file__,
    selection.__file__,
    __file__,
    eda.__file__,
    prompts_lib.__file__,
    ragrows.__file__,
)


def cache_key(args: DataArguments, seed: int, prompts: PromptSet) -> str:
    """What prepare()'s output depends on, hashed: the input file (path, size, mtime, first and last MB), every data
    argument, the seed, the prompt texts, and the code of the data modules (text, reading, selection, prepare, eda,
    ragrows) and prompts.py (a fix invalidates the cache).
    """
    path = check_path(args.data).resolve()
    stat = path.stat()
    edges = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        edges.update(f.read(_EDGE))
        if stat.st_size > _EDGE:
            f.seek(max(_EDGE, stat.st_size - _EDGE))
            edges.update(f.read(_EDGE))
    # data_workers is left out: one process or eight, the output is the same. The RAG rows are drawn in training, so
    # only whether there are any (the neighbours file) changes this output, and with them the read share.
    left_out = ("data", "prompts", "data_workers", "rag_share", "rag_distractors", "rag_read")
    settings = {k: v for k, v in vars(args).items() if k not in left_out}
    settings["rag_neighbours"] = args.rag_share > 0
    if args.rag_share > 0:
        settings["rag_read"] = args.rag_read
    key = {
        "input": [str(path), stat.st_size, stat.st_mtime_ns, edges.hexdigest()],
        "args": settings,
        "seed": seed,
        "prompts": [prompts.system, list(prompts.questions), prompts.answer],
        "code": [hashlib.blake2b(Path(m).read_bytes(), digest_size=16).hexdigest() for m in CODE],
    }
    return hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def prepare_cached(
    args: DataArguments, seed: int, out_dir: str | Path, prompts: PromptSet, cache_root: str | Path | None = None
) -> dict:
    """prepare(), keyed by cache_key() under <cache>/data/<key>/: a rerun, or another process, links the same files
    into out_dir/data instead of reading the input again. Returns the stats, as prepare() does."""
    from titletune.config import cache_dir

    key = cache_key(args, seed, prompts)
    entry = Path(cache_root or cache_dir() / "data") / key
    if all((entry / name).is_file() for name in CACHE_FILES):
        os.utime(entry)  # recently used: the last to be evicted
        log.info("data prep: reused cache %s (%s)", key, entry)
    else:
        shutil.rmtree(entry, ignore_errors=True)  # a file removed from an entry by hand: build it again
        entry.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the entry and renamed into place whole: a crash or a second writer never leaves half an entry.
        build = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
        try:
            prepare(args, seed, build, prompts)
            try:
                os.replace(build / "data", entry)
            except OSError:  # another process finished the same entry first; its files are the same
                if not all((entry / name).is_file() for name in CACHE_FILES):
                    raise
            files.sync_dir(entry.parent)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        log.info("data prep: cached as %s (%s)", key, entry)
        _evict(entry.parent, keep=CACHE_KEEP)
    folder = Path(out_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name in CACHE_FILES:
        target = folder / name
        target.unlink(missing_ok=True)
        try:
            os.link(entry / name, target)  # no copy of a GB of rows; nothing rewrites these files in place
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(entry / name, target)
    return orjson.loads((folder / "stats.json").read_bytes())


def _evict(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used cache entries, and builds a crash left behind over a day ago."""
    entries = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    done = [p for p in entries if not p.name.startswith(".")]
    stale = [p for p in entries if p.name.startswith(".") and time.time() - p.stat().st_mtime > 86400]
    for path in done[keep:] + stale:
        shutil.rmtree(path, ignore_errors=True)


def _all_dropped_message(counts: Counter, args: DataArguments) -> str:
    reasons = ", ".join(f"{counts[r]:,} {r.replace('_', ' ')}" for r in DROP_REASONS if counts[r])
    message = f"all {counts['rows_read']:,} rows of {args.data} were dropped: {reasons or 'no rows'}."
    hints = []
    if counts["missing_field"] or counts["bad_field_type"]:
        fields = first_fields(Path(args.data))
        hints.append(
            f"the rows need the fields --title-field {args.title_field!r} and --content-field {args.content_field!r}"
            + (f"; the first row has {', '.join(fields)}" if fields else "")
        )
    if counts["short_content"]:
        hints.append(f"lower --min-content-chars (now {args.min_content_chars})")
    if counts["malformed_json"] == counts["rows_read"]:
        hints.append("the file should hold one JSON object per line, like data/sample_trn.json")
    return message + (" Fix: " + "; ".join(hints) + "." if hints else " Pass a file with titled, described products.")


def percentiles(values: array) -> dict[str, int | float]:
    """p25/p50/p75/p95/max and mean of a list of lengths; zeros when empty."""
    if not values:
        return {**{f"p{p}": 0 for p in PERCENTILES}, "max": 0, "mean": 0.0}
    import numpy as np

    data = np.frombuffer(values, dtype=np.uint32)
    points = np.percentile(data, PERCENTILES)
    return {
        **{f"p{p}": round(float(v), 1) for p, v in zip(PERCENTILES, points, strict=True)},
        "max": int(data.max()),
        "mean": round(float(data.mean()), 1),
    }


def _stats(
    args: DataArguments,
    seed: int,
    path: Path,
    counts: Counter,
    split_counts: dict[str, int],
    truncated: int,
    lengths: tuple[array, array],
    max_samples: int | None,
) -> dict:
    dropped = {reason: counts[reason] for reason in DROP_REASONS}
    kept = sum(split_counts.values())
    return {
        "input": {"path": str(path.resolve()), "bytes": path.stat().st_size, "gzip": is_gzip(path)},
        "seed": seed,
        "rows_read": counts["rows_read"],
        "kept": {**split_counts, "total": kept},
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "truncated": truncated,
        "notes": {note: counts[note] for note in NOTES},
        # Over the distinct valid products (before sampling), cleaned, before --max-content-chars cuts them.
        "lengths": {"title": percentiles(lengths[0]), "content": percentiles(lengths[1])},
        "args": {
            "title_field": args.title_field,
            "content_field": args.content_field,
            "max_samples": max_samples if max_samples is not None else "all",
            "val_size": args.val_size,
            "test_size": args.test_size,
            "min_content_chars": args.min_content_chars,
            "max_content_chars": args.max_content_chars,
        },
        "files": {s: f"data/{s}.jsonl" for s in SPLITS},
    }
