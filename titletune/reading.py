"""Reading products files: JSON lines or a small JSON array, gzipped or not, one raw row at a time.

Every line that gives no row is counted by its reason in a stats Counter, never raised; a file that cannot be read
at all (missing, empty, a directory, a pipe or device, another compression than gzip, truncated gzip, an oversized
array) ends in a UserError that says what to do.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import stat
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson

from titletune.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
# Compressions that files come in but this reader does not open, by magic bytes: what each is, and the command that
# turns it into a file it reads. Without this a zstd file reads as lines of malformed JSON.
OTHER_COMPRESSIONS = {
    b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d {path}"),
    b"\xfd7zXZ\x00": ("xz", "xz -dk {path}"),
    b"BZh": ("bzip2", "bunzip2 -k {path}"),
    b"PK\x03\x04": ("zip", "unzip {path}"),
    b"7z\xbc\xaf\x27\x1c": ("7z", "7z x {path}"),
}
SUPPORTED = "JSON lines or a JSON array, plain or gzip-compressed (.gz)"
BOM = b"\xef\xbb\xbf"
ARRAY_LIMIT = 200 * 1024**2  # a JSON array must be parsed whole; past this, ask for JSON lines instead
PROGRESS_MIN_BYTES = 64 * 1024**2  # smaller files finish before a progress bar says anything useful
LINE_PROBE = 1024**2  # bytes of a line read at once when telling JSON lines from an array


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
    if not path.is_file():
        # The input is read more than once (sniffed, keyed for the cache by its size and ends, read in parallel by
        # byte ranges), so a pipe or a device, whose size reads as 0, cannot be read; say so rather than "empty".
        raise UserError(
            f"data file {path} is {_kind(path)}, not a regular file, and data is read from regular files only (it is "
            f"read more than once). Save the stream to a file first, e.g. `cat > trn.json`, and pass that; supported: "
            f"{SUPPORTED}."
        )
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty (0 bytes); re-download it or {hint}.")
    if not os.access(path, os.R_OK):
        raise UserError(f"data file {path} is not readable by this user; fix its permissions (chmod a+r {path}).")
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, (name, command) in OTHER_COMPRESSIONS.items():
        if head.startswith(magic):
            raise UserError(
                f"data file {path} is {name}-compressed, and {name} is not supported; decompress it with "
                f"`{command.format(path=path)}` (or recompress it with gzip) and pass that. Supported: {SUPPORTED}."
            )
    return path


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


@contextlib.contextmanager
def _open(path: Path) -> Iterator[tuple[io.BufferedReader, io.BufferedIOBase]]:
    """(raw file, decompressed stream), both closed when the block ends; gzip is told by its magic bytes, so a .json
    that is really gzip still works. raw.tell() is how far into the file the stream has read (progress)."""
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        try:
            yield raw, stream
        finally:
            stream.close()


def sniff(path: Path) -> bytes:
    """The first non-whitespace byte of the (decompressed) content: b'[' for a JSON array, b'' if there is none."""
    with _open(path) as (_, stream):
        try:
            while chunk := stream.read(65536):
                chunk = chunk.removeprefix(BOM).lstrip()
                if chunk:
                    return chunk[:1]
        except (EOFError, OSError, zlib.error) as e:
            raise _truncated(path, 0, e) from None
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
    stats["bad_utf8"], kept), or broken JSON or JSON nested too deep to parse (counted in stats["malformed_json"],
    _MALFORMED)."""
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
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." past ~1,000 levels, which orjson refuses too
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
        items = _load_array(path)
        if items is not None:
            for number, obj in enumerate(items, 1):
                stats["rows_read"] += 1
                row = _row(obj, number, title_field, content_field, stats)
                if row is not None:
                    yield row
            return
    size = path.stat().st_size
    read_before = stats["rows_read"]
    with _open(path) as (raw, stream):
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
    if stats["rows_read"] == read_before:
        raise UserError(
            f"data file {path} holds no JSON rows (only blank lines); re-download it or pass another --data."
        )


def _load_array(path: Path) -> list | None:
    """The items of a file that starts with '[', or None when it is JSON lines whose first line merely starts with
    '[' (a broken row, such as "[[[[..."), to be read line by line with that line counted."""
    with _open(path) as (_, stream):
        try:
            data = stream.read(ARRAY_LIMIT + 1)
        except (EOFError, OSError, zlib.error) as e:
            raise _truncated(path, 0, e) from None
    if len(data) > ARRAY_LIMIT:
        del data
        if _json_lines_after_first(path):
            return None
        raise UserError(
            f"{path} is one JSON array over {ARRAY_LIMIT // 1024**2} MB, too big to load whole. Convert it to JSON "
            f"lines (one object per line), e.g. `jq -c '.[]' {path.name} > {path.stem}.jsonl`, and pass that."
        )
    error = None
    try:
        items = orjson.loads(data.removeprefix(BOM))
    except orjson.JSONDecodeError as e:
        error = e
    del data
    if error is not None:
        if _json_lines_after_first(path):
            return None
        raise UserError(f"{path} starts with '[' but is not valid JSON ({error}); fix it or convert it to JSON lines.")
    if not isinstance(items, list):
        raise UserError(
            f"{path} starts with '[' but is not a JSON array; convert it to JSON lines, one object a line."
        )
    if not items:
        raise UserError(f"data file {path} is an empty JSON array; pass a file with products.")
    return items


def _json_lines_after_first(path: Path) -> bool:
    """Whether most of lines 2-101 are JSON objects each: JSON lines, not an array pretty-printed over lines (whose
    objects end in commas). Bounded memory: a line, which may be a whole array, is read at most 1 MB at a time."""
    objects = lines = 0
    with _open(path) as (_, stream):
        try:
            _skip_line(stream)
            while lines < 100 and (line := stream.readline(LINE_PROBE)):
                if not line.endswith(b"\n") and len(line) == LINE_PROBE:  # longer than any row: not one
                    _skip_line(stream)
                    lines += 1
                elif line.strip():
                    lines += 1
                    try:
                        objects += type(orjson.loads(line)) is dict
                    except orjson.JSONDecodeError:
                        pass
        except (OSError, EOFError, zlib.error):
            return False
    return lines > 0 and objects * 2 >= lines


def _skip_line(stream) -> None:
    while (part := stream.readline(LINE_PROBE)) and not part.endswith(b"\n"):
        pass


def first_fields(path: Path) -> list[str]:
    """The keys of the first JSON object in the file, to suggest --title-field/--content-field; [] if none."""
    try:
        for obj in _first_objects(path):
            if isinstance(obj, dict):
                return sorted(obj)[:10]
    except (UserError, OSError, EOFError, zlib.error):
        pass
    return []


def _first_objects(path: Path) -> Iterator[object]:
    with _open(path) as (_, stream):
        for number, line in enumerate(stream):
            if number >= 100:
                return
            try:
                yield orjson.loads(line.removeprefix(BOM))
            except orjson.JSONDecodeError:
                continue
