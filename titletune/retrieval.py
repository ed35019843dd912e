"""Catalogue search: SQLite FTS5 indexes over product titles and descriptions, and an exact-title table.

One path for both of its uses: the retrieval baseline answers with the best match's description word for word, and
RAG puts the top k entries into the prompt. A question names a product by its title ("What is 'X'?", "Tell me about
X."), so a search tries, until it has k entries:
1. the title it names (the quoted part, else the question without the phrasing words at its ends), looked up whole
   in a table of title keys: one b-tree lookup per guess, whatever the catalogue's size;
2. the products whose title holds every word of that title: an AND query over an FTS5 index of the titles alone,
   which skips through posting lists rather than walking them, shortest title first, the first few put in order by
   how exactly their title is the one named;
3. any word of the question in titles or descriptions, by bm25() (the search of FORMAT 3, `search_any`): for a
   question that names no title or a product not in the catalogue. Its cost grows with the catalogue, as it walks
   every posting list of the question's words.
FTS5 ships with Python's sqlite3; the index lives on disk and a query reads only the b-tree pages and posting lists
it needs, so it serves the full 1.4M-product catalogue in bounded memory (bench/README.md, "Catalogue search index").
An index is built once (indexing.py), streamed in batches, written under a temporary name and renamed, and reused:
- over a run's training products (the default): <run>/rag/train.sqlite;
- over any trn-format file (--rag-index FILE): <cache>/rag/<key>.sqlite, keyed by the file and the data settings.
An index found cut short or damaged on reuse is rebuilt, with a warning; one of an older FORMAT is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from titletune import files, indexing
from titletune.errors import UserError
from titletune.text import title_key

log = logging.getLogger(__name__)

# bm25() weights of the title and description columns: the question names the title, so a title match counts most.
WEIGHTS = (4.0, 1.0)
MAX_TERMS = 32  # a question longer than this is cut: FTS5 cost grows with the terms of a query
# The words the questions of prompts/qa (user.txt, heldout.txt) wrap a title in. A question without quote marks is
# cut to its title by dropping these words at its two ends ("Tell me about X." -> "X"); words inside stay.
PHRASING = frozenset(
    "about before buying can could d describe description details explain for give i is know like listing me more of "
    "please product should summarise tell the to what you".split()
)
# How many of those dropped words the exact lookup puts back on each side, in case they were the title's own ("Tell
# me about The Art of War." names "The Art of War" as much as "Art of War"; the longer one found wins).
REGAIN = 3
# A title query's matches come shortest title first (indexing.SHIFT); the first CANDIDATES of them are put in order
# by how exactly their title is the one named.
CANDIDATES = 50
# Bump when the schema, the cleaning, the tokenizer or FREQUENT_* (indexing.py) change, so old indexes are rebuilt.
FORMAT = 4
SQLITE_MAGIC = b"SQLite format 3\x00"
_ROWS = "SELECT rowid, pid, title, content FROM products WHERE rowid IN ({})"


class Index:
    """A built index, opened read-only."""

    def __init__(self, path: Path, source: str):
        self.path, self.source = Path(path), source
        self.fallbacks = 0  # searches that needed step 3, the broad query (bench/bench_rag.py reports it)
        # as_uri() percent-escapes the path: in a bare "file:" URI a '?' or '#' in a folder name ends the path, and
        # SQLite would open (and create) another file.
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            self.frequent = dict(self.db.execute("SELECT term, doc FROM frequent"))  # a few dozen words at full size
            self.db.execute("SELECT 1 FROM titles, exact LIMIT 0")  # FORMAT 3 and older have neither
        except BaseException:
            self.db.close()
            raise

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM products").fetchone()[0]

    def search(self, text: str, k: int = 1) -> list[dict]:
        """The k best entries for a question or a title: {"id", "title", "content"}, best first; [] when no word of
        the text is in the catalogue. Steps 1, 2 and 3 of the module's docstring, each only while fewer than k."""
        named = Named(text)
        hits = self._exact(named)
        if len(hits) < k:
            hits += self._title(named, k - len(hits), {rowid for rowid, _ in hits})
        if len(hits) < k:
            self.fallbacks += 1
            found = {rowid for rowid, _ in hits}
            hits += [hit for hit in self._any(text, k + len(hits)) if hit[0] not in found][: k - len(hits)]
        return [entry for _, entry in hits]

    def neighbours(self, title: str, k: int) -> list[dict]:
        """The k products whose titles are nearest a title: any of its words (the frequent ones left out, as in
        match_query) in the titles table alone, by bm25(). For RAG-aware training's distractors (ragrows.py): the
        titles index is a fraction of the full one, so this costs a fraction of search_any."""
        query = match_query(title, self.frequent)
        if not query:
            return []
        numbers = self._run("SELECT rowid FROM titles WHERE titles MATCH ? ORDER BY bm25(titles) LIMIT ?", (query, k))
        rowids = [number & ((1 << indexing.SHIFT) - 1) for (number,) in numbers]
        rows = {row[0]: row for row in self._run(_ROWS.format(", ".join("?" * len(rowids))), rowids)}
        return [_entry(rows[r])[1] for r in rowids if r in rows]

    def search_any(self, text: str, k: int = 1) -> list[dict]:
        """Step 3 alone, the search of FORMAT 3: any word of the text in titles (weighted 4) or descriptions, by
        bm25(). bench/bench_rag.py measures search() against it."""
        return [entry for _, entry in self._any(text, k)]

    def _exact(self, named: Named) -> list[tuple[int, dict]]:
        if not named.keys:
            return []
        keyed = {indexing.key_hash(key): key for key in named.keys}
        marks = ", ".join("?" * len(keyed))
        found = dict(self._run(f"SELECT hash, product FROM exact WHERE hash IN ({marks})", keyed))
        if not found:
            return []
        rows = {row[0]: row for row in self._run(_ROWS.format(", ".join("?" * len(found))), found.values())}
        for digest, key in keyed.items():  # the longest guess first
            row = rows.get(found.get(digest, 0))
            if row is not None and title_key(row[2]) == key:  # not a 64-bit hash collision
                return [_entry(row)]
        return []

    def _title(self, named: Named, k: int, found: set[int]) -> list[tuple[int, dict]]:
        if not named.terms:
            return []
        numbers = self._run(
            "SELECT rowid FROM titles WHERE titles MATCH ? ORDER BY rowid LIMIT ?",
            (" ".join(f'"{term}"' for term in named.terms), max(k, CANDIDATES) + len(found)),
        )
        rowids = [rowid for (number,) in numbers if (rowid := number & ((1 << indexing.SHIFT) - 1)) not in found]
        if not rowids:
            return []
        rows = {row[0]: row for row in self._run(_ROWS.format(", ".join("?" * len(rowids))), rowids)}

        def fit(i: int) -> tuple[int, int, int]:
            words = set(title_key(rows[rowids[i]][2]).split())
            # fewest words that were not asked, then most that were, then the shorter title
            return len(words - named.asked), -len(words & named.asked), i

        return [_entry(rows[rowids[i]]) for i in sorted(range(len(rowids)), key=fit)[:k]]

    def _any(self, text: str, k: int) -> list[tuple[int, dict]]:
        query = match_query(text, self.frequent)
        if not query:
            return []
        rows = self._run(
            "SELECT rowid, pid, title, content FROM products WHERE products MATCH ? "
            "ORDER BY bm25(products, 0, ?, ?), rowid LIMIT ?",
            (query, *WEIGHTS, k),
        )
        return [_entry(row) for row in rows]

    def _run(self, sql: str, params: Iterable) -> list[tuple]:
        try:
            return self.db.execute(sql, tuple(params)).fetchall()
        except sqlite3.DatabaseError as e:  # damage inside the file, past what opening it checks
            raise UserError(
                f"the search index {self.path} is damaged ({e}); delete it and run again, and it is rebuilt."
            ) from None

    def close(self) -> None:
        self.db.close()


