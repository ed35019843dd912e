"""RAG-aware training rows (titletune/ragrows.py): the neighbours data preparation finds on the real records, the
rows each pass adds, and a real training run with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE, TINY, assert_user_error, losses, prepare_cli, run_cli

from titletune import prepare, prompts, ragrows, trainset
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
    plain, _ = trainset.load_datasets(prepared, ps, passes=4, seed=42)
    mixed, _ = trainset.load_datasets(prepared, ps, passes=4, seed=42, rag_share=0.25, rag_distractors=0.3)
    extra = [mixed[i] for i in range(len(plain), len(mixed))]
    assert [mixed[i] for i in range(len(plain))] == [plain[i] for i in range(len(plain))]  # plain rows unchanged
    train = _lines(prepared / "data" / "train.jsonl")
    read = _lines(prepared / "data" / ragrows.READ_FILE)
    answers = {r["completion"][0]["content"]: r for r in train}
    read_answers: dict[str, list[dict]] = {}  # two real products can share a description
    for r in read:
        read_answers.setdefault(ps.answer.replace("{content}", r["content"]), []).append(r)
    own = distractors_only = 0
    read_rows: dict[str, int] = {}
    for row in extra:
        asked = row["prompt"][-1]["content"]
        assert asked.startswith(ps.rag.split("{context}")[0].strip())  # through the run's rag.txt
        assert 1 <= asked.count("Product: ") <= ragrows.RAG_TRAIN_ENTRIES
        answer = row["completion"][0]["content"]
        question = asked.split(ps.rag.split("{question}")[0].splitlines()[-1])[-1]
        asked_read = [r for r in read_answers.get(answer, []) if r["title"] in question]
        if asked_read:  # a read product: always asked with its own entry
            product = asked_read[0]
            assert f"Product: {product['title']}\n" in asked
            read_rows[product["title"]] = read_rows.get(product["title"], 0) + 1
            continue
        product = answers[answer]  # the completion is the product's own answer
        if f"Product: {product['title']}\n" in asked:
            own += 1
        else:
            distractors_only += 1
    rag = own + distractors_only
    assert 0.15 * 4 * len(train) < rag < 0.35 * 4 * len(train)  # a seeded quarter of each pass
    assert own and distractors_only and 0.15 < distractors_only / rag < 0.45
    assert read and read_rows == {r["title"]: 4 for r in read}  # every read product, once a pass
    again, _ = trainset.load_datasets(prepared, ps, passes=4, seed=42, rag_share=0.25, rag_distractors=0.3)
    assert [again[i] for i in range(len(again))] == [mixed[i] for i in range(len(mixed))]  # seeded: every rank, resume


def test_a_seeded_share_of_train_products_is_read_only_and_in_no_evaluated_population(prepared, shared_data):
    from titletune import evaluate, retrieval, runs
    from titletune.config import RAG_READ

    train = _lines(prepared / "data" / "train.jsonl")
    read = _lines(prepared / "data" / ragrows.READ_FILE)
    near = _lines(prepared / "data" / ragrows.FILE)
    assert len(near) == len(train)  # the neighbours stay line for line with what is still trained plainly
    assert not {r["title"] for r in read} & {r["title"] for r in train}
    assert 0.5 * RAG_READ < len(read) / (len(read) + len(train)) < 1.5 * RAG_READ
    for product in read:
        assert 1 <= len(product["neighbours"]) and product["title"] not in [n["title"] for n in product["neighbours"]]
    stats = json.loads((prepared / "data" / "stats.json").read_text())
    assert stats["kept"]["rag_read"] == len(read) and stats["kept"]["train"] == len(train)
    run = runs.load(prepared)
    pops = evaluate.sample_populations(run, run.split("train"), 1000, 7, shared_data)
    asked = {p["title"] for pop in pops.values() for p in pop}
    assert not asked & {r["title"] for r in read}  # neither seen nor held out: read in training
    assert len(pops["seen"]) == len(train)
    index = retrieval.open_index(run)  # the run's own index, the one serving searches, holds them
    assert index.search(read[0]["title"], 1)[0]["title"] == read[0]["title"]
    index.close()


def test_no_read_products_without_rag_rows_or_at_rag_read_0(shared_data, tmp_path):
    ps = prompts.load(DataArguments().prompts)
    for name, extra in (("off", {}), ("zero", {"rag_share": 0.25, "rag_read": 0.0})):
        prepare.prepare(DataArguments(data=str(shared_data), **extra), 42, tmp_path / name, ps)
        assert (tmp_path / name / "data" / ragrows.READ_FILE).read_bytes() == b""
    assert (tmp_path / "off" / "data" / "train.jsonl").read_bytes() == (
        tmp_path / "zero" / "data" / "train.jsonl"
    ).read_bytes()


def test_a_share_outside_0_to_1_is_refused(tmp_path):
    assert_user_error(prepare_cli(tmp_path, SAMPLE, "--rag-share", "1.5"), r"--rag-share must be a fraction")
    assert_user_error(prepare_cli(tmp_path, SAMPLE, "--rag-read", "1"), r"--rag-read must be a fraction")


def test_a_run_prepared_without_neighbours_says_how_to_get_them(tmp_path):
    assert prepare_cli(tmp_path, SAMPLE, "--max-samples", "20").returncode == 0
    with pytest.raises(Exception, match="prepared without --rag-share"):
        trainset.load_datasets(tmp_path / "run", None, passes=1, seed=42, rag_share=0.5)


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
