"""Catalogue search: an SQLite FTS5 index over product titles and descriptions, ranked by bm25().

One path for both of its uses: the retrieval baseline answers with the best match's description word for word, and
RAG puts the top k entries into the prompt. FTS5 ships with Python's sqlite3; its index lives on disk and a query
reads only the posting lists of its terms, so it serves the full 1.4M-product catalogue in bounded memory
(bench/README.md). An index is built once, streamed in batches, written under a temporary name and renamed, and reused:
- over a run's training products (the default): <run>/rag/train.sqlite;
- over any trn-format file (--rag-index FILE): <cache>/rag/<key>.sqlite, keyed by the file and the data settings.
An index found cut short or damaged on reuse is rebuilt, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from titletune import files
from titletune.errors import UserError
from titletune.text import title_key

log = logging.getLogger(__name__)

# bm25() weights of the title and description columns: the question names the title, so a title match counts most.
WEIGHTS = (4.0, 1.0)
BATCH = 10_000  # rows per INSERT batch: memory stays flat whatever the file size
MAX_TERMS = 32  # a question longer than this is cut: FTS5 cost grows with the OR-ed terms
# A query leaves out words found in more than this share of the products ("the", "is", "book" in a catalogue of
# books): each costs a walk of a posting list as long as the catalogue's share of it, and bm25 gives it almost no
# weight. Measured at full catalogue size in bench/README.md. The floor keeps small indexes (a run's own products,
# fast at any query) from losing words that merely repeat among a few hundred titles.
FREQUENT_SHARE, FREQUENT_FLOOR = 0.1, 1000
FORMAT = 3  # bump when the schema, the cleaning or FREQUENT_* change, so old indexes are rebuilt
SQLITE_MAGIC = b"SQLite format 3\x00"


class Index:
    """A built index, opened read-only."""

    def __init__(self, path: Path, source: str):
        self.path, self.source = Path(path), source
        # as_uri() percent-escapes the path: in a bare "file:" URI a '?' or '#' in a folder name ends the path, and
        # SQLite would open (and create) another file.
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            self.frequent = dict(self.db.execute("SELECT term, doc FROM frequent"))  # a few dozen words at full size
        except BaseException:
            self.db.close()
            raise

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM products").fetchone()[0]

    def search(self, text: str, k: int = 1) -> list[dict]:
        """The k best entries for a question or a title: {"id", "title", "content"}, best first; [] when no word of
        the text is in the catalogue."""
        query = match_query(text, self.frequent)
        if not query:
            return []
        try:
            rows = self.db.execute(
                "SELECT pid, title, content FROM products WHERE products MATCH ? ORDER BY bm25(products, 0, ?, ?) "
                "LIMIT ?",
                (query, *WEIGHTS, k),
            ).fetchall()
        except sqlite3.DatabaseError as e:  # damage inside the file, past what opening it checks
            raise UserError(
                f"the search index {self.path} is damaged ({e}); delete it and run again, and it is rebuilt."
            ) from None
        return [{"id": pid, "title": title, "content": content} for pid, title, content in rows]

    def close(self) -> None:
        self.db.close()


def open_index(run, rag_index: str | Path | None = None) -> Index:
    """The index a run's retrieval and RAG search: over `rag_index` (any trn-format file, e.g. the full catalogue),
    else over the run's training products."""
    from titletune.config import cache_dir

    if rag_index:
        return for_file(rag_index, run.data_settings, cache_dir() / "rag")
    return for_rows(run.dir / "rag", "train", run.split("train"))


def match_query(text: str, frequent: dict[str, int] | None = None) -> str:
    """An FTS5 query that matches any of the text's words, each quoted so that no input is FTS5 syntax; without the
    `frequent` ones ({word: products}), keeping the rarest of them when every word is frequent."""
    terms = list(dict.fromkeys(title_key(text).split()))
    common = [t for t in terms if t in (frequent or {})]
    if common and len(common) == len(terms):
        common.remove(min(common, key=frequent.__getitem__))
    kept = [term for term in terms if term not in common][:MAX_TERMS]
    return " OR ".join(f'"{term}"' for term in kept)


