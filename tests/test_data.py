"""Data prep on tiny inputs: cleaning, dedupe, seeded sampling, splits, rendering, stats, streaming memory.

The modules: titletune.text, titletune.reading, titletune.selection, titletune.prepare.
"""

from __future__ import annotations

import gzip
import itertools
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import orjson
import pytest

from titletune import chunks, prompts, selection
from titletune import prepare as stage
from titletune.prepare import prepare
from titletune.runs import read_split as load_split
from titletune.reading import iter_products
from titletune.selection import SPLITS, Selection, clean_product, data_workers
from titletune.text import clean_text, clean_title, title_key, truncate
from titletune.config import DataArguments
from titletune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_trn.json"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QA = ROOT / "prompts" / "qa"


@pytest.fixture(scope="module")
def qa() -> prompts.PromptSet:
    return prompts.load(QA)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def products(n: int, start: int = 0) -> list[dict]:
    """n distinct, valid products in trn.json's format (invented)."""
    return [
        {
            "uid": f"U{i:06d}",
            "title": f"Widget Model {i} Deluxe",
            "content": f"Widget number {i} with {i % 7} gears and a steel frame.",
            "target_ind": [i],
            "target_rel": [1.0],
        }
        for i in range(start, start + n)
    ]


def run(tmp_path: Path, qa: prompts.PromptSet, seed: int = 42, name: str = "run", **overrides) -> tuple[dict, Path]:
    out = tmp_path / name
    stats = prepare(DataArguments(**overrides), seed=seed, out_dir=out, prompts=qa)
    return stats, out


def kept_rows(out: Path) -> dict[str, list[dict]]:
    return {split: load_split(out, split) for split in SPLITS}


# --- cleaning -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Judith Kerr&#8217;s best&#8211;selling", "Judith Kerr\u2019s best\u2013selling"),
        ("Salt &amp; pepper &#8212; together", "Salt & pepper \u2014 together"),
        ("double &amp;#8217;escaped&amp;amp;", "double \u2019escaped&"),
        ("cp1252 refs: it&#x92;s &#151; done", "cp1252 refs: it\u2019s \u2014 done"),
        ("AT&T stays, and so does a & b", "AT&T stays, and so does a & b"),
        ("&quot;Quoted&quot;&#160;text", '"Quoted" text'),
    ],
)
def test_clean_text_decodes_entities(raw, clean):
    assert clean_text(raw) == clean


def test_clean_text_strips_tags_and_keeps_paragraphs():
    raw = "<p>Set of <b>four</b> mugs.</p><p>Holds 12 oz.<br/>Dishwasher safe.</p><ul><li>Blue</li><li>Red</li></ul>"
    assert clean_text(raw) == "Set of four mugs.\nHolds 12 oz.\nDishwasher safe.\n- Blue\n- Red"
    assert clean_text("size < 5 and a heart <3") == "size < 5 and a heart <3"
    assert clean_text("&lt;i&gt;Escaped&lt;/i&gt; italics<!-- note -->") == "Escaped italics"


@pytest.mark.parametrize(
    "raw",
    [
        "A fine story.--This text refers to theHardcoveredition.",
        "A fine story.--This text refers to an out of print or unavailable edition of this title.",
        "A fine story. -- This text refers to an alternatePaperbackedition.",
    ],
)
def test_clean_text_removes_edition_notes(raw):
    assert clean_text(raw) == "A fine story."


def test_clean_text_whitespace_control_and_unicode():
    assert clean_text("  a \t b\r\n\r\n\n  c  ") == "a b\nc"
    assert clean_text("zero\u200bwidth\x00 and\u00a0nbsp\x07") == "zerowidth and nbsp"
    assert clean_text("\uff37\uff49\uff44\uff45 \ufb01sh") == "Wide fish"  # NFKC: fullwidth letters, ligature
    assert clean_text("broken \ud800 surrogate") == "broken \ufffd surrogate"
    assert clean_text("") == ""
    assert clean_title("Two\nlines") == "Two lines"