def _entry(row: tuple) -> tuple[int, dict]:
    rowid, pid, title, content = row
    return rowid, {"id": pid, "title": title, "content": content}


class Named:
    """The title a question names, as title_key() writes it: `keys`, the guesses of it whole, longest first; `terms`,
    the words every title that holds it must have; `asked`, every word of the question."""

    def __init__(self, text: str):
        words = title_key(text).split()
        self.asked = set(words)
        span = quoted(text)
        inner = title_key(span).split() if span is not None else []
        if inner:
            self.keys, self.terms = [" ".join(inner)], inner
        else:
            start, end = 0, len(words)
            while start < end and words[start] in PHRASING:
                start += 1
            while end > start and words[end - 1] in PHRASING:
                end -= 1
            if start == end:  # nothing but phrasing words: the text is taken whole
                start, end = 0, len(words)
            spans = [(a, b) for a in range(max(0, start - REGAIN), start + 1) for b in range(end, end + REGAIN + 1)]
            spans = [(a, b) for a, b in spans if b <= len(words)]
            self.keys = [" ".join(words[a:b]) for a, b in sorted(spans, key=lambda s: (s[0] - s[1], s[0]))]
            self.terms = words[start:end]
        self.keys = [key for key in self.keys if key]
        self.terms = list(dict.fromkeys(self.terms))[:MAX_TERMS]


# Quote marks around a title, as the question phrasings put them, each as (opening, closing) patterns: a mark with a
# letter or digit on its outer side is an apostrophe ("Women's", "Kids' Toys"), not a quote.
_QUOTES = [
    (re.compile(rf"(?<![^\W_]){re.escape(left)}"), re.compile(rf"{re.escape(right)}(?![^\W_])"))
    for left, right in (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("\u00ab", "\u00bb"))
]


