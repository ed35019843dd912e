"""Products file -> cleaned, deduplicated, sampled, split chat rows, in one streaming pass.

    trn.json(.gz) -> iter_products -> clean_text -> filter -> dedupe (title_key) -> sample (seeded) -> split -> render
    -> <output_dir>/data/{train,val,test}.jsonl + stats.json + eda.md + lengths.png

Memory does not grow with the file: rows stream through, and what is kept per product is one 8-byte hash (dedupe)
and two lengths (EDA). With --max_samples N, at most N products are held in a bounded heap; with 'all' every kept
row goes straight to its split file.

prepare_cached() keys that output by the input file, the settings, the prompts and this code, and links a cached copy
into the run folder when one exists: a rerun with the same settings, in any run folder, skips the pass.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import html
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
import zlib
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson

from titletune import prompts as prompts_lib
from titletune.config import DataArguments, parse_max_samples
from titletune.errors import UserError
from titletune.prompts import PromptSet

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"
ARRAY_LIMIT = 200 * 1024**2  # a JSON array must be parsed whole; past this, ask for JSON lines instead
PROGRESS_MIN_BYTES = 64 * 1024**2  # smaller files finish before a progress bar says anything useful
PERCENTILES = (25, 50, 75, 95)

# Reasons a row can be dropped, in pipeline order; stats.json and the "all rows dropped" error use these names.
DROP_REASONS = (
    "malformed_json",  # the line is not JSON
    "not_an_object",  # JSON, but not {...}
    "missing_field",  # the title or content field is absent (see --title_field / --content_field)
    "bad_field_type",  # the field holds a list or an object, not text
    "empty_title",  # no letter or digit left after cleaning (5.6% of the real rows)
    "empty_content",  # 33.4% of the real rows
    "short_content",  # cleaned content shorter than --min_content_chars
    "duplicate_title",  # same title_key as an earlier kept product; the first one wins
    "over_max_samples",  # a valid product that the seeded sample left out
)
# Counted by iter_products but not drops: the row is still used, or there was no row at all.
NOTES = ("bad_utf8", "blank_lines", "chat_markers")

_BLOCK_TAG = re.compile(r"<\s*(?:br|/?p|/?div|/?tr|/?h[1-6]|/?ul|/?ol|/?table)\b[^<>]*>", re.IGNORECASE)
_LIST_ITEM = re.compile(r"<\s*li\b[^<>]*>", re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# Inline tags vanish so that "<b>S</b>mith" stays one word; any other tag becomes a space.
_INLINE_TAG = re.compile(r"<\s*/?\s*(?:a|b|i|u|em|strong|span|font|small|sup|sub)\b[^<>]*>", re.IGNORECASE)
_OTHER_TAG = re.compile(r"<\s*/?\s*[a-zA-Z][^<>]*>")  # a letter after '<': "size < 5" and "<3" are not tags
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z][a-zA-Z0-9]{1,31});")
# Amazon glues an edition note to many book descriptions, with the spaces lost in scraping:
# "--This text refers to theHardcoveredition." / "--This text refers to an out of print ... of this title."
# The pattern starts with a literal so the regex engine can skip ahead; a leading \s* would try every position.
_EDITION_NOTE = re.compile(r"-{2,}\s*This text refers to\b[^.]*\.?", re.IGNORECASE)
# Control characters and invisible format characters; \t \n \r and the other whitespace are left to split().
_INVISIBLE = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u00ad\u200b\u200e\u200f\u2060\ufeff]")
_DOUBLE_SPACE = re.compile(r"  +")
_NON_ALNUM = re.compile(r"[\W_]+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]\u201d\u2019]*(?=\s)")


def clean_text(text: str) -> str:
    """Catalogue text -> plain text: entities decoded, tags and edition notes removed, NFKC, whitespace collapsed.

    Paragraph breaks (<br>, <p>, <li>, newlines) survive as single newlines; every other run of whitespace becomes
    one space.
    """
    if not text:
        return ""
    # Fast path, most real rows: plain ASCII with nothing to decode. isprintable() rules out tabs, newlines and
    # control characters, so only runs of spaces are left to collapse. str methods here, not regexes: this runs
    # 1.5 million times on the real file.
    if text.isascii() and "&" not in text and "<" not in text and "--" not in text and text.isprintable():
        if "  " in text:
            text = _DOUBLE_SPACE.sub(" ", text)
        return text.strip(" ")
    if "&" in text:
        text = html.unescape(text)
        if "&" in text and _ENTITY.search(text):  # double-escaped, e.g. "&amp;#8217;" -> "&#8217;" -> "’"
            text = html.unescape(text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, from a JSON "\\ud800" escape, cannot be written as UTF-8
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if "<" in text:
        text = _COMMENT.sub(" ", text)
        text = _BLOCK_TAG.sub("\n", text)
        text = _LIST_ITEM.sub("\n- ", text)
        text = _INLINE_TAG.sub("", text)
        text = _OTHER_TAG.sub(" ", text)
    if "--" in text:
        text = _EDITION_NOTE.sub(" ", text)
    if text.isprintable():  # no line breaks, tabs or control characters: only runs of spaces can be left
        return (_DOUBLE_SPACE.sub(" ", text) if "  " in text else text).strip()
    # split() rather than a whitespace regex: a [^\S\n] class costs ~40 us on a 600-char description, split ~10.
    lines = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line.isprintable():
            line = " ".join(_INVISIBLE.sub("", line).split())
        if line:
            lines.append(line)
    return "\n".join(lines)


def clean_title(text: str) -> str:
    """A title is one line: clean_text, then newlines become spaces."""
    cleaned = clean_text(text)
    return " ".join(cleaned.split()) if "\n" in cleaned else cleaned


def title_key(title: str) -> str:
    """The title as compared for dedupe and split hashing: NFKC, casefolded, letters and digits only, single spaces.

    Pass a cleaned title (clean_text): entities and tags are not decoded here.
    """
    if not title.isascii():
        title = unicodedata.normalize("NFKC", title)
    return _NON_ALNUM.sub(" ", title.casefold()).strip()


def truncate(text: str, limit: int) -> str:
    """Cut text to at most `limit` chars, at the last sentence end when one falls in the second half of the limit."""
    if len(text) <= limit:
        return text
    head = text[: limit + 1]  # one more char so a sentence ending exactly at the limit is seen by the lookahead
    ends = [m.end() for m in _SENTENCE_END.finditer(head) if m.end() <= limit]
    if ends and ends[-1] >= limit // 2:
        return text[: ends[-1]]
    space = text.rfind(" ", 0, limit)
    if space >= limit // 2:
        return text[:space].rstrip() + "\u2026"
    return text[: limit - 1] + "\u2026"


def check_path(path: str | Path) -> Path:
    """The data file, or a UserError that says how to point at a real one."""
    path = Path(path).expanduser()
    hint = "pass --data /path/to/trn.json (data/README.md says where to download it)"
    if not path.exists():
        raise UserError(f"data file {path} does not exist; {hint}.")
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".gz"))[:5]
        inside = f" It holds {', '.join(found)}." if found else ""
        raise UserError(
            f"--data {path} is a directory, not a file.{inside} Pass the file itself, e.g. {path}/trn.json."
        )
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty (0 bytes); re-download it or {hint}.")
    if not os.access(path, os.R_OK):
        raise UserError(f"data file {path} is not readable by this user; fix its permissions (chmod a+r {path}).")
    return path


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _open(path: Path) -> tuple[io.BufferedReader, io.BufferedIOBase]:
    """(raw file, decompressed stream); gzip is told by its magic bytes, so a .json that is really gzip still works."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller, with the stream
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    raw.seek(0)
    return raw, raw