def test_title_key():
    assert title_key("Mog's Kittens (Hardcover)") == "mog s kittens hardcover"
    assert title_key("  GIRLS   Ballet-Tutu, Neon_Pink! ") == "girls ballet tutu neon pink"
    assert title_key("\uff27irls Ballet Tutu Neon Pink") == title_key("girls ballet tutu neon pink")
    assert title_key("Stra\u00dfe") == title_key("STRASSE")  # casefold, not lower
    assert title_key("!!!") == ""


def test_truncate_at_sentence_end():
    text = "First sentence here. Second one is longer than that. Third."
    assert truncate(text, 100) == text
    assert truncate(text, 55) == "First sentence here. Second one is longer than that."
    assert truncate(text, 52) == "First sentence here. Second one is longer than that."
    cut = truncate("word " * 100, 50)  # no sentence end: cut at a space, marked
    assert len(cut) <= 50 and cut.endswith("\u2026") and " \u2026" not in cut


@pytest.mark.parametrize(
    "title, content, expected",
    [
        (
            "Lamp &amp; Shade",
            "A lamp with a <b>linen</b> shade.",
            ("Lamp & Shade", "lamp shade", "A lamp with a linen shade."),
        ),
        ("<b></b>", "", "empty_title"),  # the title is checked first
        ("Lamp", "<p> </p>", "empty_content"),
        ("Lamp", "Too short.", "short_content"),  # under min_chars, 20
        ("!!!", "Too short.", "short_content"),  # the content before the title key
        ("!!!", "A lamp with a linen shade.", "empty_title"),  # no letter or digit: no title key
    ],
)
def test_clean_product_returns_the_product_or_the_drop_reason(title, content, expected):
    assert clean_product({"id": "1", "title": title, "content": content}, 20) == expected


# --- reading --------------------------------------------------------------------------------------------------


def test_iter_products_ids_from_uid_or_line_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"uid": "A1", "title": "T1", "content": "C1"}\n\n{"title": "T2", "content": "C2"}\n', encoding="utf-8"
    )
    stats = Counter()
    rows = list(iter_products(path, stats=stats))
    assert rows == [{"id": "A1", "title": "T1", "content": "C1"}, {"id": "3", "title": "T2", "content": "C2"}]
    assert stats["rows_read"] == 2 and stats["blank_lines"] == 1


def test_iter_products_reads_gzip_by_magic_bytes_and_json_arrays(tmp_path):
    rows = products(3)
    gz = tmp_path / "trn.json"  # gzip content behind a .json name
    gz.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows)))
    array_file = tmp_path / "array.json"
    array_file.write_text("\n  " + json.dumps(rows), encoding="utf-8")
    expected = [{"id": r["uid"], "title": r["title"], "content": r["content"]} for r in rows]
    assert list(iter_products(gz)) == expected
    assert list(iter_products(array_file)) == expected


def test_iter_products_other_field_names(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"name": "Lamp", "description": "A lamp with a linen shade."}])
    assert list(iter_products(path, title_field="name", content_field="description")) == [
        {"id": "1", "title": "Lamp", "content": "A lamp with a linen shade."}
    ]


# --- prepare --------------------------------------------------------------------------------------------------


def test_prepare_dedupes_by_title_key_keeping_the_first(tmp_path, qa):
    rows = products(12)
    rows.insert(
        3, {"uid": "DUP", "title": "widget model 1, DELUXE", "content": "A later listing of the same product."}
    )
    stats, out = run(tmp_path, qa, data=str(write_jsonl(tmp_path / "d.jsonl", rows)))
    kept = [row for split in kept_rows(out).values() for row in split]
    assert stats["dropped"]["duplicate_title"] == 1
    assert "DUP" not in {row["id"] for row in kept}
    assert len({title_key(row["title"]) for row in kept}) == len(kept) == 12


