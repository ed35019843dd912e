"""Broken data files, each case once, checked at two levels: prepare() and the real command line.

- Skippable problems share one file that holds them all (MIXED), as a real dump does. prepare() reads it as it is
  and gzipped, and `train.py --prepare-only` reads it once: each counts every skip by its reason, keeps every good
  row, and the command exits 0 with the skips in its one summary line:
      BOM before the first row           the row is read and kept
      malformed JSON lines mid-file      dropped.malformed_json
      null, a number, a list             dropped.not_an_object
      row without title / content        dropped.missing_field
      a title that is a list             dropped.bad_field_type (a number is text: kept)
      null content                       dropped.empty_content
      non-UTF-8 bytes                    kept with U+FFFD, notes.bad_utf8, eda.md says so
      200k-char description              cut at a sentence end, truncated
      description full of HTML           plain text
      duplicated products                dropped.duplicate_title; the first one wins, whatever the case
- Errors (ERRORS): prepare() raises a UserError that says what to do and leaves no split file behind; the cases
  marked for the command line also exit 2 there with one `error: ...` line and no traceback, and leave no run folder
  (a bad path, an empty file or a bad --max-samples fails before it is made; a run whose data failed is removed).
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import orjson
import pytest
from conftest import ROOT, SAMPLE, assert_user_error, jsonl, prepare_cli

from titletune import prepare, prompts, reading, runs
from titletune.config import DataArguments
from titletune.errors import UserError

GOOD = [
    {
        "uid": f"G{i}",
        "title": f"Garden Hose Reel Model {i}",
        "content": f"A wall-mounted hose reel, model {i}, that holds 100 feet of hose.",
    }
    for i in range(12)
]
LONG = " ".join(f"Sentence number {i} describes one more feature of the workshop manual." for i in range(2900))
HTML = (
    "<div class='desc'><h2>Features</h2><ul><li><b>Waterproof</b> to 30&nbsp;m</li><li>Strap &amp; case</li>"
    "</ul><p>Battery lasts 2 years.<br>Gift box.</p><script>x</script></div>"
)
BAD_UTF8 = b'{"uid": "B1", "title": "Caf\xe9 Espresso Cups", "content": "Four cups \xff\xfe in white porcelain."}'


@pytest.fixture(scope="module")
def qa() -> prompts.PromptSet:
    return prompts.load(ROOT / "prompts" / "qa")


def split_rows(run_dir: Path) -> dict[str, dict]:
    return {row["id"]: row for split in prepare.SPLITS for row in runs.read_split(run_dir, split)}


# ------------------------------------------------------------------------------- skipped and counted: one file


MIXED = jsonl(
    [b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode()]  # a BOM before the first row
    + GOOD[1:6]
    + [
        b'{"uid": "X", "title": "Broken',  # malformed JSON, mid-file
        b"not json at all",
        b"null",  # JSON, but not an object: these three
        b"42",
        ["a", "list"],
        {"uid": "N1", "content": "No title field here at all."},
        {"uid": "N2", "title": "No content field"},
        {"uid": "T1", "title": ["a", "list"], "content": "A title that is not text."},
        {"uid": "T2", "title": 1984, "content": "A novel by George Orwell, in paperback."},  # a number is text
        {"uid": "Z", "title": "Null Content Product", "content": None},
        BAD_UTF8,
        {"uid": "L", "title": "Huge Workshop Manual", "content": LONG},
        {"uid": "H", "title": "Dive Watch &amp; Strap", "content": HTML},
    ]
    + GOOD[6:]
    + GOOD[:4]  # duplicates of earlier rows
    + [dict(GOOD[5], uid="again", title=GOOD[5]["title"].upper())]  # a duplicate by title_key
)
MIXED_DROPPED = {
    "malformed_json": 2,
    "not_an_object": 3,
    "missing_field": 2,
    "bad_field_type": 1,
    "empty_title": 0,
    "empty_content": 1,
    "short_content": 0,
    "duplicate_title": 5,
    "over_max_samples": 0,
}
MIXED_SUMMARY = (
    "dropped 14 (2 malformed json, 3 not an object, 2 missing field, 1 bad field type, 1 empty content, "
    "5 duplicate title)"
)


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module", params=["prepare", "prepare_gzip", "cli"])
def mixed(request, tmp_path_factory, qa) -> dict:
    """MIXED read by prepare() (as it is, and gzipped under a .json name) or by `train.py --prepare-only`."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    path = tmp_path / "trn.json"
    path.write_bytes(gzip.compress(MIXED) if request.param == "prepare_gzip" else MIXED)
    if request.param == "cli":
        result = prepare_cli(tmp_path, path)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        summary = [line for line in result.stderr.splitlines() if "data: read" in line]
        stats = orjson.loads((tmp_path / "run" / "data" / "stats.json").read_bytes())
    else:
        logger, handler = logging.getLogger(prepare.__name__), _Messages()
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            stats = prepare.prepare(DataArguments(data=str(path)), seed=42, out_dir=tmp_path / "run", prompts=qa)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        summary = [m for m in handler.messages if m.startswith("data: read")]
    assert len(summary) == 1, summary  # one summary line, whichever way the data was read
    return {
        "stats": stats,
        "summary": summary[0],
        "rows": split_rows(tmp_path / "run"),
        "eda": (tmp_path / "run" / "data" / "eda.md").read_text(encoding="utf-8"),
    }