def _sniff(path: Path) -> bytes:
    """The first non-whitespace byte of the (decompressed) content: b'[' for a JSON array, b'' if there is none."""
    raw, stream = _open(path)
    try:
        while chunk := stream.read(65536):
            chunk = chunk.removeprefix(BOM).lstrip()
            if chunk:
                return chunk[:1]
    except (EOFError, OSError, zlib.error) as e:
        raise _truncated(path, 0, e) from None
    finally:
        stream.close()
        raw.close()
    return b""


def _truncated(path: Path, lines: int, error: Exception) -> UserError:
    return UserError(
        f"{path} is a truncated or corrupt gzip file: it ended after {lines:,} lines ({error}). "
        f"Check it with `gzip -t {path}` and re-download it, or decompress what is readable with "
        f"`zcat {path} > trn.json` and pass that."
    )


_BLANK = object()  # _parse_slow's answer for a whitespace-only line: not a row at all
_MALFORMED = object()  # ... and for a line that is not JSON, already counted in stats["malformed_json"]


def _parse_slow(line: bytes, number: int, stats: Counter) -> object:
    """A line orjson refused: a BOM, a blank line, bad UTF-8 or a lone surrogate escape (repaired, counted in
    stats["bad_utf8"], kept), or broken JSON (counted in stats["malformed_json"], _MALFORMED)."""
    if number == 1 and line.startswith(BOM):
        line = line[len(BOM) :]
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
    if not line.strip():
        return _BLANK
    # Kept, not skipped: broken bytes are usually one character of an otherwise good description.
    text = line.decode("utf-8", errors="replace")
    try:
        # The stdlib also takes the lone surrogate escapes that orjson refuses; clean_text repairs them.
        obj = json.loads(text)
    except ValueError:
        stats["malformed_json"] += 1
        return _MALFORMED
    stats["bad_utf8"] += 1
    return obj