def test_sampling_is_seeded_uniform_and_not_the_head(tmp_path, qa):
    def ids(seed: int, max_samples: str) -> set[str]:
        _, out = run(tmp_path, qa, seed=seed, name=f"s{seed}-{max_samples}", max_samples=max_samples)
        return {row["id"] for split in kept_rows(out).values() for row in split}

    first = ids(42, "50")
    assert len(first) == 50
    assert ids(42, "50") == first  # same seed, same set
    assert ids(7, "50") != first  # another seed, another set
    all_ids = ids(42, "all")
    head = set(sorted(all_ids)[:50])  # the sample's uids follow file order
    assert first != head
    assert first < ids(42, "100") < all_ids  # the N smallest hashes: a larger N keeps a superset


def test_sample_covers_the_whole_file(tmp_path, qa):
    """Uniform, not first-N: a sample of 10% of 2,000 products draws about as many from each half of the file."""
    path = write_jsonl(tmp_path / "big.jsonl", products(2000))
    _, out = run(tmp_path, qa, data=str(path), max_samples="200")
    numbers = [int(row["id"][1:]) for split in kept_rows(out).values() for row in split]
    assert len(numbers) == 200
    assert 70 <= sum(n < 1000 for n in numbers) <= 130


def test_splits_are_disjoint_and_stable(tmp_path, qa):
    stats_all, out_all = run(tmp_path, qa, name="all")
    _, out_50 = run(tmp_path, qa, name="fifty", max_samples="50")
    split_of = {}
    for split, rows in kept_rows(out_all).items():
        for row in rows:
            key = title_key(row["title"])
            assert key not in split_of, f"{row['title']!r} is in {split_of[key]} and {split}"
            split_of[key] = split
    # A smaller sample moves no product to another split, except that the top-up for small sets may move at most
    # one train product into each held-out split the sample left empty.
    moved = [
        (split_of[title_key(row["title"])], split)
        for split, rows in kept_rows(out_50).items()
        for row in rows
        if split_of[title_key(row["title"])] != split
    ]
    assert len(moved) <= 2 and all(old == "train" for old, _ in moved), moved
    assert all(stats_all["kept"][s] >= 1 for s in SPLITS)


def test_small_sets_get_one_val_and_one_test_product(tmp_path, qa):
    for n in (10, 11, 13):
        path = write_jsonl(tmp_path / f"small{n}.jsonl", products(n))
        stats, out = run(tmp_path, qa, name=f"small{n}", data=str(path))
        assert stats["kept"]["val"] >= 1 and stats["kept"]["test"] >= 1, stats["kept"]
        assert sum(len(rows) for rows in kept_rows(out).values()) == n
    stats, _ = run(tmp_path, qa, name="nine", data=str(write_jsonl(tmp_path / "nine.jsonl", products(9))))
    assert stats["kept"]["total"] == 9


def test_rows_render_into_prompt_and_completion(tmp_path, qa):
    _, out = run(tmp_path, qa)
    system = (QA / "system.txt").read_text(encoding="utf-8").strip()
    rows = [row for split in kept_rows(out).values() for row in split]
    for row in rows:
        assert set(row) == {"id", "title", "content", "prompt", "completion"}
        assert row["prompt"][0] == {"role": "system", "content": system}
        assert row["prompt"][1]["role"] == "user" and row["title"] in row["prompt"][1]["content"]
        assert row["completion"] == [{"role": "assistant", "content": row["content"]}]
        assert (
            "&#" not in row["content"] and "--This text refers" not in row["content"] and "<p>" not in row["content"]
        )
    tutu = [row for row in rows if row["title"] == "Girls Ballet Tutu Neon Pink"]
    assert len(tutu) == 1 and "pink" in tutu[0]["content"]