def test_every_skip_is_counted_by_its_reason(mixed):
    stats = mixed["stats"]
    assert stats["dropped"] == MIXED_DROPPED and stats["dropped_total"] == 14
    assert stats["rows_read"] == 30 and stats["kept"]["total"] == 16
    assert stats["notes"] == {"bad_utf8": 1, "blank_lines": 0, "chat_markers": 0}
    assert MIXED_SUMMARY in mixed["summary"], mixed["summary"]


def test_every_good_row_is_kept(mixed):
    assert set(mixed["rows"]) == {g["uid"] for g in GOOD} | {"T2", "B1", "L", "H"}
    assert mixed["rows"]["G0"]["title"] == GOOD[0]["title"]  # the BOM is not part of the first row
    assert mixed["rows"]["T2"]["title"] == "1984"


def test_non_utf8_bytes_are_repaired_and_counted(mixed):
    row = mixed["rows"]["B1"]
    assert row["title"] == "Caf\ufffd Espresso Cups" and "\ufffd" in row["content"]
    assert "Caf\ufffd Espresso Cups" in row["prompt"][-1]["content"]
    assert "1 rows had invalid UTF-8" in mixed["eda"]


def test_200k_char_description_is_cut_at_a_sentence_end_and_counted(mixed):
    stats = mixed["stats"]
    assert stats["truncated"] == 1 and stats["lengths"]["content"]["max"] == len(LONG)
    cut = mixed["rows"]["L"]["content"]
    limit = stats["args"]["max_content_chars"]
    assert limit // 2 <= len(cut) <= limit and cut.endswith("manual.")
    assert mixed["rows"]["L"]["completion"][0]["content"] == cut  # the answer template is "{content}"
    assert "kept 16 (" in mixed["summary"] and ", 1 truncated)" in mixed["summary"], mixed["summary"]


def test_html_description_becomes_plain_text(mixed):
    row = mixed["rows"]["H"]
    assert row["title"] == "Dive Watch & Strap"
    assert row["content"] == "Features\n- Waterproof to 30 m\n- Strap & case\nBattery lasts 2 years.\nGift box.\nx"
    assert row["completion"][0]["content"] == row["content"]


def test_the_first_of_duplicated_products_wins(mixed):
    assert "again" not in mixed["rows"]
    assert mixed["rows"]["G5"]["title"] == GOOD[5]["title"]


# ------------------------------------------------------------------------------------------------------ errors


def file_of(content: bytes, name: str = "trn.json"):
    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    return make


def directory(tmp_path: Path) -> Path:
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "trn.json").write_bytes(jsonl(GOOD))
    return tmp_path / "dataset"


FILTERED = [{"uid": f"E{i}", "title": f"Item {i}", "content": ""} for i in range(6)]
FILTERED += [{"uid": f"S{i}", "title": f"Short {i}", "content": "tiny"} for i in range(3)]
WRONG_FIELDS = [{"name": f"Lamp {i}", "description": "A lamp with a linen shade and a brass base."} for i in range(5)]
GZIPPED = gzip.compress(jsonl(GOOD * 400))
MAX_SAMPLES = r"--max-samples must be a positive number or 'all', got "

