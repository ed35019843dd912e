"""titletune.data on broken input: each case ends in a clear UserError, or in a counted, skipped row."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from titletune import data, prompts
from titletune.config import DataArguments
from titletune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GOOD = [
    {
        "uid": f"G{i}",
        "title": f"Garden Hose Reel Model {i}",
        "content": f"A wall-mounted hose reel, model {i}, that holds 100 feet of hose.",
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def qa() -> prompts.PromptSet:
    return prompts.load(ROOT / "prompts" / "qa")


def lines(rows: list) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def prepare(tmp_path: Path, qa: prompts.PromptSet, content: bytes | None = None, **overrides) -> dict:
    if content is not None:
        path = tmp_path / "trn.json"
        path.write_bytes(content)
        overrides.setdefault("data", str(path))
    return data.prepare(DataArguments(**overrides), seed=42, out_dir=tmp_path / "run", prompts=qa)


def all_rows(tmp_path: Path) -> list[dict]:
    return [row for split in data.SPLITS for row in data.load_split(tmp_path / "run", split)]


def test_malformed_json_line_is_counted_and_the_rest_kept(tmp_path, qa):
    broken = [b'{"uid": "X", "title": "Broken', b"not json at all", b"null", b"42"]
    stats = prepare(tmp_path, qa, lines(GOOD[:6] + broken + GOOD[6:]))
    assert stats["dropped"]["malformed_json"] == 2 and stats["dropped"]["not_an_object"] == 2
    assert stats["kept"]["total"] == 12 and stats["rows_read"] == 16


def test_row_without_title_or_content_field_is_counted(tmp_path, qa):
    stats = prepare(
        tmp_path,
        qa,
        lines(
            GOOD
            + [
                {"uid": "N1", "content": "No title field here at all."},
                {"uid": "N2", "title": "No content field"},
                ["a", "list"],
            ]
        ),
    )
    assert stats["dropped"]["missing_field"] == 2 and stats["dropped"]["not_an_object"] == 1
    assert stats["kept"]["total"] == 12


def test_non_utf8_bytes_are_replaced_counted_and_kept(tmp_path, qa):
    bad = b'{"uid": "B1", "title": "Caf\xe9 Espresso Cups", "content": "Four cups \xff\xfe in white porcelain."}'
    stats = prepare(tmp_path, qa, lines(GOOD + [bad]))
    assert stats["notes"]["bad_utf8"] == 1 and stats["kept"]["total"] == 13
    row = next(row for row in all_rows(tmp_path) if row["id"] == "B1")
    assert row["title"] == "Caf\ufffd Espresso Cups" and "\ufffd" in row["content"]


def test_empty_file(tmp_path, qa):
    with pytest.raises(UserError, match=r"is empty \(0 bytes\)"):
        prepare(tmp_path, qa, b"")
    with pytest.raises(UserError, match="no JSON rows"):
        prepare(tmp_path, qa, b"\n \n\n")


def test_all_rows_filtered_names_the_filters(tmp_path, qa):
    rows = [{"uid": f"E{i}", "title": f"Item {i}", "content": ""} for i in range(30)]
    rows += [{"uid": f"S{i}", "title": f"Short {i}", "content": "tiny"} for i in range(7)]
    with pytest.raises(
        UserError, match=r"all 37 rows .* were dropped: 30 empty content, 7 short content.*--min_content_chars"
    ):
        prepare(tmp_path, qa, lines(rows))
    assert not list((tmp_path / "run" / "data").glob("*.jsonl*")), "no partial split files left behind"


def test_wrong_field_names_suggest_the_flags(tmp_path, qa):
    rows = [{"name": f"Lamp {i}", "description": "A lamp with a linen shade and a brass base."} for i in range(5)]
    with pytest.raises(UserError, match=r"5 missing field.*--title_field 'title'.*first row has description, name"):
        prepare(tmp_path, qa, lines(rows))


def test_200k_char_description_is_truncated_and_counted(tmp_path, qa):
    long_text = " ".join(
        f"Sentence number {i} describes one more feature of the workshop manual." for i in range(2900)
    )
    assert len(long_text) > 200_000
    stats = prepare(tmp_path, qa, lines(GOOD + [{"uid": "L", "title": "Huge Manual", "content": long_text}]))
    assert stats["truncated"] == 1 and stats["kept"]["total"] == 13
    assert stats["lengths"]["content"]["max"] == len(long_text)
    row = next(row for row in all_rows(tmp_path) if row["id"] == "L")
    assert 1000 <= len(row["content"]) <= 2000 and row["content"].endswith("manual.")


def test_description_full_of_html_is_cleaned(tmp_path, qa):
    html = (
        "<div class='desc'><h2>Features</h2><ul><li><b>Waterproof</b> to 30&nbsp;m</li><li>Strap &amp; case</li>"
        "</ul><p>Battery lasts 2 years.<br>Gift box.</p><script>x</script></div>"
    )
    prepare(tmp_path, qa, lines(GOOD + [{"uid": "H", "title": "Dive Watch &amp; Strap", "content": html}]))
    row = next(row for row in all_rows(tmp_path) if row["id"] == "H")
    assert row["title"] == "Dive Watch & Strap"
    assert row["content"] == "Features\n- Waterproof to 30 m\n- Strap & case\nBattery lasts 2 years.\nGift box.\nx"


def test_duplicated_products_are_counted(tmp_path, qa):
    stats = prepare(
        tmp_path, qa, lines(GOOD + GOOD[:4] + [dict(GOOD[5], uid="again", title=GOOD[5]["title"].upper())])
    )
    assert stats["dropped"]["duplicate_title"] == 5 and stats["kept"]["total"] == 12
    assert "again" not in {row["id"] for row in all_rows(tmp_path)}


def test_truncated_gzip(tmp_path, qa):
    whole = gzip.compress(lines(GOOD * 400))
    path = tmp_path / "trn.json.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"truncated or corrupt gzip file: it ended after [\d,]+ lines.*gzip -t"):
        prepare(tmp_path, qa, data=str(path))


def test_nonexistent_path(tmp_path, qa):
    with pytest.raises(UserError, match=r"does not exist; pass --data /path/to/trn.json"):
        prepare(tmp_path, qa, data=str(tmp_path / "nope.json"))


def test_directory_instead_of_file(tmp_path, qa):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "trn.json").write_bytes(lines(GOOD))
    with pytest.raises(UserError, match=r"is a directory, not a file\. It holds trn\.json\. Pass the file itself"):
        prepare(tmp_path, qa, data=str(tmp_path / "dataset"))


@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_bad_max_samples(tmp_path, qa, value):
    with pytest.raises(UserError, match=r"--max_samples must be a positive number or 'all'"):
        prepare(tmp_path, qa, lines(GOOD), max_samples=value)


def test_bad_split_sizes(tmp_path, qa):
    with pytest.raises(UserError, match=r"--val_size must be a fraction in \[0, 1\), got 1.5"):
        prepare(tmp_path, qa, lines(GOOD), val_size=1.5)


def test_huge_json_array_asks_for_json_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "ARRAY_LIMIT", 1000)
    path = tmp_path / "array.json"
    path.write_text(json.dumps(GOOD * 10), encoding="utf-8")
    with pytest.raises(UserError, match=r"one JSON array over .* Convert it to JSON lines"):
        list(data.iter_products(path))