def test_stats_add_up(tmp_path, qa):
    stats, out = run(tmp_path, qa, max_samples="100")
    assert stats["rows_read"] == stats["kept"]["total"] + stats["dropped_total"]
    assert stats["kept"]["total"] == sum(stats["kept"][s] for s in SPLITS) == 100
    assert stats["dropped_total"] == sum(stats["dropped"].values())
    sample_lines = sum(1 for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip())
    assert stats["rows_read"] == sample_lines
    # Dropped from the sample: 4 empty titles, 10 empty and 2 short descriptions, 4 later copies of a title; of the
    # distinct valid products left, the sample keeps 100.
    assert stats["dropped"] == {
        **dict.fromkeys(("malformed_json", "not_an_object", "missing_field", "bad_field_type"), 0),
        "empty_title": 4,
        "empty_content": 10,
        "short_content": 2,
        "duplicate_title": 4,
        "over_max_samples": sample_lines - 20 - 100,
    }
    # Truncated: each kept product whose cleaned description is longer than the limit, and only those.
    limit = stats["args"]["max_content_chars"]
    raw = {row["id"]: row["content"] for row in iter_products(SAMPLE)}
    long = [row for rows in kept_rows(out).values() for row in rows if len(clean_text(raw[row["id"]])) > limit]
    assert stats["truncated"] == len(long) > 1 and all(len(row["content"]) <= limit for row in long)
    assert json.loads((out / "data" / "stats.json").read_text()) == stats
    for split in SPLITS:
        assert len(load_split(out, split)) == stats["kept"][split]


def test_prepare_is_reproducible(tmp_path, qa):
    _, a = run(tmp_path, qa, name="a", max_samples="60")
    _, b = run(tmp_path, qa, name="b", max_samples="60")
    for split in SPLITS:
        assert (a / "data" / f"{split}.jsonl").read_bytes() == (b / "data" / f"{split}.jsonl").read_bytes()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared real-data head not present")