# (file maker, data arguments, the error message's pattern, also through the command line)
ERRORS = [
    pytest.param(file_of(b""), {}, r"is empty \(0 bytes\); re-download it or pass --data", True, id="empty_file"),
    pytest.param(file_of(b"\n \n\n"), {}, r"holds no JSON rows \(only blank lines\)", False, id="only_blank_lines"),
    pytest.param(
        file_of(jsonl(FILTERED)),
        {},
        r"all 9 rows of .* were dropped: 6 empty content, 3 short content\. "
        r"Fix: lower --min-content-chars \(now 20\)",
        True,
        id="every_row_filtered_out",
    ),
    pytest.param(
        file_of(jsonl(WRONG_FIELDS)),
        {},
        r"5 missing field.*--title-field 'title'.*first row has description, name",
        False,
        id="wrong_field_names",
    ),
    pytest.param(
        file_of(GZIPPED[: len(GZIPPED) // 2], "trn.json.gz"),
        {},
        r"truncated or corrupt gzip file: it ended after [\d,]+ lines.*Check it with `gzip -t ",
        True,
        id="truncated_gzip",
    ),
    pytest.param(file_of(b"[]"), {}, r"is an empty JSON array", False, id="empty_json_array"),
    pytest.param(file_of(b'[{"title": "x"'), {}, r"starts with '\[' but is not valid JSON", False, id="broken_array"),
    pytest.param(
        lambda tmp_path: tmp_path / "nope.json",
        {},
        r"does not exist; pass --data /path/to/trn\.json",
        True,
        id="nonexistent_path",
    ),
    pytest.param(
        directory,
        {},
        r"is a directory, not a file\. It holds trn\.json\. Pass the file itself",
        True,
        id="directory_instead_of_file",
    ),
    *(
        pytest.param(
            lambda _: SAMPLE,
            {"max_samples": value},
            MAX_SAMPLES + rf"{value}\. Use --max-samples all",
            True,
            id=f"max_samples_{value}",
        )
        for value in ("0", "-3")
    ),
    pytest.param(lambda _: SAMPLE, {"max_samples": "abc"}, MAX_SAMPLES + r"'abc'\.", False, id="max_samples_abc"),
    pytest.param(
        lambda _: SAMPLE,
        {"val_size": 1.5},
        r"--val-size must be a fraction in \[0, 1\), got 1.5",
        False,
        id="val_size_over_1",
    ),
    pytest.param(
        lambda _: SAMPLE,
        {"max_samples": "2", "val_size": 0.45, "test_size": 0.5},
        r"none of the 2 kept product\(s\) fell in the train split \(val \d, test \d\): raise",
        True,
        id="no_product_in_train",
    ),
]


@pytest.mark.parametrize("make, overrides, pattern, through_cli", ERRORS)
def test_error_from_prepare(tmp_path, qa, make, overrides, pattern, through_cli):
    args = DataArguments(data=str(make(tmp_path)), **overrides)
    with pytest.raises(UserError, match=pattern):
        prepare.prepare(args, seed=42, out_dir=tmp_path / "run", prompts=qa)
    assert not list((tmp_path / "run").glob("data/*.jsonl*")), "no split file, whole or partial, is left behind"


@pytest.mark.parametrize("make, overrides, pattern, through_cli", [p for p in ERRORS if p.values[3]])
def test_error_from_the_command_line(tmp_path, make, overrides, pattern, through_cli):
    flags = [item for name, value in overrides.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    assert_user_error(prepare_cli(tmp_path, make(tmp_path), *flags), pattern)
    assert not (tmp_path / "run").exists(), "a run whose data failed is never left to look like a run"


def test_huge_json_array_asks_for_json_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "ARRAY_LIMIT", 1000)
    path = tmp_path / "array.json"
    path.write_text(json.dumps(GOOD * 10), encoding="utf-8")
    with pytest.raises(UserError, match=r"one JSON array over .* Convert it to JSON lines"):
        list(reading.iter_products(path))