def build(target: Path, products: Iterable[tuple[str, str, str]]) -> int:
    """Write an index of (id, title, content) rows to `target`, atomically; returns how many rows it holds."""
    count = 0
    with files.atomic_path(target) as tmp:
        db = sqlite3.connect(tmp)
        try:
            db.execute("PRAGMA journal_mode=OFF")  # a crash leaves a temp file, which atomic_path removes
            db.execute("PRAGMA synchronous=OFF")
            db.execute(
                "CREATE VIRTUAL TABLE products USING fts5(pid UNINDEXED, title, content, "
                "tokenize='unicode61 remove_diacritics 2')"
            )
            batch = []
            for row in products:
                batch.append(row)
                if len(batch) == BATCH:
                    db.executemany("INSERT INTO products VALUES (?, ?, ?)", batch)
                    count += len(batch)
                    batch = []
            db.executemany("INSERT INTO products VALUES (?, ?, ?)", batch)
            count += len(batch)
            db.execute("INSERT INTO products(products) VALUES ('optimize')")  # one b-tree per term: faster queries
            db.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, products, 'row')")
            db.execute("CREATE TABLE frequent(term TEXT PRIMARY KEY, doc INTEGER) WITHOUT ROWID")
            limit = max(FREQUENT_FLOOR, int(FREQUENT_SHARE * count))
            db.execute("INSERT INTO frequent SELECT term, doc FROM temp.vocab WHERE doc > ?", (limit,))
            db.commit()
        finally:
            db.close()
    return count


def diagnose(path: Path) -> str | None:
    """Why the index file at `path` cannot be used (cut short, not SQLite, tables missing), or None when it can.
    Cheap at any size: the header, the file size it records, and the small `frequent` table."""
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
    if not (_reusable(target) and _read_stamp(stamp) == want):
        build(target, ((str(r["id"]), r["title"], r["content"]) for r in rows))
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
            count = build(target, _products(path, data))
        except sqlite3.OperationalError as e:  # a full disk, most often
            raise UserError(f"could not build the search index {target}: {e}. Free disk space there.") from None
        log.info("rag: %s products indexed", f"{count:,}")
    return Index(target, f"{path.name}")


def _products(path: Path, data: dict) -> Iterator[tuple[str, str, str]]:
    from titletune.reading import iter_products
    from titletune.selection import clean_product, hashes
    from titletune.text import truncate

    seen: set[int] = set()
    counts: Counter = Counter()
    for row in iter_products(path, data["title_field"], data["content_field"], stats=counts, progress=True):
        got = clean_product(row, int(data["min_content_chars"]))
        if isinstance(got, str):
            counts[got] += 1
            continue
        title, key, content = got
        rank = hashes(key, 0)[0]  # dedupe as training does: one 64-bit hash per distinct title_key
        if rank in seen:
            continue
        seen.add(rank)
        yield str(row["id"]), title, truncate(content, int(data["max_content_chars"]))
    if not seen:  # raised inside build(), so no empty index is cached
        raise UserError(_no_products(path, data, counts))


_NOT_DROPS = ("bad_utf8", "blank_lines")  # counted while reading, but the row is kept or there was none


def _no_products(path: Path, data: dict, counts: Counter) -> str:
    read = counts.pop("rows_read", 0)
    reasons = ", ".join(
        f"{n:,} {reason.replace('_', ' ')}" for reason, n in counts.most_common() if n and reason not in _NOT_DROPS
    )
    return (
        f"--rag-index {path} holds no product to index ({read:,} lines read; dropped: {reasons or 'none'}). "
        f"Pass a catalogue file: JSON lines (or a JSON array) of objects with the fields {data['title_field']!r} and "
        f"{data['content_field']!r}, plain or gzip-compressed, like data/sample_trn.json."
    )
