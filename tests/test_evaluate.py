"""evaluate_run on a tiny run with the real embedded model: reports, metric sanity, populations, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_infer import INFER, ROOT, TEST, TRAIN, build_run

from titletune import evaluate, pipeline, runs
from titletune.engines import Sampling
from titletune.evaluate import EvalSettings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("evaluate"))


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    settings = EvalSettings(samples=3, seed=7, rag_k=2, sampling=Sampling(max_new_tokens=16))
    return pipeline.finish(runs.load(run_dir), settings=settings)


def test_report_files_and_schema(run_dir, report):
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for pop in ("seen", "heldout"):
        assert list(report[pop]) == ["base", "tuned", "retrieval", "base+rag", "tuned+rag", "tuned+distractors"]
        for system in report[pop].values():
            for name in ("rouge1", "rouge2", "rougeL", "rougeL_p", "rougeL_r"):
                m = system[name]
                assert m["n"] == 3 and 0.0 <= m["ci"][0] <= m["mean"] <= m["ci"][1] <= 1.0
            assert 0.0 <= system["bleu"]["mean"] <= 100.0
        for pair in ("tuned - base", "tuned+rag - tuned", "tuned+distractors - tuned"):
            d = report["differences"][pop][pair]["rougeL"]
            assert d["n"] == 3 and d["ci"][0] <= d["mean"] <= d["ci"][1] and isinstance(d["significant"], bool)
    assert report["counts"] == {"seen": 3, "heldout": 3}
    assert report["settings"]["samples"] == 3 and report["settings"]["seed"] == 7 and report["settings"]["rag_k"] == 2
    # One decoding for every system, recorded: infer.py's defaults but for the answer length given here.
    assert report["settings"]["sampling"] == {**dataclasses.asdict(Sampling()), "max_new_tokens": 16}
    assert report["index"] == f"{len(TRAIN)} train products of the run"
    assert len(report["examples"]) == 6
    for e in report["examples"]:
        assert e["base"] and e["tuned"] and e["reference"] and e["base+rag"] and e["tuned+rag"]
        assert len(e["retrieved"]) <= 2  # a held-out product may share no word with the 4 training products
        if e["population"] == "seen":
            assert e["retrieved"][0] == e["title"]
            # The distractors-only prompt holds other products, never the one asked about.
            assert e["tuned+distractors"] and e["title"] not in e["distractors"] and len(e["distractors"]) <= 2
    assert any(e["distractors"] for e in report["examples"] if e["population"] == "seen")
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_md_has_tables_and_the_seen_retrieval_warning(run_dir, report):
    md = (run_dir / "report.md").read_text()
    header = (
        "| system | ROUGE-1 | ROUGE-2 | ROUGE-L F1 | ROUGE-L P | ROUGE-L R | numbers supported | BLEU | loss | ppl |"
    )
    assert md.count(header) == 2
    assert "## Seen products" in md and "## Held-out products" in md
    assert "it is the ceiling, not a baseline" in md
    assert md.count("| reference | base | tuned | retrieval | base+rag | tuned+rag | tuned+distractors |") == 3
    assert md.count("**tuned vs base**: ROUGE-L F1") == 2 and md.count("**tuned+rag vs tuned**: ROUGE-L F1") == 2
    assert "greedy, at most 16 new tokens, repetition penalty 1.0" in md


def test_retrieval_finds_seen_products_themselves(report):
    assert report["seen"]["retrieval"]["rougeL"]["mean"] > 0.9
    assert report["heldout"]["retrieval"]["rougeL"]["mean"] < 0.9  # held-out products are not in the index
    for e in report["examples"]:
        if e["population"] == "seen":
            assert e["retrieval"] == e["reference"]


def test_loss_and_perplexity(report):
    for pop in ("seen", "heldout"):
        base, tuned = report[pop]["base"], report[pop]["tuned"]
        for m in (base, tuned):
            assert m["loss"] > 0 and math.isclose(m["ppl"], math.exp(m["loss"]), rel_tol=1e-3)
        assert base["loss"] != tuned["loss"]  # the adapter changes the model
        assert "loss" not in report[pop]["retrieval"]


def test_sampling_is_deterministic_and_questions_match_training(run_dir):
    run = runs.load(run_dir)
    first = evaluate.sample_populations(run, run.split("train"), 2, 5, None)
    again = evaluate.sample_populations(run, run.split("train"), 2, 5, None)
    assert [p["id"] for p in first["seen"]] == [p["id"] for p in again["seen"]]
    assert {p["id"] for p in first["seen"]} <= {pid for pid, _, _ in TRAIN}
    assert {p["id"] for p in first["heldout"]} <= {pid for pid, _, _ in TEST}


def test_data_file_split_by_title_into_seen_and_heldout(run_dir, tmp_path):
    # trn format: uid/title/content, HTML entities and case differences as in the real file.
    rows = [
        {"uid": "x1", "title": TRAIN[0][1].upper(), "content": TRAIN[0][2]},
        {"uid": "x2", "title": "Garden Hose 50 ft &amp; Nozzle", "content": "A kink-free hose with a nozzle."},
        {"uid": "x3", "title": TRAIN[1][1], "content": TRAIN[1][2]},
        {"uid": "x4", "title": "", "content": "no title: dropped"},
        {"uid": "x5", "title": "Tiny Note", "content": "Too short."},  # under min_content_chars' default, 20
        {"uid": "x6", "title": "!!!", "content": "A title of punctuation only has no title key."},
    ]
    path = tmp_path / "trn.json"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bare = runs.Run(run_dir, {})  # a config without data settings: DataArguments' defaults
    train = bare.split("train")
    pops = evaluate.sample_populations(bare, train, 5, 1, path)
    assert sorted(p["id"] for p in pops["seen"]) == ["x1", "x3"]
    assert [p["title"] for p in pops["heldout"]] == ["Garden Hose 50 ft & Nozzle"]
    # The run's own data settings win over the defaults: the filter and the cut are training's.
    cfg = {"data": {"min_content_chars": 5, "max_content_chars": 12}}
    pops = evaluate.sample_populations(runs.Run(run_dir, cfg), train, 5, 1, path)
    assert [(p["id"], p["content"]) for p in pops["heldout"]] == [("x2", "A kink-free\u2026"), ("x5", "Too short.")]


@pytest.mark.skipif(not (SHARED_DATA / "trn_real_head300.jsonl").is_file(), reason="shared sample data absent")
def test_real_sample_file_is_all_heldout_and_deterministic(run_dir):
    bare = runs.Run(run_dir, {})
    train = bare.split("train")
    path = SHARED_DATA / "trn_real_head300.jsonl"
    pops = evaluate.sample_populations(bare, train, 4, 3, path)
    again = evaluate.sample_populations(bare, train, 4, 3, path)
    assert pops["seen"] == [] and len(pops["heldout"]) == 4
    assert pops == again
    assert all("&#" not in p["content"] for p in pops["heldout"])  # cleaned as training cleans


def test_infer_evaluate_cli(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report.*"))
    proc = subprocess.run(
        [sys.executable, str(INFER), "evaluate", "--run", str(run), "--samples", "1", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**__import__("os").environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "| retrieval |" in proc.stdout
    report = json.loads((run / "report.json").read_text())
    assert report["counts"] == {"seen": 1, "heldout": 1}
    assert {"report.json", "report.md", "report.png"} <= {p.name for p in run.iterdir()}


def test_evaluate_with_llamacpp_engine(gguf_run):
    settings = EvalSettings(samples=2, sampling=Sampling(max_new_tokens=12))
    report = pipeline.finish(runs.load(gguf_run), settings=settings, engine="llamacpp")
    assert report["engine"] == "llamacpp"
    for pop in ("seen", "heldout"):
        assert report[pop]["base"]["loss"] is None  # llama.cpp gives no teacher-forced loss here
        assert report[pop]["base"]["rougeL"] == report[pop]["tuned"]["rougeL"]  # same GGUF under both names
        assert report[pop]["base+rag"]["rougeL"] == report[pop]["tuned+rag"]["rougeL"]
    assert "| base |" in (gguf_run / "report.md").read_text()