def _field(obj: dict, name: str) -> str | None:
    value = obj[name]
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _row(obj: object, number: int, title_field: str, content_field: str, stats: Counter) -> dict | None:
    """The row of one parsed line, or None with the reason counted in stats."""
    if type(obj) is not dict:
        stats["not_an_object"] += 1
        return None
    if title_field not in obj or content_field not in obj:
        stats["missing_field"] += 1
        return None
    title, content = _field(obj, title_field), _field(obj, content_field)
    if title is None or content is None:
        stats["bad_field_type"] += 1
        return None
    uid = obj.get("uid")
    return {"id": str(number) if uid is None else str(uid), "title": title, "content": content}


def _rows_of(lines, first: int, title_field: str, content_field: str, stats: Counter, tick=None) -> Iterator[dict]:
    """Rows of an iterable of JSON lines whose first line is line number `first` of the file; counts as
    iter_products says. tick(number) is called every 16,384 lines (progress)."""
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    read = 0
    try:
        # The hot loop of data prep: one orjson call and two dict lookups for a well-formed row; every other case
        # goes through _parse_slow and _row.
        for number, line in enumerate(lines, first):
            try:
                obj = loads(line)
            except decode_error:
                obj = _parse_slow(line, number, stats)
                if obj is _BLANK:
                    stats["blank_lines"] += 1
                    continue
            read += 1
            if tick is not None and not number & 16383:
                tick(number)
            if type(obj) is dict:
                title, content = obj.get(title_field), obj.get(content_field)
                if type(title) is str and type(content) is str:
                    uid = obj.get("uid")
                    yield {"id": str(number) if uid is None else str(uid), "title": title, "content": content}
                    continue
            if obj is _MALFORMED:
                continue
            row = _row(obj, number, title_field, content_field, stats)
            if row is not None:
                yield row
    finally:
        stats["rows_read"] += read


