"""The capacity planner: the law, the line train.py prints before training and its warning, capacity.json, and what
the card and report.md show of it; and the catalogues the capacity benchmark generates. Nothing here trains."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from titletune import capacity, config

ROOT = Path(__file__).resolve().parents[1]
# LoRA r16 on all seven projections of SmolLM2-135M (30 layers, hidden 576, MLP 1536, kv 192): 305,280 per rank.
SMOL_R16 = 16 * 305_280
# The 3B preset's r16 adapter on Llama 3.2 3B (28 layers, hidden 3072, MLP 8192, kv 1024): 1,519,616 per rank.
LLAMA3B_R16 = 16 * 1_519_616
FIXES = ("--lora-r", "--passes", "--max-samples", "--rag-share", "infer.py serve", "tuned+rag")


def test_a_small_catalogue_on_the_135m_r16_adapter_fits_without_a_warning():
    e = capacity.estimate(SMOL_R16, 300, 61.0, config.PASSES)
    assert e.recall >= config.CAPACITY_WARN
    assert capacity.warning(e) is None
    assert e.fits_products > 300


def test_100000_products_on_the_3b_preset_warn_in_one_line_that_names_every_fix():
    e = capacity.estimate(24_000_000, 100_000, 130.0, 4)
    assert e.recall < config.CAPACITY_WARN
    message = capacity.warning(e)
    assert message is not None and "\n" not in message
    for fix in FIXES:
        assert fix in message
    assert f"{e.recall:.2f}" in message and f"{e.fits_products:,}" in message
    # More views or a bigger adapter hold more; the estimate says how many products would fit.
    assert capacity.estimate(24_000_000, 100_000, 130.0, 8).fits_products > e.fits_products
    assert capacity.estimate(96_000_000, 100_000, 130.0, 4).fits_products > e.fits_products


def test_the_line_train_py_prints_names_the_four_figures():
    e = capacity.estimate(SMOL_R16, 265, 60.83, 8)
    text = capacity.line(e)
    assert "\n" not in text
    assert "4.9M trainable parameters" in text
    assert "265 products x 61 answer tokens = 16.1k tokens" in text
    assert f"capacity ratio {e.ratio:.3g}" in text and f"predicted seen ROUGE-L {e.recall:.2f} at 8 views" in text


def test_recall_falls_with_the_ratio_between_the_floor_and_1_and_ratio_for_inverts_it():
    law = capacity.Law()
    ratios = [10**x for x in range(-5, 3)]
    recalls = [law.recall(r) for r in ratios]
    assert recalls == sorted(recalls, reverse=True)
    assert recalls[0] < 1 and recalls[-1] == pytest.approx(law.floor, abs=1e-3)
    assert law.recall(law.ratio_for(0.5)) == pytest.approx(0.5)
    assert law.recall(law.ratio_for(0.5, 4), 4) == pytest.approx(0.5)
    assert law.recall(1e-3, 4) < law.recall(1e-3, 8)  # fewer views hold less


def test_fit_goes_through_two_points_and_puts_other_views_on_the_curve():
    points = [(0.003, 8, 0.8), (0.05, 8, 0.2)]
    law = capacity.fit(points, floor=0.1)
    for ratio, views, recall in points:
        assert law.recall(ratio, views) == pytest.approx(recall, abs=1e-9)
    target = law.recall(0.003 * 16, 8)  # the recall of 16x the ratio; at half the views with exponent 4 it is the same
    law4 = capacity.fit([*points, (0.003, 4, target)], floor=0.1)
    assert law4.views_exponent == pytest.approx(4.0, abs=1e-6)
    with pytest.raises(ValueError):
        capacity.fit([(0.003, 8, 0.8), (0.003, 4, 0.3)], floor=0.1)


def test_config_constants_are_the_fit_of_the_committed_rows():
    """The constants in config.py are what `bench_capacity.py --fit` prints for bench/capacity_results.jsonl."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_capacity

    used, floor = bench_capacity.fit_points(bench_capacity.read_rows(bench_capacity.RESULTS))
    law = capacity.fit([(r["ratio"], r["views"], r["seen"]["tuned"]["mean"]) for r in used], floor)
    assert round(law.floor, 3) == config.CAPACITY_FLOOR
    assert round(law.midpoint, 3) == config.CAPACITY_MIDPOINT
    assert round(law.slope, 2) == config.CAPACITY_SLOPE
    assert round(law.views_exponent, 1) == config.CAPACITY_VIEWS_EXPONENT
    assert law.views == config.CAPACITY_VIEWS == config.PASSES


