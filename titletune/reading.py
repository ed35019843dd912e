"""Reading products files: JSON lines or a small JSON array, gzipped or not, one raw row at a time.

Every line that gives no row is counted by its reason in a stats Counter, never raised; a file that cannot be read
at all (missing, empty, a directory, truncated gzip, an oversized array) ends in a UserError that says what to do.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson

from titletune.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"
ARRAY_LIMIT = 200 * 1024**2  # a JSON array must be parsed whole; past this, ask for JSON lines instead
PROGRESS_MIN_BYTES = 64 * 1024**2  # smaller files finish before a progress bar says anything useful


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


def is_gzip(path: Path) -> bool:
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


def sniff(path: Path) -> bytes:
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


def rows_of(lines, first: int, title_field: str, content_field: str, stats: Counter, tick=None) -> Iterator[dict]:
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
    if sniff(path) == b"[":
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
        yield from rows_of(stream, 1, title_field, content_field, stats, tick)
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


def first_fields(path: Path) -> list[str]:
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
