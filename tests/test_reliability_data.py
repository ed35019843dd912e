"""Hostile data and damaged files around data prep and the search index, through the real code: each case recovers
(a counted skip, a rebuilt index), or exits 2 with one `error: ...` line that says what to do; never a hang, never a
traceback, and the user's files are left as they were.

    200,000-char rows of "-", "<" + spaces, "&", "<<<<a>>>>", "<!--", ...
                                     text.py cleans each in well under a second (it took minutes: quadratic regexes)
    a line of 1,100 "["              a counted malformed_json skip, in data prep and in --rag-index
    "#", "?", "%" in a run's path    the index opens where it is; no stray database beside the run
    --rag-index /bin/ls              exit 2 "... holds no product to index ...", nothing cached
    --rag-k 100000                   exit 2 "the N retrieved catalogue entries are too long ...: lower --rag-k"
    --data FIFO or /dev/stdin        exit 2 "... is a pipe (FIFO), not a regular file ... Save the stream to a file"
    --data zstd / xz / bzip2 / zip   exit 2 "... is zstd-compressed, and zstd is not supported; decompress it with ..."
    a damaged rag/ index             rebuilt, with one warning line
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import os
import re
import shutil
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import assert_user_error, jsonl, prepare_cli, run_cli
from test_infer import TRAIN, build_run

from titletune import reading, retrieval, runs, text
from titletune.errors import UserError

GOOD = [
    {
        "uid": f"G{i}",
        "title": f"Garden Hose Reel Model {i}",
        "content": f"A wall-mounted hose reel, model {i}, that holds 100 feet of hose and a spray nozzle.",
    }
    for i in range(12)
]
NESTED = b"[" * 1100  # past both parsers' depth limits: orjson refuses it, the stdlib raised RecursionError
N = 200_000  # real rows reach ~198,000 characters
HOSTILE = {
    "dashes": "-" * N,
    "lt_spaces": "<" + " " * (N - 1),
    "lt_slash_spaces": "< / " * (N // 4),
    "lt_b_spaces": "<b" + " " * (N - 2),
    "ampersands": "&" * N,
    "amp_letters": "&a" * (N // 2),
    "huge_charref": "&#" + "9" * (N - 2),  # past int()'s 4,300 digits: html.unescape raised ValueError
    "nested_tags": "<<<<a>>>>" * (N // 9),
    "unclosed_comment": "<!--" + "x" * (N - 4),
    "comment_openers": "<!--" * (N // 4),
    "edition_notes": "--This text refers to" * (N // 21),
    "dash_spaces": "-- " * (N // 3),
    "sentence_ends": ".)" * (N // 2),
    "no_spaces": "x" * N,
    "invisible": "\x01 " * (N // 2),
    "non_ascii_tags": "<é " * (N // 3),
    "underscores": "_" * N,
}
FUNCTIONS = {
    "clean_text": text.clean_text,
    "clean_title": text.clean_title,
    "title_key": text.title_key,
    "truncate_head": lambda s: text.truncate(s, 1000),
    "truncate_all": lambda s: text.truncate(s, len(s) - 1),
}


# ------------------------------------------------------------------------------------------- text cleaning time


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("row", HOSTILE)
def test_cleaning_a_hostile_200k_row_takes_under_a_second(row, function):
    started = time.perf_counter()
    FUNCTIONS[function](HOSTILE[row])
    assert time.perf_counter() - started < 1.0


def test_hostile_rows_clean_to_what_the_rules_say():
    assert text.clean_text("&#" + "9" * 5000 + "; and &#00000000065;") == "\ufffd and A"
    assert text.clean_text("<!-- x --> a <!-- b") == "a <!-- b"  # an unclosed comment is text
    assert text.clean_text("A <B>bold</B>< / b > word <  br > next") == "A bold word\nnext"
    assert text.clean_text("Good book.---- This text refers to theHardcoveredition.") == "Good book."
    assert text.clean_text("-" * 10) == "-" * 10


def test_data_prep_on_hostile_rows_finishes(tmp_path):
    rows = GOOD + [
        {"uid": f"H{i}", "title": f"Hostile Row {name}", "content": s} for i, (name, s) in enumerate(HOSTILE.items())
    ]
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(jsonl(rows))
    before = data.read_bytes()
    started = time.perf_counter()
    result = prepare_cli(tmp_path, data)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert time.perf_counter() - started < 120  # one dash row alone stalled it for over 150 s
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    assert stats["rows_read"] == len(rows) and stats["kept"]["total"] >= len(GOOD)
    assert data.read_bytes() == before


# ------------------------------------------------------------------------------------------- deeply nested JSON


@pytest.mark.parametrize("where", ["middle", "first_line"])
def test_a_nested_json_line_is_a_counted_skip_in_data_prep(tmp_path, where):
    lines = [*GOOD[:6], NESTED, *GOOD[6:]] if where == "middle" else [NESTED, *GOOD]
    data = tmp_path / "trn.json"
    data.write_bytes(jsonl(lines))
    result = prepare_cli(tmp_path, data)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "1 malformed json" in result.stderr
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    assert stats["rows_read"] == len(GOOD) + 1 and stats["dropped"]["malformed_json"] == 1
    assert stats["kept"]["total"] == len(GOOD)


def test_nested_json_deeper_still_and_in_objects_is_counted():
    lines = [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000, *jsonl(GOOD).splitlines()]
    stats = Counter()
    rows = list(reading.rows_of(lines, 1, "title", "content", stats))
    assert len(rows) == len(GOOD) and stats["malformed_json"] == 2


def test_a_broken_json_array_is_still_refused(tmp_path):
    """The JSON-lines fallback is for a bad first line, not for an array cut short."""
    path = tmp_path / "array.json"
    path.write_text(json.dumps(GOOD, indent=2)[:-40], encoding="utf-8")
    with pytest.raises(UserError, match=r"starts with '\[' but is not valid JSON"):
        list(reading.iter_products(path))
    path.write_text(json.dumps(GOOD, indent=2), encoding="utf-8")  # pretty-printed and whole: read as an array
    assert len(list(reading.iter_products(path))) == len(GOOD)


# ------------------------------------------------------------------------------------ URI characters in the path


def test_index_in_a_folder_named_with_uri_characters(tmp_path):
    run = tmp_path / "run #1?mode=rwc%41"
    index = retrieval.for_rows(run / "rag", "train", [{"id": r["uid"], **r} for r in GOOD])
    try:
        assert len(index) == len(GOOD)
        assert index.search("What is the Garden Hose Reel Model 7?", 1)[0]["id"] == "G7"
    finally:
        index.close()
    catalogue = tmp_path / "cat #?%.jsonl"
    catalogue.write_bytes(jsonl(GOOD))
    cache = tmp_path / "cache #?%"
    data = runs.Run(tmp_path, {}).data_settings
    index = retrieval.for_file(catalogue, data, cache)
    try:
        assert index.search("Garden Hose Reel Model 3", 1)[0]["title"] == "Garden Hose Reel Model 3"
    finally:
        index.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([run.name, catalogue.name, cache.name])
    assert sorted(p.name for p in (run / "rag").iterdir()) == ["train.json", "train.sqlite"]
    assert [p.suffix for p in cache.iterdir()] == [".sqlite"]


# ------------------------------------------------------------------------------- the index through infer.py


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run in a folder whose name holds '#', '?' and '%', so every infer.py call here also checks the URI."""
    run = build_run(tmp_path_factory.mktemp("data"))
    return run.rename(run.with_name("run #?%"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache for --rag-index (the embedded model's folder is named in the run's config, so it is not
    needed here)."""
    monkeypatch.setenv("TITLETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def infer(run: Path, *args: str):
    return run_cli(
        "infer.py", "--run", str(run), "--only", "tuned", "--max-new-tokens", "2", *args, timeout=300, check=False
    )


def catalogue(tmp_path: Path, products: int) -> Path:
    """A catalogue of `products` hose reels, with a line of 1,100 '[' among them."""
    rows = [
        {
            "uid": f"C{i}",
            "title": f"Garden Hose Reel Model {i}",
            "content": f"A wall-mounted hose reel, model {i}, that holds {100 + i} feet of hose. " * 3,
        }
        for i in range(products)
    ]
    path = tmp_path / "catalogue.jsonl"
    path.write_bytes(jsonl([*rows[:5], NESTED, *rows[5:]]))
    return path


def test_rag_index_file_with_a_nested_json_line(tmp_path, run_dir, cache):
    path = catalogue(tmp_path, 20)
    before = path.read_bytes()
    result = infer(run_dir, "--rag", "--rag-index", str(path), "--rag-k", "2", "--json", "What is Hose Reel Model 7?")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["retrieved"][0] == "Garden Hose Reel Model 7" and len(out["retrieved"]) == 2
    assert path.read_bytes() == before
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]  # no stray database beside the run


def test_rag_k_past_the_context_says_to_lower_rag_k(tmp_path, run_dir, cache):
    # 400 entries of ~250 characters match the question: far past the model's 8,192 tokens.
    path = catalogue(tmp_path, 400)
    result = infer(run_dir, "--rag", "--rag-index", str(path), "--rag-k", "100000", "What is the Garden Hose Reel?")
    assert_user_error(
        result,
        r"^error: the 400 retrieved catalogue entries are too long for the model: with them the prompt takes "
        r"[\d,]+ tokens, and this model reads 8,192 tokens .* Fix: lower --rag-k \(now 100000\)\.$",
    )
    assert "question is too long" not in result.stderr


def test_rag_index_without_products_is_refused_and_not_cached(run_dir, cache):
    ls = Path(shutil.which("ls") or "/bin/ls").resolve()
    if not ls.is_file():
        pytest.skip("no ls binary here")
    result = infer(run_dir, "--rag", "--rag-index", str(ls), "What is a hose reel?")
    assert_user_error(
        result,
        rf"--rag-index {re.escape(str(ls))} holds no product to index \([\d,]+ lines read; dropped: .*malformed json.*\)\. "
        r"Pass a catalogue file: JSON lines",
    )
    assert not list(cache.rglob("*.sqlite")) and not list(cache.rglob(".tmp-*"))


DAMAGE = {
    "garbage": lambda data: os.urandom(len(data)),
    "cut_in_half": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "pages_overwritten": lambda data: data[:4096] + bytes(len(data) - 4096),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_index_is_rebuilt_with_one_warning(tmp_path, caplog, damage):
    rows = [{"id": r["uid"], **r} for r in GOOD]
    retrieval.for_rows(tmp_path / "rag", "train", rows).close()
    target = tmp_path / "rag" / "train.sqlite"
    target.write_bytes(DAMAGE[damage](target.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="titletune.retrieval"):
        index = retrieval.for_rows(tmp_path / "rag", "train", rows)
    try:
        assert index.search("Garden Hose Reel Model 5", 1)[0]["id"] == "G5"
    finally:
        index.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "is damaged" in warnings[0] and warnings[0].endswith("rebuilding it")
    assert retrieval.diagnose(target) is None


def test_damaged_stamp_or_a_file_for_the_folder_is_rebuilt(tmp_path, caplog):
    rows = [{"id": r["uid"], **r} for r in GOOD]
    retrieval.for_rows(tmp_path / "rag", "train", rows).close()
    (tmp_path / "rag" / "train.json").write_bytes(b"\x00{garbage")
    with caplog.at_level(logging.WARNING, logger="titletune.retrieval"):
        retrieval.for_rows(tmp_path / "rag", "train", rows).close()
        shutil.rmtree(tmp_path / "rag")
        (tmp_path / "rag").write_bytes(b"not a folder")
        index = retrieval.for_rows(tmp_path / "rag", "train", rows)
    assert len(index) == len(GOOD)
    index.close()
    assert [("rebuilding" in r.getMessage()) for r in caplog.records] == [True, True]


def test_damaged_run_index_is_rebuilt_through_infer(run_dir):
    run = runs.load(run_dir)
    retrieval.for_rows(run_dir / "rag", "train", run.split("train")).close()
    target = run_dir / "rag" / "train.sqlite"
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[:5000])
    result = infer(run_dir, "--rag", "--rag-k", "1", "--json", "What is the Stainless Steel Garlic Press Pro?")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if "rebuilding" in line] == [
        f"rag: the search index {target} is damaged (cut short: 5,000 of {size:,} bytes); rebuilding it"
    ]
    assert json.loads(result.stdout)["retrieved"] == [TRAIN[1][1]]


# --------------------------------------------------------------------------------- streams and other compressions


def test_fifo_as_data_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "trn.json"
    os.mkfifo(fifo)
    result = prepare_cli(tmp_path, fifo)  # would block forever if anything opened the pipe
    assert_user_error(
        result,
        r"data file .*trn\.json is a pipe \(FIFO\), not a regular file.*Save the stream to a file first.*"
        r"supported: JSON lines or a JSON array, plain or gzip-compressed",
    )
    assert fifo.is_fifo() and not (tmp_path / "run").exists()


def test_dev_stdin_as_data_is_refused(tmp_path):
    args = ("train.py", "--prepare-only", "--data", "/dev/stdin", "--output-dir", str(tmp_path / "run"))
    result = run_cli(*args, timeout=300, check=False, input=jsonl(GOOD).decode())
    assert_user_error(result, r"data file /dev/stdin is a pipe \(FIFO\), not a regular file")
    assert "empty (0 bytes)" not in result.stderr


def _zip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("trn.json", data)
    return buffer.getvalue()


COMPRESSED = {
    # A zstd frame header (magic 28 B5 2F FD, then a frame descriptor); the stdlib has no zstd compressor.
    "zstd": (lambda data: b"\x28\xb5\x2f\xfd\x24\x00" + data, "zstd -d"),
    "xz": (lzma.compress, "xz -dk"),
    "bzip2": (bz2.compress, "bunzip2 -k"),
    "zip": (_zip, "unzip"),
}


@pytest.mark.parametrize("kind", COMPRESSED)
def test_other_compressions_are_named_with_the_command_to_decompress(tmp_path, kind):
    compress, command = COMPRESSED[kind]
    path = tmp_path / f"trn.json.{kind}"
    path.write_bytes(compress(jsonl(GOOD)))
    before = path.read_bytes()
    result = prepare_cli(tmp_path, path)
    assert_user_error(
        result,
        rf"data file {re.escape(str(path))} is {kind}-compressed, and {kind} is not supported; decompress it with "
        rf"`{command} {re.escape(str(path))}` \(or recompress it with gzip\) and pass that\. Supported: JSON lines",
    )
    assert "malformed" not in result.stderr and path.read_bytes() == before


def test_plain_and_gzip_still_pass_the_check(tmp_path):
    """The magic-byte check passes what the reader supports: plain JSON lines and gzip."""
    for name, data in (("a.jsonl", jsonl(GOOD)), ("b.json.gz", gzip.compress(jsonl(GOOD)))):
        path = tmp_path / name
        path.write_bytes(data)
        assert reading.check_path(path) == path
        assert len(list(reading.iter_products(path))) == len(GOOD)
