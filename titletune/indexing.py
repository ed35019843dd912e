"""Writing the catalogue search index (retrieval.py searches it): the SQLite FTS5 schema, rows inserted in batches,
and the products of a catalogue file, cleaned, filtered and deduplicated as training does it.

The tables: `products` (id, title, description: FTS5, searched by bm25), `titles` (each title as title_key() writes
it, contentless, numbered by SHIFT), `exact` (a title key's hash -> its product) and `frequent` (the words the broad
query leaves out).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from titletune import files
from titletune.errors import UserError
from titletune.text import title_key, truncate

BATCH = 10_000  # rows per INSERT batch: memory stays flat whatever the file size
# The broad query (step 3) leaves out words found in more than this share of the products ("the", "is", "book" in a
# catalogue of books): each costs a walk of a posting list as long as the catalogue's share of it, and bm25 gives it
# almost no weight. Measured at full catalogue size in bench/README.md. The floor keeps small indexes (a run's own
# products, fast at any query) from losing words that merely repeat among a few hundred titles.
FREQUENT_SHARE, FREQUENT_FLOOR = 0.1, 1000
# The titles index numbers a product (words << SHIFT) | its rowid in `products`, where words is how many distinct
# words its title has: FTS5 walks a posting list in rowid order, so the matches of a title query come shortest title
# first and a LIMIT stops the walk early, without ranking every match (bm25() would walk every posting list whole, to
# count it).
SHIFT = 32
TOKENIZE = "tokenize='unicode61 remove_diacritics 2'"


def key_hash(key: str) -> int:
    """A title key's number in the exact table: 64 bits of blake2b, signed as SQLite's integers are."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def build(target: Path, products: Iterable[tuple[str, str, str]]) -> int:
    """Write an index of (id, title, content) rows to `target`, atomically; returns how many rows it holds."""
    count = 0
    with files.atomic_path(target) as tmp:
        db = sqlite3.connect(tmp)
        try:
            db.execute("PRAGMA journal_mode=OFF")  # a crash leaves a temp file, which atomic_path removes
            db.execute("PRAGMA synchronous=OFF")
            db.execute("PRAGMA temp_store=FILE")  # the keys are sorted on disk, not in memory
            db.execute(f"CREATE VIRTUAL TABLE products USING fts5(pid UNINDEXED, title, content, {TOKENIZE})")
            # The titles again, alone and as title_key() writes them, so that a question's title words (cut by the
            # same function) match them token for token. Contentless: only the posting lists are kept; the title
            # itself is read from `products` (rowids: see SHIFT).
            db.execute(f"CREATE VIRTUAL TABLE titles USING fts5(title, content='', {TOKENIZE})")
            db.execute("CREATE TEMP TABLE keyed(hash INTEGER, product INTEGER)")
            batch = []
            for row in products:
                batch.append(row)
                if len(batch) == BATCH:
                    count = _insert(db, batch, count)
                    batch = []
            count = _insert(db, batch, count)
            for table in ("products", "titles"):  # one b-tree per term: faster queries
                db.execute(f"INSERT INTO {table}({table}) VALUES ('optimize')")
            # Inserted in hash order, so the b-tree is written front to back; the first of two equal keys is kept.
            db.execute("CREATE TABLE exact(hash INTEGER PRIMARY KEY, product INTEGER NOT NULL)")
            db.execute("INSERT OR IGNORE INTO exact SELECT hash, product FROM temp.keyed ORDER BY hash, product")
            db.execute("DROP TABLE temp.keyed")
            db.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, products, 'row')")
            db.execute("CREATE TABLE frequent(term TEXT PRIMARY KEY, doc INTEGER) WITHOUT ROWID")
            limit = max(FREQUENT_FLOOR, int(FREQUENT_SHARE * count))
            db.execute("INSERT INTO frequent SELECT term, doc FROM temp.vocab WHERE doc > ?", (limit,))
            db.commit()
        finally:
            db.close()
    return count


def _insert(db: sqlite3.Connection, batch: list[tuple[str, str, str]], count: int) -> int:
    """One batch into the tables, rowids counted on from `count`; returns the new count."""
    if count + len(batch) >> SHIFT:
        raise UserError(f"the search index holds at most {(1 << SHIFT) - 1:,} products; this catalogue has more.")
    rows = [(rowid, *row, title_key(row[1])) for rowid, row in enumerate(batch, count + 1)]
    db.executemany("INSERT INTO products(rowid, pid, title, content) VALUES (?, ?, ?, ?)", [r[:4] for r in rows])
    db.executemany(
        "INSERT INTO titles(rowid, title) VALUES (?, ?)",
        [(min(len(set(key.split())), 1 << 16) << SHIFT | rowid, key) for rowid, _, _, _, key in rows],
    )
    db.executemany("INSERT INTO temp.keyed VALUES (?, ?)", [(key_hash(key), rowid) for rowid, _, _, _, key in rows])
    return count + len(batch)


def products(path: Path, data: dict) -> Iterator[tuple[str, str, str]]:
    """(id, title, content) of each distinct product of a trn-format file, cleaned and filtered as training does it
    (data: the run's data settings) and cut to max_content_chars; a UserError that says why when there is none."""
    from titletune.reading import iter_products
    from titletune.selection import clean_product, hashes

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