def iter_products(
    path: str | Path,
    title_field: str = "title",
    content_field: str = "content",
    stats: Counter | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Stream {"id", "title", "content"} raw rows from JSON lines (.json/.jsonl, gzipped or not) or a small JSON array.

    `id` is the row's uid, else its 1-based line number. Every non-blank line counts in stats["rows_read"]; lines
    that give no row are counted by reason (malformed_json, not_an_object, missing_field, bad_field_type), never
    raised. Invalid UTF-8 is replaced with U+FFFD and the row is kept, counted in stats["bad_utf8"]. Blank lines
    are counted in stats["blank_lines"] only. progress=True shows a tqdm bar over the bytes of a large file.
    """
    stats = Counter() if stats is None else stats
    path = check_path(path)
    if _sniff(path) == b"[":
        yield from _iter_array(path, title_field, content_field, stats)
        return
    size = path.stat().st_size
    read_before = stats["rows_read"]
    raw, stream = _open(path)
    bar = None
    if progress and size >= PROGRESS_MIN_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}", disable=None)
    blanks_before = stats["blank_lines"]
    tick = (lambda _: bar.update(raw.tell() - bar.n)) if bar is not None else None
    try:
        yield from _rows_of(stream, 1, title_field, content_field, stats, tick)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        lines = stats["rows_read"] - read_before + stats["blank_lines"] - blanks_before
        raise _truncated(path, lines, e) from None
    finally:
        if bar is not None:
            bar.update(size - bar.n)
            bar.close()
        stream.close()
        raw.close()
    if stats["rows_read"] == read_before:
        raise UserError(
            f"data file {path} holds no JSON rows (only blank lines); re-download it or pass another --data."
        )


def _iter_array(path: Path, title_field: str, content_field: str, stats: Counter) -> Iterator[dict]:
    raw, stream = _open(path)
    try:
        data = stream.read(ARRAY_LIMIT + 1)
    except (EOFError, OSError, zlib.error) as e:
        raise _truncated(path, 0, e) from None
    finally:
        stream.close()
        raw.close()
    if len(data) > ARRAY_LIMIT:
        raise UserError(
            f"{path} is one JSON array over {ARRAY_LIMIT // 1024**2} MB, too big to load whole. Convert it to JSON "
            f"lines (one object per line), e.g. `jq -c '.[]' {path.name} > {path.stem}.jsonl`, and pass that."
        )
    try:
        items = orjson.loads(data.removeprefix(BOM))
    except orjson.JSONDecodeError as e:
        raise UserError(
            f"{path} starts with '[' but is not valid JSON ({e}); fix it or convert it to JSON lines."
        ) from None
    del data
    if not isinstance(items, list):
        raise UserError(
            f"{path} starts with '[' but is not a JSON array; convert it to JSON lines, one object a line."
        )
    if not items:
        raise UserError(f"data file {path} is an empty JSON array; pass a file with products.")
    for number, obj in enumerate(items, 1):
        stats["rows_read"] += 1
        row = _row(obj, number, title_field, content_field, stats)
        if row is not None:
            yield row


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


def check_args(args: DataArguments) -> int | None:
    """Raise once with every problem in the data arguments; return max_samples parsed."""
    max_samples = parse_max_samples(args.max_samples)
    problems = []
    for name in ("val_size", "test_size"):
        value = getattr(args, name)
        if not 0 <= value < 1:
            problems.append(f"--{name} must be a fraction in [0, 1), got {value}")
    if args.val_size + args.test_size >= 1:
        problems.append(
            f"--val_size + --test_size must leave some products for training, got {args.val_size + args.test_size}"
        )
    if args.min_content_chars < 0:
        problems.append(f"--min_content_chars must be >= 0, got {args.min_content_chars}")
    if args.max_content_chars < max(1, args.min_content_chars):
        problems.append(
            f"--max_content_chars ({args.max_content_chars}) must be >= 1 and >= --min_content_chars "
            f"({args.min_content_chars})"
        )
    if not args.title_field or not args.content_field:
        problems.append("--title_field and --content_field must name fields of the rows, e.g. title and content")
    if problems:
        raise UserError("; ".join(problems) + ".")
    return max_samples


def render_line(prompts: PromptSet, seed: int, pid: str, title: str, content: str) -> bytes:
    """One product as the JSON line of a split file: id, title, content and the prompt/completion messages."""
    row = {"id": pid, "title": title, "content": content}
    row.update(prompts_lib.render(prompts, title, content, key=pid, seed=seed))
    return orjson.dumps(row) + b"\n"


class _SplitWriter:
    """Rows go straight to temporary split files; close() tops up empty val/test and renames them into place."""

    def __init__(self, folder: Path, prompts: PromptSet, seed: int, val_size: float, test_size: float):
        self.folder, self.prompts, self.seed = folder, prompts, seed
        self.val_size, self.test_size = val_size, test_size
        self.tmp = {s: folder / f".{s}.jsonl.tmp{os.getpid()}" for s in SPLITS}
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
        if b"\xe2\x80\x8b" in line and prompts_lib.DEFANGED.search(line):  # a marker made plain text (prompts.defang)
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
                f"{self.counts['test']}): raise --max_samples, or pass --val_size 0 --test_size 0 to train on them all."
            )
        for split in SPLITS:
            os.replace(self.tmp[split], self.folder / f"{split}.jsonl")
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
        # Set in a worker of _select_parallel: the rank of every distinct product in order, and a rank that
        # max_samples products of earlier chunks are already below (none of this chunk's can be chosen above it).
        self.ranks: array | None = None
        self.bound = 1 << 64

    def add(self, row: dict) -> tuple | None:
        """Take one raw row. Returns (id, title, content, u, truncated) to write now when every product is kept."""
        self.order += 1
        title = clean_title(row["title"])
        if not title:
            self.counts["empty_title"] += 1
            return None
        content = clean_text(row["content"])
        if not content:
            self.counts["empty_content"] += 1
            return None
        if len(content) < self.min_chars:
            self.counts["short_content"] += 1
            return None
        key = title_key(title)  # after the content checks: a third of the real rows stop there
        if not key:
            self.counts["empty_title"] += 1  # punctuation only, e.g. "!!!"
            return None
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


# Parallel reading (--data_workers): a plain JSON-lines file is cut at line ends into chunks that worker processes
# read, clean, filter and dedupe on their own. The main process then dedupes across chunks (the first occurrence in
# file order wins, as in one process) and takes the max_samples smallest ranks, so the output is byte for byte the
# one a single process writes.
PARALLEL_MIN_BYTES = 64 * 1024**2  # below this, starting the workers costs more than they save ('auto' only)
CHUNK_BYTES = 32 * 1024**2  # one task: ~37k real rows, ~0.4 s; small enough for a smooth bar and flat memory
MAX_WORKERS = 8


def data_workers(value: str | int, path: Path) -> int:
    """--data_workers as a number of processes: 'auto' is one per usable CPU (at most 8) for a plain JSON-lines file
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
            raise UserError(f"--data_workers must be 'auto' or a number of processes >= 1, got {value!r}.")
    if workers > 1 and (_is_gzip(path) or _sniff(path) == b"["):
        return 1
    return workers


def _chunks(path: Path, size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges that cover the file, each starting at the beginning of a line."""
    starts = [0]
    with open(path, "rb") as f:
        for cut in range(chunk_bytes, size, chunk_bytes):
            if cut <= starts[-1]:
                continue  # the previous line was longer than a chunk
            f.seek(cut - 1)
            skipped = 0
            while block := f.read(1 << 16):
                newline = block.find(b"\n")
                if newline >= 0:
                    skipped += newline + 1
                    break
                skipped += len(block)
            start = cut - 1 + skipped
            if start < size:
                starts.append(start)
    return list(zip(starts, [*starts[1:], size], strict=True))


def _read_chunk(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _count_lines(task: tuple[str, int, int]) -> int:
    """Lines in one chunk, so that every worker knows the file line number of its first line (ids without uid)."""
    data = _read_chunk(*task)
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the main process's to handle (it stops the pool and cleans up)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chunk_worker(task: dict) -> dict:
    """Read, clean, filter and dedupe one chunk; keep its max_samples smallest ranks under task['bound'], or with
    max_samples 'all' write every distinct product, rendered, to task['tmp']."""
    lines = _read_chunk(task["path"], task["start"], task["end"]).split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the chunk ends with a newline
    counts: Counter = Counter()
    selection = Selection(task["seed"], task["max_samples"], task["min_chars"], task["max_chars"], counts)
    selection.ranks, selection.bound = array("Q"), task["bound"]
    us, cut = array("d"), array("B")
    out = open(task["tmp"], "wb", buffering=1 << 20) if task["max_samples"] is None else None  # noqa: SIM115
    try:
        for row in _rows_of(lines, task["first"], task["title_field"], task["content_field"], counts):
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


def _smallest(items: list[tuple], n: int) -> tuple[list[tuple], int]:
    """The n items (rank, order, ...) with the smallest distinct ranks, each rank's earliest occurrence, and the rank
    that every later chunk must be under to matter (2**64 while fewer than n are known)."""
    items.sort(key=lambda item: (item[0], item[1]))
    kept, last = [], None
    for item in items:
        if item[0] != last:
            kept.append(item)
            last = item[0]
            if len(kept) == n:
                break
    return kept, (kept[-1][0] if len(kept) == n else 1 << 64)


def _select_parallel(
    path: Path,
    args: DataArguments,
    seed: int,
    max_samples: int | None,
    prompts: PromptSet,
    counts: Counter,
    writer: _SplitWriter,
    workers: int,
) -> tuple[array, array]:
    """The parallel equivalent of the loop in prepare(); writes through `writer`, returns the EDA lengths."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    import numpy as np

    size = path.stat().st_size
    chunks = _chunks(path, size, CHUNK_BYTES)
    results: list[dict | None] = [None] * len(chunks)
    tmp = [writer.folder / f".chunk{i}.jsonl.tmp{os.getpid()}" for i in range(len(chunks))]
    candidates: list[tuple] = []
    bound = 1 << 64
    # fork on Linux, as torch's DataLoader does: a worker runs only this module's code, never torch, and needs no
    # `if __name__ == "__main__"` guard in the caller's script. The pool starts before the progress bar's thread.
    method = "fork" if sys.platform == "linux" else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_ignore_sigint)
    finished = False
    bar = None
    if size >= PROGRESS_MIN_BYTES:
        from tqdm import tqdm

        bar = tqdm(
            total=size, unit="B", unit_scale=True, desc=f"reading {path.name} ({workers} workers)", disable=None
        )
    try:
        line_counts = list(pool.map(_count_lines, [(str(path), start, end) for start, end in chunks]))
        firsts = np.concatenate([[1], 1 + np.cumsum(line_counts)[:-1]]).tolist()
        base = {
            "path": str(path),
            "seed": seed,
            "max_samples": max_samples,
            "min_chars": args.min_content_chars,
            "max_chars": args.max_content_chars,
            "title_field": args.title_field,
            "content_field": args.content_field,
            "prompts": prompts,
        }
        pending: dict = {}
        following = 0
        while following < len(chunks) or pending:
            # A few chunks ahead of the workers, no more: each later chunk gets the tightest bound known so far.
            while following < len(chunks) and len(pending) < 2 * workers:
                start, end = chunks[following]
                task = {**base, "index": following, "start": start, "end": end, "first": firsts[following]}
                pending[pool.submit(_chunk_worker, {**task, "bound": bound, "tmp": str(tmp[following])})] = following
                following += 1
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                result = future.result()
                counts.update(result.pop("counts"))
                candidates.extend(result.pop("items"))
                if max_samples is not None and len(candidates) > 2 * max_samples:
                    candidates, bound = _smallest(candidates, max_samples)
                results[index] = result
                if bar is not None:
                    bar.update(chunks[index][1] - chunks[index][0])
        finished = True
    except BrokenProcessPool:
        raise UserError(
            "a data-prep worker process died (out of memory?); run again with --data_workers 1 (one process)."
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=not finished)  # Ctrl-C or an error: the chunks not begun never run
        if bar is not None:
            bar.close()
        if not finished:
            for file in tmp:
                file.unlink(missing_ok=True)
    if not counts["rows_read"]:
        raise UserError(
            f"data file {path} holds no JSON rows (only blank lines); re-download it or pass another --data."
        )
    # Across chunks, the first occurrence of a rank in file order is the distinct product; later ones are duplicates.
    ranks = np.concatenate([np.frombuffer(r["ranks"], dtype=np.uint64) for r in results])
    first = np.zeros(len(ranks), dtype=bool)
    first[np.unique(ranks, return_index=True)[1]] = True
    distinct = int(first.sum())
    counts["duplicate_title"] += len(ranks) - distinct
    title_lengths, content_lengths = array("I"), array("I")
    for name, lengths in (("title_lengths", title_lengths), ("content_lengths", content_lengths)):
        lengths.frombytes(np.concatenate([np.frombuffer(r[name], np.uint32) for r in results])[first].tobytes())
    try:
        if max_samples is not None:
            chosen, _ = _smallest(candidates, max_samples)
            counts["over_max_samples"] += distinct - len(chosen)
            for _rank, _order, *product in sorted(chosen, key=lambda item: item[1]):
                writer.add(*product)
        else:
            offset = 0
            for index, result in enumerate(results):
                keep = first[offset : offset + len(result["ranks"])].tolist()
                with open(tmp[index], "rb") as f:
                    for line, wanted, u, truncated in zip(f, keep, result["u"], result["truncated"], strict=True):
                        if wanted:
                            writer.add_line(line, u, bool(truncated))
                offset += len(result["ranks"])
                tmp[index].unlink()
    finally:
        for file in tmp:
            file.unlink(missing_ok=True)
    return title_lengths, content_lengths


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
    writer = _SplitWriter(folder, prompts, seed, args.val_size, args.test_size)
    try:
        if workers > 1:
            title_lengths, content_lengths = _select_parallel(
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
    kept = sum(split_counts.values())
    counts["chat_markers"] = writer.markers
    stats = _stats(
        args, seed, path, counts, split_counts, writer.truncated, (title_lengths, content_lengths), max_samples
    )
    stats["seconds"] = round(time.perf_counter() - started, 2)
    _write_atomic(folder / "stats.json", orjson.dumps(stats, option=orjson.OPT_INDENT_2) + b"\n")
    _write_atomic(folder / "eda.md", render_eda(stats).encode())
    plot_lengths(title_lengths, content_lengths, folder / "lengths.png")
    dropped = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in stats["dropped"].items() if n)
    log.info(
        "data: read %s rows (%s) in %.1f s; kept %s (train %s, val %s, test %s, %s truncated); dropped %s (%s)",
        f"{stats['rows_read']:,}",
        _size(stats["input"]["bytes"]),
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
    return stats


CACHE_FILES = (*(f"{s}.jsonl" for s in SPLITS), "stats.json", "eda.md", "lengths.png")
CACHE_KEEP = 8  # most recently used entries kept; runs hold hard links, so evicting an entry never breaks a run
_EDGE = 1 << 20  # bytes hashed at each end of the input: a quick content check on top of size and mtime


def cache_key(args: DataArguments, seed: int, prompts: PromptSet) -> str:
    """What prepare()'s output depends on, hashed: the input file (path, size, mtime, first and last MB), every data
    argument, the seed, the prompt texts, and the code of this module and prompts.py (a fix invalidates the cache).
    """
    path = check_path(args.data).resolve()
    stat = path.stat()
    edges = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        edges.update(f.read(_EDGE))
        if stat.st_size > _EDGE:
            f.seek(max(_EDGE, stat.st_size - _EDGE))
            edges.update(f.read(_EDGE))
    # data_workers is left out: one process or eight, the output is the same.
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "prompts", "data_workers")}
    key = {
        "input": [str(path), stat.st_size, stat.st_mtime_ns, edges.hexdigest()],
        "args": settings,
        "seed": seed,
        "prompts": [prompts.system, list(prompts.questions), prompts.answer],
        "code": [
            hashlib.blake2b(Path(m).read_bytes(), digest_size=16).hexdigest() for m in (__file__, prompts_lib.__file__)
        ],
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
        fields = _first_fields(Path(args.data))
        hints.append(
            f"the rows need the fields --title_field {args.title_field!r} and --content_field {args.content_field!r}"
            + (f"; the first row has {', '.join(fields)}" if fields else "")
        )
    if counts["short_content"]:
        hints.append(f"lower --min_content_chars (now {args.min_content_chars})")
    if counts["malformed_json"] == counts["rows_read"]:
        hints.append("the file should hold one JSON object per line, like data/sample_trn.json")
    return message + (" Fix: " + "; ".join(hints) + "." if hints else " Pass a file with titled, described products.")


def _first_fields(path: Path) -> list[str]:
    """The keys of the first JSON object in the file, to suggest --title_field/--content_field; [] if none."""
    try:
        for obj in _first_objects(path):
            if isinstance(obj, dict):
                return sorted(obj)[:10]
    except (UserError, OSError, EOFError, zlib.error):
        pass
    return []


def _first_objects(path: Path) -> Iterator[object]:
    raw, stream = _open(path)
    try:
        for number, line in enumerate(stream):
            if number >= 100:
                return
            try:
                yield orjson.loads(line.removeprefix(BOM))
            except orjson.JSONDecodeError:
                continue
    finally:
        stream.close()
        raw.close()


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
        "input": {"path": str(path.resolve()), "bytes": path.stat().st_size, "gzip": _is_gzip(path)},
        "seed": seed,
        "rows_read": counts["rows_read"],
        "kept": {**split_counts, "total": kept},
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "truncated": truncated,
        "notes": {note: counts[note] for note in NOTES},
        # Over the distinct valid products (before sampling), cleaned, before --max_content_chars cuts them.
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


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def render_eda(stats: dict) -> str:
    """The EDA report as markdown: counts, drop reasons, length percentiles, the histogram."""
    kept, source = stats["kept"], stats["input"]
    size = _size(source["bytes"]) + (", gzip" if source["gzip"] else "")
    lines = [
        "# Data report",
        "",
        f"Input: `{source['path']}` ({size}), seed {stats['seed']}, max_samples {stats['args']['max_samples']}.",
        "",
        "## Counts",
        "",
        "| | rows | share of rows read |",
        "|---|---:|---:|",
    ]
    total = max(stats["rows_read"], 1)
    for name, n in [
        ("read", stats["rows_read"]),
        *((f"kept: {s}", kept[s]) for s in SPLITS),
        ("kept: total", kept["total"]),
        ("dropped", stats["dropped_total"]),
    ]:
        lines.append(f"| {name} | {n:,} | {100 * n / total:.1f}% |")
    lines += [
        "",
        (
            f"{stats['truncated']:,} kept descriptions were cut to {stats['args']['max_content_chars']:,} chars "
            "(at a sentence end where one was near)."
        ),
        "",
        "## Drop reasons",
        "",
        "| reason | rows |",
        "|---|---:|",
        *(f"| {reason.replace('_', ' ')} | {n:,} |" for reason, n in stats["dropped"].items()),
        "",
        (
            f"Notes: {stats['notes']['bad_utf8']:,} rows had invalid UTF-8 (repaired with U+FFFD and kept), "
            f"{stats['notes']['blank_lines']:,} blank lines were skipped, "
            f"{stats['notes'].get('chat_markers', 0):,} kept products had chat-control markers (e.g. <|im_end|>) "
            "made plain text."
        ),
        "",
        "## Lengths (characters, distinct valid products, cleaned, before cutting)",
        "",
        "| field | p25 | p50 | p75 | p95 | max | mean |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for field_name, p in stats["lengths"].items():
        cells = " | ".join(f"{p[k]:,}" for k in ("p25", "p50", "p75", "p95", "max", "mean"))
        lines.append(f"| {field_name} | {cells} |")
    lines += ["", "![title and content lengths](lengths.png)", ""]
    return "\n".join(lines)


def plot_lengths(title_lengths: array, content_lengths: array, target: Path) -> None:
    """Histograms of title and content lengths, log-x; Figure without pyplot, so no global backend is touched."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    panels = zip(fig.subplots(1, 2), (title_lengths, content_lengths), ("title", "content"), strict=True)
    for ax, values, name in panels:
        data = np.frombuffer(values, dtype=np.uint32) if values else np.zeros(0, dtype=np.uint32)
        if data.size:
            bins = np.logspace(0, np.log10(max(int(data.max()), 10)), 50)
            ax.hist(np.maximum(data, 1), bins=bins, color="#4472c4")
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} length (chars)")
        ax.set_ylabel("products")
        ax.set_title(f"{name}: n={data.size:,}, median={int(np.median(data)) if data.size else 0}")
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, target)


def _write_atomic(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def load_split(run_dir: str | Path, split: str) -> list[dict]:
    """The rows of <run_dir>/data/<split>.jsonl, as prepare wrote them."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
    path = Path(run_dir) / "data" / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(
            f"{path} does not exist; prepare the data first: python train.py --prepare_only --output_dir {run_dir}"
        )
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]