def test_prepare_on_real_head(tmp_path, qa):
    stats, out = run(tmp_path, qa, data=str(SHARED_DATA / "trn_real_head300.jsonl"))
    folder = out / "data"
    names = {p.name for p in folder.iterdir()}
    # rag_train.jsonl and rag_read.jsonl: the RAG rows' neighbours and read products, empty without --rag-share
    # (tests/test_ragrows.py)
    rag = {"rag_train.jsonl", "rag_read.jsonl"}
    assert names == {"train.jsonl", "val.jsonl", "test.jsonl", *rag, "stats.json", "eda.md", "lengths.png"}
    assert not any((folder / name).read_bytes() for name in rag)
    assert (folder / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats["rows_read"] == 300 and stats["kept"]["total"] >= 280
    assert set(stats["lengths"]["content"]) == {"p25", "p50", "p75", "p95", "max", "mean"}
    report = (folder / "eda.md").read_text(encoding="utf-8")
    assert "| read | 300 |" in report and "lengths.png" in report
    for rows in kept_rows(out).values():
        for row in rows:
            assert "&#" not in row["content"] and "--This text refers" not in row["content"]
            assert len(row["content"]) <= 2000


def test_cache_key_covers_every_data_module(tmp_path, qa, monkeypatch):
    """A fix to any of the data modules or prompts.py gives a new key, so a stale cached output is never reused."""
    args = DataArguments(data=str(SAMPLE))
    code = stage.CODE
    assert {Path(m).name for m in code} == {
        "text.py", "reading.py", "selection.py", "prepare.py", "eda.py", "prompts.py", "ragrows.py",
    }  # fmt: skip
    key = stage.cache_key(args, 42, qa)
    for i, module in enumerate(code):
        edited = tmp_path / Path(module).name
        edited.write_bytes(Path(module).read_bytes() + b"\n# a fix\n")
        monkeypatch.setattr(stage, "CODE", (*code[:i], str(edited), *code[i + 1 :]))
        assert stage.cache_key(args, 42, qa) != key, module
    monkeypatch.setattr(stage, "CODE", code)
    assert stage.cache_key(args, 42, qa) == key


def test_load_split_needs_a_prepared_run(tmp_path):
    with pytest.raises(UserError, match="prepare the data first"):
        load_split(tmp_path, "train")
    with pytest.raises(UserError, match="one of train, val, test"):
        load_split(tmp_path, "dev")


# --- memory ---------------------------------------------------------------------------------------------------


def write_synthetic(path: Path, lines: int) -> Path:
    """trn.json-shaped rows, one template: fast to write (200k lines in well under a second)."""
    template = (
        '{"uid": "%010d", "title": "Synthetic Product %d Blue Edition", "content": "Product %d is a blue widget with '
        'a steel frame, two handles and a lifetime warranty &amp; free returns.", "target_ind": [%d, 7], '
        '"target_rel": [1.0, 1.0]}\n'
    )
    with open(path, "w", encoding="ascii") as f:
        f.writelines(template % (i, i, i, i) for i in range(lines))
    return path


def traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_is_flat(tmp_path):
    """Reading 200k lines peaks no higher than reading 20k; the selection holds a hash per product, not the rows."""
    small, big = write_synthetic(tmp_path / "small.json", 20_000), write_synthetic(tmp_path / "big.json", 200_000)

    def read(path: Path) -> None:
        for _ in iter_products(path):
            pass

    assert traced_peak(lambda: read(big)) - traced_peak(lambda: read(small)) < 256 * 1024

    def select(path: Path, rows: int) -> None:
        selection = Selection(seed=1, max_samples=1000, min_chars=20, max_chars=2000, counts=Counter())
        for row in itertools.islice(iter_products(path), rows):
            selection.add(row)
        assert len(selection.heap) == 1000

    # 60k rows, not 200k: tracemalloc makes the selection ~5x slower, and 60k already tells 80 bytes from 400.
    growth = traced_peak(lambda: select(big, 80_000)) - traced_peak(lambda: select(small, 20_000))
    # Each more product costs a set entry, an 8-byte hash and two lengths (~90 bytes); keeping rows would cost 400+.
    assert growth < 60_000 * 150, f"{growth / 1e6:.1f} MB for 60k more rows"


# --- parallel reading (--data_workers) --------------------------------------------------------------------------


def awkward_file(path: Path) -> Path:
    """Products with the cases a chunk boundary could break: duplicates far apart (in other chunks), rows without
    uid (their id is the file line number), a BOM, blank and malformed lines, a long line, no final newline."""
    rows = products(300)
    lines = [json.dumps(row) for row in rows]
    for i in range(0, 300, 7):  # a later copy of an earlier title, with other content: the first must win
        later = {**rows[i], "uid": f"DUP{i}", "content": "Another description, of a copy."}
        lines.insert(min(len(lines), 2 * i + 150), json.dumps(later))
    for i in range(5, len(lines), 37):
        lines.insert(i, json.dumps({"title": f"No uid product {i}", "content": f"A product without uid, number {i}."}))
    lines.insert(60, json.dumps({"uid": "LONG", "title": "Long one", "content": "Long text here. " * 2000}))
    lines[10:10] = ["", "{not json", "   "]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())  # BOM, and no newline after the last line
    return path


@pytest.mark.parametrize("max_samples", ["all", "120"])
def test_parallel_reading_writes_what_one_process_writes(tmp_path, qa, monkeypatch, max_samples):
    path = awkward_file(tmp_path / "awkward.json")
    monkeypatch.setattr(selection, "CHUNK_BYTES", 4096)  # ~25 chunks: duplicates and ids cross chunk boundaries
    assert len(chunks.ranges(path, path.stat().st_size, selection.CHUNK_BYTES)) > 10
    one, out1 = run(tmp_path, qa, name="one", data=str(path), max_samples=max_samples, data_workers="1")
    two, out2 = run(tmp_path, qa, name="two", data=str(path), max_samples=max_samples, data_workers="2")
    one.pop("seconds"), two.pop("seconds")
    assert one == two
    assert one["dropped"]["duplicate_title"] == 43 and one["dropped"]["malformed_json"] == 1
    assert one["notes"]["blank_lines"] == 2 and one["truncated"] == 1
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "eda.md"):
        assert (out1 / "data" / name).read_bytes() == (out2 / "data" / name).read_bytes(), name
    rows = [row for split in kept_rows(out2).values() for row in split]
    assert not [row for row in rows if row["id"].startswith("DUP")]  # the first occurrence won, across chunks
    no_uid = [row for row in rows if row["title"].startswith("No uid")]
    # The id of a row without uid is its line number in the file, whichever chunk it fell in.
    lines = path.read_bytes().decode("utf-8-sig").split("\n")
    assert len(no_uid) > 5 and all(row["title"] in lines[int(row["id"]) - 1] for row in no_uid)
    assert not list((out2 / "data").glob(".*tmp*"))  # the workers' chunk files are gone