def quoted(text: str) -> str | None:
    """The text between the first opening quote mark and the last closing one of the same kind, the earliest such
    span; None when there is none."""
    spans = []
    for opening, closing in _QUOTES:
        first = opening.search(text)
        if first is None:
            continue
        last = None
        for last in closing.finditer(text, first.end()):  # noqa: B007 (the last one is wanted)
            pass
        if last is not None and last.start() > first.end():
            spans.append((first.start(), text[first.end() : last.start()]))
    return min(spans)[1] if spans else None


def open_index(run, rag_index: str | Path | None = None) -> Index:
    """The index a run's retrieval and RAG search: over `rag_index` (any trn-format file, e.g. the full catalogue),
    else over the run's training products, the read ones of RAG-aware training included (Run.read_products)."""
    from titletune.config import cache_dir

    if rag_index:
        return for_file(rag_index, run.data_settings, cache_dir() / "rag")
    return for_rows(run.dir / "rag", "train", run.split("train") + run.read_products())


def match_query(text: str, frequent: dict[str, int] | None = None) -> str:
    """An FTS5 query that matches any of the text's words, each quoted so that no input is FTS5 syntax; without the
    `frequent` ones ({word: products}), keeping the rarest of them when every word is frequent."""
    terms = list(dict.fromkeys(title_key(text).split()))
    common = [t for t in terms if t in (frequent or {})]
    if common and len(common) == len(terms):
        common.remove(min(common, key=frequent.__getitem__))
    kept = [term for term in terms if term not in common][:MAX_TERMS]
    return " OR ".join(f'"{term}"' for term in kept)


def diagnose(path: Path) -> str | None:
    """Why the index file at `path` cannot be used (cut short, not SQLite, tables missing), or None when it can.
    Cheap at any size: the header, the file size it records, the small `frequent` table, the other tables' schema."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
        size = path.stat().st_size
    except OSError as e:
        return str(e)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return "not an SQLite database"
    page_size = int.from_bytes(header[16:18], "big")
    pages = int.from_bytes(header[28:32], "big")
    # The page count in the header is valid when its change counter matches (SQLite 3.7+ always writes it so).
    expected = (65536 if page_size == 1 else page_size) * pages
    if header[24:28] == header[92:96] and size < expected:
        return f"cut short: {size:,} of {expected:,} bytes"
    try:
        Index(path, "").close()
    except sqlite3.DatabaseError as e:
        return str(e)
    return None


def _reusable(target: Path) -> bool:
    """Whether an index built before is there and sound; a damaged one is removed, with a warning, to be rebuilt."""
    if not target.exists():
        return False
    found = diagnose(target)
    if found is None:
        return True
    log.warning("rag: the search index %s is damaged (%s); rebuilding it", target, found)
    target.unlink()
    return False


def for_rows(folder: Path, name: str, rows: list[dict]) -> Index:
    """The index of a run's split rows ({"id", "title", "content"}), built beside them on first use."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():  # ours to write (README: "What a run leaves"), so replaced
        log.warning("rag: %s is a file, not the index folder; rebuilding the index there", folder)
        folder.unlink()
    target = folder / f"{name}.sqlite"
    stamp = target.with_suffix(".json")
    ids = hashlib.blake2b("\n".join(str(r["id"]) for r in rows).encode(), digest_size=8).hexdigest()
    want = {"format": FORMAT, "rows": len(rows), "ids": ids}
    # The stamp first: an index of an older FORMAT is rebuilt as such, not reported as damaged.
    if not (_read_stamp(stamp) == want and _reusable(target)):
        indexing.build(target, ((str(r["id"]), r["title"], r["content"]) for r in rows))
        files.write_atomic(stamp, json.dumps(want))
    return Index(target, f"{len(rows):,} {name} products of the run")


def _read_stamp(path: Path) -> object:
    """What the index beside `path` was built from; None when that is unknown (and so it is rebuilt)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("rag: %s is damaged (%s); rebuilding the index", path, e)
        return None


def for_file(path: str | Path, data: dict, cache: Path) -> Index:
    """The index of a trn-format file, cleaned, filtered and deduplicated as training does it (data: the run's data
    settings), cut to max_content_chars; built once into `cache`, keyed by the file and those settings."""
    from titletune.reading import check_path

    path = check_path(path).resolve()
    stat = path.stat()
    key = {"format": FORMAT, "file": [str(path), stat.st_size, stat.st_mtime_ns], "data": data}
    name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    target = Path(cache) / f"{name}.sqlite"
    if not _reusable(target):
        log.info("rag: indexing %s (once; cached as %s)", path, target)
        try:
            count = indexing.build(target, indexing.products(path, data))
        except sqlite3.OperationalError as e:  # a full disk, most often
            raise UserError(f"could not build the search index {target}: {e}. Free disk space there.") from None
        log.info("rag: %s products indexed", f"{count:,}")
    return Index(target, f"{path.name}")