def test_mean_tokens_counts_without_special_tokens():
    class Tokenizer:
        def __call__(self, texts, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": [t.split() for t in texts]}

    assert capacity.mean_tokens(Tokenizer(), ["a b", "a b c d"]) == 3.0
    assert capacity.mean_tokens(Tokenizer(), []) == 0.0


def _split(path: Path, n: int) -> Path:
    rows = [{"id": str(i), "completion": [{"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a blank last line is no product
    return path


def test_sample_answers_counts_every_product_and_samples_a_seeded_subset(tmp_path):
    from titletune import training

    split = _split(tmp_path / "train.jsonl", 50)
    products, answers = training.sample_answers(split, None, 42)
    assert products == 50 and answers == [f"answer {i}" for i in range(50)]
    products, answers = training.sample_answers(split, 10, 42)
    assert products == 50 and len(answers) == 10 and len(set(answers)) == 10
    assert training.sample_answers(split, 10, 42) == (products, answers)


def test_plan_capacity_logs_the_line_and_the_warning_and_writes_capacity_json(tmp_path, caplog):
    from titletune import training

    with caplog.at_level(logging.INFO, logger="titletune.training"):
        small = training.plan_capacity(SMOL_R16, 265, 60.83, 8, tmp_path)
    assert [r.getMessage() for r in caplog.records] == [capacity.line(small)]
    saved = json.loads((tmp_path / capacity.FILE).read_text())
    assert saved["trainable"] == SMOL_R16 and saved["products"] == 265 and saved["catalogue_tokens"] == 16120
    assert saved["recall"] == pytest.approx(small.recall) and saved["law"]["midpoint"] == config.CAPACITY_MIDPOINT

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="titletune.training"):
        big = training.plan_capacity(LLAMA3B_R16, 90_000, 130.0, 4, tmp_path)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", capacity.line(big)),
        ("WARNING", capacity.warning(big)),
    ]


def test_the_card_and_report_md_show_the_capacity_beside_the_recall_reached():
    from titletune import card
    from titletune import reports as report_md

    saved = capacity.estimate(SMOL_R16, 265, 60.83, 8).to_json()
    rows = dict(card._capacity(saved))
    assert rows["trainable parameters"] == "4,884,480"
    assert rows["catalogue (train products x mean answer tokens)"] == "265 x 60.8 = 16,120 tokens"
    assert rows["capacity ratio (answer tokens per trainable parameter)"] == f"{saved['ratio']:.3g}"
    assert all(value is None for _, value in card._capacity(None))

    report = {"seen": {"tuned": {"rougeL": {"mean": 0.829, "ci": [0.730, 0.921]}}}, "counts": {"seen": 50}}
    table = "\n".join(report_md.capacity_lines(report, saved))
    row = next(line for line in table.splitlines() if line.startswith(f"| {saved['ratio']:.3g} "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    per_1000 = f"{round(4_884_480 * 1000 / 265):,}"  # 18,432,000: the adapter per 1,000 products trained
    assert cells[1:] == [
        "4,884,480",
        "265",
        per_1000,
        "60.8",
        "8",
        f"{saved['recall']:.2f}",
        "0.829 [0.730, 0.921]",
        "50",
    ]
    assert "scored on 50 of the 265 products trained" in table


def test_generated_catalogues_are_seeded_distinct_and_leave_the_sample_as_it_was(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "data"))
    import make_sample

    from titletune.text import title_key

    first = make_sample.write_catalogue(400, tmp_path / "a.jsonl", 1)
    again = make_sample.write_catalogue(400, tmp_path / "b.jsonl", 1)
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert first.read_bytes() == again.read_bytes()
    assert len(rows) == 400 and len({title_key(r["title"]) for r in rows}) == 400
    assert all(r["content"] for r in rows)  # no trap rows
    smaller = make_sample.write_catalogue(100, tmp_path / "c.jsonl", 1).read_text().splitlines()
    assert smaller == first.read_text().splitlines()[:100]  # nested: the same seed's first products

    monkeypatch.setattr(make_sample, "OUT", tmp_path / "sample_trn.json")
    make_sample.main()
    assert (tmp_path / "sample_trn.json").read_bytes() == (ROOT / "data" / "sample_trn.json").read_bytes()


def test_bench_rows_parse_and_the_dry_run_plans_without_training(tmp_path):
    import subprocess

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_capacity

    assert bench_capacity.parse_row("real300:r16") == ("real300", 16)
    assert bench_capacity.parse_row("gen1000:full") == ("gen1000", None)
    for bad in ("real300:16", "gen:r4", "real300:r0", "other:r1"):
        with pytest.raises(ValueError):
            bench_capacity.parse_row(bad)

    def dry_run(rows: str) -> str:
        return subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_capacity.py"), "--dry-run", "--rows", rows,
             "--work", str(tmp_path), "--results", str(tmp_path / "none.jsonl")],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip

    out = dry_run("gen300:r4,gen1000:full")
    assert "gen300:r4: to run; about 270 train products, 540 steps" in out
    assert "--lora_r 4 --lora_alpha 4" in out and "--learning_rate 1e-4" in out
    assert "--overwrite" in out and "--resume" not in out
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    # a row stopped after a checkpoint: the plan names it and shows the command that continues it
    checkpoint = tmp_path / "gen300-r4" / "checkpoint-40"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 40}')
    out = dry_run("gen300:r4")
    assert "gen300:r4: to resume from checkpoint-40" in out
    assert "--resume --lora_r 4" in out and "--overwrite" not in out


def test_fit_prints_the_capacity_line_after_the_adapter_is_built_and_before_the_trainer(tmp_path, monkeypatch, caplog):
    """training.fit's own wiring, stopped where the trainer would be built: the trainable parameters come from the
    adapter, the products and answer lengths from the run's train split under the model's tokenizer."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from titletune import base_models, training

    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i}?"}], "completion": [{"role": "assistant", "content": c}]}
        for i, c in enumerate(["one two three four", "five six", "seven"] * 4)
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "val.jsonl").write_text("")
    tokenizer = AutoTokenizer.from_pretrained(base_models.resolve("embedded"))
    expected = capacity.mean_tokens(tokenizer, [r["completion"][0]["content"] for r in rows])

    class Adapter:
        def get_nb_trainable_parameters(self):
            return SMOL_R16, 135_000_000

    backend = SimpleNamespace(load=lambda *a, **k: (object(), tokenizer), add_lora=lambda *a: Adapter())

    def no_trainer(*args, **kwargs):
        raise RuntimeError("stop before training")

    monkeypatch.setattr(training, "build_trainer", no_trainer)
    model_args = SimpleNamespace(model_name_or_path="embedded", lora_r=16)
    training_args = SimpleNamespace(
        seed=42, trust_remote_code=False, max_length=128, bf16=False, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, world_size=1, max_steps=-1, num_train_epochs=1, process_index=0,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="titletune.training"), pytest.raises(RuntimeError, match="stop"):
        training.fit(backend, "base", model_args, training_args, tmp_path, False, training.Rows(passes=1))
    saved = json.loads((tmp_path / capacity.FILE).read_text())
    assert saved["trainable"] == SMOL_R16 and saved["products"] == 12 and saved["views"] == 1
    assert saved["answer_tokens"] == pytest.approx(expected)
    assert capacity.line(capacity.estimate(SMOL_R16, 12, expected, 1)) in caplog.text


def test_report_md_shows_the_capacity_table_only_with_a_complete_capacity_json():
    from titletune import reports as report_md

    cell = {"mean": 0.5, "ci": [0.4, 0.6]}
    metrics = {m: cell for m in ("rouge1", "rouge2", "rougeL", "rougeL_p", "rougeL_r", "numbers", "bleu")}
    report = {
        "settings": {"samples": 2, "seed": 1, "rag_k": 1, "sampling": {"temperature": 0, "max_new_tokens": 8,
                     "repetition_penalty": 1.0, "top_p": 1.0}},
        "run": "r", "engine": "transformers", "data": "run splits", "index": "i", "counts": {"seen": 2},
        "seen": {"tuned": {**metrics, "loss": None, "ppl": None}}, "examples": [], "systems": ["tuned"],
    }  # fmt: skip
    saved = capacity.estimate(SMOL_R16, 265, 60.83, 8).to_json()
    assert "### Capacity" in report_md.render_md(report, None, saved)
    assert "### Capacity" not in report_md.render_md(report, None, {"ratio": 0.1})
    assert "### Capacity" not in report_md.render_md(report)


def test_the_bench_table_tells_a_copied_row_from_a_missing_one():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_capacity

    cell = {"tuned": {"mean": 0.8, "ci": [0.7, 0.9]}}
    rows = [
        {"row": "real300:r16", "views": 8, "measured_by": "bench_learn", "seen": cell, "trainable": 4884480},
        {"row": "real300:r4", "views": 8, "measured_by": bench_capacity.ME, "seen": cell, "resumed_from": "c-40"},
    ]
    lines = bench_capacity.table(rows, ["real300:r16", "real300:r4", "gen1000:r64"]).splitlines()
    assert lines[2].startswith("| real300:r16 | 8 | 4,884,480 |") and "0.800 [0.700, 0.900]" in lines[2]
    assert "(resumed)" in lines[3]
    assert lines[4].startswith("| real300:r16 | 8 | copied in (source bench_learn, above); not yet measured by bench_")
    assert lines[5].startswith("| gen1000:r64 | 8 | not yet measured |")
    assert len(lines) == 6  # real300:r4, measured by the bench itself, is not planned again