def test_data_workers_auto_and_bad_values(tmp_path, qa):
    path = write_jsonl(tmp_path / "p.json", products(30))
    assert data_workers("auto", path) == 1  # a small file: no pool
    assert data_workers("3", path) == 3
    gz = tmp_path / "p.json.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert data_workers("4", gz) == 1  # a gzip stream cannot be cut into chunks
    with pytest.raises(UserError, match="--data-workers must be 'auto' or a number"):
        run(tmp_path, qa, data=str(path), data_workers="0")
    with pytest.raises(UserError, match="--data-workers must be 'auto' or a number"):
        run(tmp_path, qa, data=str(path), data_workers="many")


# --- phrasings: passes and held-out questions -------------------------------------------------------------------


def test_passes_ask_each_product_in_as_many_phrasings(tmp_path, qa):
    """The train split is read `passes` times; pass i asks every product the next line of user.txt, and the split file
    still holds one row per product."""
    from titletune import trainset

    _, out = run(tmp_path, qa, max_samples="30")
    split = load_split(out, "train")
    passes = 4
    train_ds, _ = trainset.load_datasets(out, qa, passes=passes, seed=42)
    assert len(load_split(out, "train")) == len(split)  # the file is untouched
    assert len(train_ds) == passes * len(split)
    assert train_ds.column_names == ["prompt", "completion"]
    n = len(split)
    for k, product in enumerate(split):
        asked = [train_ds[turn * n + k]["prompt"][-1]["content"] for turn in range(passes)]
        assert asked[0] == product["prompt"][-1]["content"]  # pass 0 is the split file's own row
        assert len(set(asked)) == passes  # 4 passes, 10 phrasings: 4 different questions
        assert all(product["title"] in q for q in asked)
        assert {train_ds[turn * n + k]["completion"][0]["content"] for turn in range(passes)} == {
            product["completion"][0]["content"]
        }
    assert len(trainset.load_datasets(out, qa, passes=1, seed=42)[0]) == n


def test_held_out_phrasings_are_never_trained(tmp_path, qa):
    """heldout.txt loads with the set; a line that user.txt also has is dropped; a set without the file uses qa's;
    the run's copy keeps them."""
    assert len(qa.held_out) >= 3 and not set(qa.held_out) & set(qa.questions)
    q = prompts.held_out_question(qa, "Girls Ballet Tutu Neon Pink", "U1", 42)
    trained = {t.replace("{title}", "Girls Ballet Tutu Neon Pink") for t in qa.questions}
    assert "Girls Ballet Tutu Neon Pink" in q and q not in trained
    own = tmp_path / "own"
    own.mkdir()
    for name in prompts.FILES:
        (own / name).write_text((QA / name).read_text(encoding="utf-8"), encoding="utf-8")
    assert prompts.load(own).held_out == qa.held_out  # no heldout.txt: the default set's
    (own / "heldout.txt").write_text(f"{qa.questions[0]}\nIs {{title}} any good?\n", encoding="utf-8")
    assert prompts.load(own).held_out == ("Is {title} any good?",)
    (own / "heldout.txt").write_text("no slot here\n", encoding="utf-8")
    with pytest.raises(UserError, match="heldout.txt: every line must contain {title}"):
        prompts.load(own)
    saved = prompts.save(qa, tmp_path / "run")
    assert prompts.load(saved).held_out == qa.held_out
