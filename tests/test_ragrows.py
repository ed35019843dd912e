"""RAG-aware training rows (titletune/ragrows.py): the neighbours data preparation finds on the real records, the
rows each pass adds, and a real training run with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE, TINY, assert_user_error, losses, prepare_cli, run_cli

from titletune import prepare, prompts, ragrows, training
from titletune.config import RAG_DISTRACTORS, RAG_MAX_LENGTH, DataArguments


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory) -> Path:
    """The 300 real records prepared with --rag-share 0.25, through the real CLI."""
    tmp = tmp_path_factory.mktemp("ragrows")
    result = prepare_cli(tmp, shared_data, "--rag-share", "0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def test_each_train_product_gets_its_nearest_neighbours_never_itself(prepared):
    train = _lines(prepared / "data" / "train.jsonl")
    near = _lines(prepared / "data" / ragrows.FILE)
    assert [r["id"] for r in near] == [str(r["id"]) for r in train]  # line for line
    for product, row in zip(train, near, strict=True):
        assert 1 <= len(row["neighbours"]) <= ragrows.NEIGHBOURS
        assert product["title"] not in [n["title"] for n in row["neighbours"]]
    # The near-duplicate titles of the real file are each other's first neighbour, when both were trained.
    by_title = {r["title"]: n["neighbours"] for r, n in zip(train, near, strict=True)}
    pink, blue = "Girls Ballet Tutu Neon Pink", "Girls Ballet Tutu Neon Blue"
    if pink in by_title and blue in by_title:
        assert by_title[pink][0]["title"] == blue and by_title[blue][0]["title"] == pink


def test_the_neighbours_are_the_same_on_every_preparation(shared_data, tmp_path):
    args = DataArguments(data=str(shared_data), rag_share=0.25)
    ps = prompts.load(args.prompts)
    for name in ("a", "b"):
        prepare.prepare(args, 42, tmp_path / name, ps)
    first, second = ((tmp_path / n / "data" / ragrows.FILE).read_bytes() for n in ("a", "b"))
    assert first and first == second


def test_each_pass_adds_rag_rows_with_the_own_entry_or_distractors_only(prepared):
    ps = prompts.load(prepared / "prompts")
    plain, _ = training.load_datasets(prepared, ps, passes=4, seed=42)
    mixed, _ = training.load_datasets(prepared, ps, passes=4, seed=42, rag_share=0.25, rag_distractors=0.3)
    extra = [mixed[i] for i in range(len(plain), len(mixed))]
    assert [mixed[i] for i in range(len(plain))] == [plain[i] for i in range(len(plain))]  # plain rows unchanged
    products = len(_lines(prepared / "data" / "train.jsonl"))
    assert 0.15 * 4 * products < len(extra) < 0.35 * 4 * products  # a seeded quarter of each pass
    answers = {r["completion"][0]["content"]: r for r in _lines(prepared / "data" / "train.jsonl")}
    own = distractors_only = 0
    for row in extra:
        asked = row["prompt"][-1]["content"]
        assert asked.startswith(ps.rag.split("{context}")[0].strip())  # through the run's rag.txt
        product = answers[row["completion"][0]["content"]]  # the completion is the product's own answer
        entries = asked.count("Product: ")
        assert 1 <= entries <= ragrows.RAG_TRAIN_ENTRIES
        if f"Product: {product['title']}\n" in asked:
            own += 1
        else:
            distractors_only += 1
    assert own and distractors_only and 0.15 < distractors_only / len(extra) < 0.45
    again, _ = training.load_datasets(prepared, ps, passes=4, seed=42, rag_share=0.25, rag_distractors=0.3)
    assert [again[i] for i in range(len(again))] == [mixed[i] for i in range(len(mixed))]  # seeded: every rank, resume


def test_a_share_outside_0_to_1_is_refused(tmp_path):
    assert_user_error(prepare_cli(tmp_path, SAMPLE, "--rag-share", "1.5"), r"--rag_share must be a fraction")


def test_a_run_prepared_without_neighbours_says_how_to_get_them(tmp_path):
    assert prepare_cli(tmp_path, SAMPLE, "--max-samples", "20").returncode == 0
    with pytest.raises(Exception, match="prepared without --rag_share"):
        training.load_datasets(tmp_path / "run", None, passes=1, seed=42, rag_share=0.5)


@pytest.fixture(scope="module")
def rag_run(tmp_path_factory) -> tuple[Path, str]:
    """A tiny real training run with --rag-share 0.5 (adapter only); returns the folder and train.py's log."""
    run_dir = tmp_path_factory.mktemp("ragrun") / "rag"
    result = run_cli(
        "train.py", "--data", str(SAMPLE), "--output-dir", str(run_dir), *TINY,
        "--rag-share", "0.5", "--gguf", "none", "--no-merge", "--eval-samples", "0",
    )  # fmt: skip
    return run_dir, result.stderr


def test_training_with_rag_rows_lowers_the_loss_and_records_the_settings(rag_run):
    run_dir, log = rag_run
    assert "RAG-aware training:" in log
    steps = losses(run_dir)
    assert steps[max(steps)] < steps[min(steps)]
    saved = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    assert saved["data"]["rag_share"] == 0.5 and saved["data"]["rag_distractors"] == RAG_DISTRACTORS
    assert saved["training"]["max_length"] == 128  # given on the command line: kept


def test_a_rag_trained_run_is_asked_with_catalogue_entries_unless_told_not_to(rag_run):
    run_dir, _ = rag_run
    title = _lines(run_dir / "data" / "train.jsonl")[0]["title"]
    question = f'What is "{title}"?'
    asked = json.loads(
        run_cli("infer.py", "--run", str(run_dir), "--json", "--max-new-tokens", "8", question, timeout=300).stdout
    )
    assert asked["tuned+rag"] and asked["retrieved"][0] == title
    plain = json.loads(
        run_cli(
            "infer.py", "--run", str(run_dir), "--json", "--max-new-tokens", "8", "--rag", "false", question,
            timeout=300,
        ).stdout
    )  # fmt: skip
    assert "tuned+rag" not in plain and "retrieved" not in plain


def test_rag_rows_get_room_when_max_length_is_left_at_its_default(tmp_path):
    assert prepare_cli(tmp_path, SAMPLE, "--max-samples", "20", "--rag-share", "0.25").returncode == 0
    saved = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert saved["training"]["max_length"] == RAG_MAX_LENGTH
