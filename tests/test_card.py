"""The model card (README.md) a run carries: where it is written, its hub metadata, every number against its source
file, and how export and evaluation rewrite it. Parsed back with huggingface_hub, offline."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import losses, run_cli

from titletune import base_models, card, pipeline, runs
from titletune.config import RAG_SHARE_ON
from titletune.engines import Sampling
from titletune.evaluate import EvalSettings

FOLDERS = {"": "transformers", "adapter": "peft", "merged": "transformers"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the card must parse, and be written, with no network


def load(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def section(text: str, heading: str) -> str:
    """The text under the first heading that starts with `heading`, up to the next heading of its level or above."""
    level = heading.split(" ")[0]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    end = next(
        (j for j in range(start + 1, len(lines)) if re.match(rf"#{{1,{len(level)}}} ", lines[j])),
        len(lines),
    )
    return "\n".join(lines[start + 1 : end])


def tables(text: str) -> list[dict[str, dict[str, str]]]:
    """Every Markdown table in `text`, as {first cell: {column: cell}}."""
    found, rows = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            head, body = rows[0], rows[2:]
            found.append({r[0]: dict(zip(head, r, strict=True)) for r in body})
            rows = []
    return found


def numbers(cell: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*\.?\d*(?:e-?\d+)?", cell)]


def close(shown: float, source: float, digits: int) -> bool:
    """`shown` is `source` rounded to `digits` decimals."""
    return abs(shown - source) <= 0.5 * 10**-digits + 1e-9


@pytest.fixture(scope="module")
def text(trained_run) -> str:
    return (trained_run / "README.md").read_text(encoding="utf-8")


def test_card_in_every_folder_with_hub_metadata(trained_run):
    bodies = set()
    for folder, library in FOLDERS.items():
        parsed = load(trained_run / folder / "README.md")
        assert parsed.data.base_model == base_models.EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert parsed.data.library_name == library
        assert parsed.data.pipeline_tag == "text-generation"
        assert parsed.data.license == "apache-2.0"
        assert {"titletune", "lora", "sft", "trl"} <= set(parsed.data.tags)
        assert ("gguf" in parsed.data.tags) == (folder == "")  # the GGUF files sit in the run folder only
        assert "qlora" not in parsed.data.tags  # the CPU run trains a 16-bit base
        assert parsed.data.datasets == ["sample_trn.json"]  # invented products: not named as the real dataset
        bodies.add(parsed.text)
    assert len(bodies) == 1  # one body under three metadata blocks
    assert "More Information Needed" not in bodies.pop()  # peft's empty template in adapter/ is replaced


def test_a_train_run_writes_the_card_once_at_its_end(trained_run):
    """Export and evaluation return their numbers; the card is written once, after both (pipeline.finish)."""
    said = (trained_run.parent / "train.log").read_text().splitlines()
    writes = [i for i, line in enumerate(said) if "titletune.card: card:" in line]
    assert len(writes) == 1, [said[i] for i in writes]
    assert "README.md, adapter/README.md, merged/README.md" in said[writes[0]]
    assert writes[0] > max(i for i, line in enumerate(said) if "titletune.evaluate:" in line)  # after evaluation


def test_results_match_report_json(trained_run, text):
    report = json.loads((trained_run / "report.json").read_text())
    for pop, heading in (("seen", "### Seen products"), ("heldout", "### Held-out products")):
        table = tables(section(text, heading))[0]
        assert list(table) == list(report[pop])
        for system, cells in table.items():
            source = report[pop][system]
            mean, low, high = numbers(cells["ROUGE-L F1"])
            assert close(mean, source["rougeL"]["mean"], 3)
            assert close(low, source["rougeL"]["ci"][0], 3) and close(high, source["rougeL"]["ci"][1], 3)
            assert close(numbers(cells["BLEU"])[0], source["bleu"]["mean"], 2)
            if source.get("loss") is not None:
                assert close(numbers(cells["loss"])[0], source["loss"], 2)
        assert f"Products scored: {report['counts'][pop]}." in section(text, heading)
    # The limits section quotes the tuned and base ROUGE-L of both populations.
    quoted = re.findall(r"ROUGE-L F1 ([\d.]+) against the base model's ([\d.]+) \(n = (\d+)\)", text)
    assert len(quoted) == 2
    for (tuned, base, n), pop in zip(quoted, ("seen", "heldout"), strict=True):
        assert close(float(tuned), report[pop]["tuned"]["rougeL"]["mean"], 3)
        assert close(float(base), report[pop]["base"]["rougeL"]["mean"], 3)
        assert int(n) == report["counts"][pop]


def test_data_matches_stats_json(trained_run, text):
    stats = json.loads((trained_run / "data" / "stats.json").read_text())
    data = section(text, "## Data")
    counts, drops = tables(data)
    assert numbers(counts["rows read"]["count"]) == [stats["rows_read"]]
    for split in ("train", "val", "test", "total"):
        assert numbers(counts[f"kept: {split}"]["count"]) == [stats["kept"][split]]
    assert numbers(counts["dropped"]["count"]) == [stats["dropped_total"]]
    assert {reason: numbers(row["rows"])[0] for reason, row in drops.items()} == {
        reason.replace("_", " "): n for reason, n in stats["dropped"].items()
    }
    assert f"({stats['input']['bytes']:,} bytes)" in data and f"({stats['truncated']:,} were)" in data
    prompts = runs.load(trained_run).prompts
    assert f"{len(prompts.questions)} question phrasings in training, {len(prompts.held_out)} more" in data


def test_training_matches_log_config_and_adapter(trained_run, text):
    rows = tables(section(text, "## Training"))[0]
    records = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    step, loss = max(losses(trained_run).items())
    shown_loss, shown_step = numbers(rows["final train loss"]["value"])
    assert close(shown_loss, loss, 4) and shown_step == step == numbers(rows["steps"]["value"])[0]
    runtime = sum(r["train_runtime"] for r in records if "train_runtime" in r)
    assert close(numbers(rows["training time"]["value"])[0], runtime, 1)
    tokens = [r["num_tokens"] for r in records if "num_tokens" in r][-1]
    assert close(numbers(rows["tokens/s (non-pad tokens trained)"]["value"])[0], tokens / runtime, 1)
    lora = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert numbers(rows["LoRA r / alpha / dropout"]["value"]) == [lora["r"], lora["lora_alpha"], lora["lora_dropout"]]
    assert rows["LoRA targets"]["value"].split(", ") == sorted(lora["target_modules"])
    config = yaml.safe_load((trained_run / "run_config.yaml").read_text())
    assert numbers(rows["learning rate"]["value"])[0] == config["training"]["learning_rate"] == 1e-3
    assert numbers(rows["effective batch"]["value"])[0] == 4
    assert numbers(rows["passes (phrasings per product per epoch)"]["value"]) == [config["data"]["passes"]]
    assert rows["device, precision"]["value"].startswith("CPU, ")
    assert rows["final eval loss"]["value"] == "-"  # the CPU run does not evaluate during training


def test_files_and_fidelity_match_export_json(trained_run, text):
    exported = json.loads((trained_run / "export.json").read_text())
    rows = tables(section(text, "## Files"))[0]
    ggufs = {e["name"]: e for e in exported["files"]}
    assert set(rows) == {
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        *ggufs,
        "Modelfile",
    }
    for name, row in rows.items():
        assert numbers(row["bytes"]) == [(trained_run / name).stat().st_size]
        if name in ggufs:  # taken from export.json, not hashed again
            assert row["sha256"] == ggufs[name]["sha256"]
        else:
            assert row["sha256"] == hashlib.sha256((trained_run / name).read_bytes()).hexdigest()
    fidelity = tables(section(text, "### Export fidelity"))[0]
    assert set(fidelity) == set(ggufs)
    for name, row in fidelity.items():
        f = ggufs[name]["fidelity"]
        assert numbers(row["identical answers"]) == [round(100 * f["identical"])]
        assert numbers(row["perplexity (merged/)"]) == [f["perplexity"], f["perplexity_merged"]]
        assert numbers(row["tokens/s"]) == [f["tokens_per_second"]]
    usage = section(text, "## How to use")
    # Paths relative to the run folder: the card names no folder of the machine it was written on.
    assert "ollama create titletune -f Modelfile" in usage
    assert "llama-cli -m model.q4_k_m.gguf -cnv -nr" in usage and 'Llama(model_path="model.q4_k_m.gguf"' in usage
    assert f"python infer.py --run path/to/{trained_run.name} " in usage and 'run = "."' in usage
    assert str(trained_run.parent) not in text
    # What the GGUF alone answers and what the tuned+rag server adds, with this run's own figures.
    report = json.loads((trained_run / "report.json").read_text())
    assert "It cannot search" in usage and f"python infer.py serve --run path/to/{trained_run.name}" in usage
    assert f"ROUGE-L F1 {report['heldout']['tuned+rag']['rougeL']['mean']:.3f}" in usage
    assert "trained without catalogue entries" in usage and f"--rag-share {RAG_SHARE_ON:g}" in usage


def _linked_copy(run: Path, target: Path) -> Path:
    """The run without checkpoints; the big weights linked, not copied (everything rewrites them by renaming)."""

    def link_weights(src, dst):
        if src.endswith((".safetensors", ".gguf")):
            return Path(dst).hardlink_to(src)
        return shutil.copy2(src, dst)

    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoint-*"), copy_function=link_weights)
    return target


def test_export_only_and_evaluation_rewrite_the_card(trained_run, tmp_path):
    run_dir = _linked_copy(trained_run, tmp_path / "run")
    for path in [*run_dir.glob("report.*"), *(run_dir / folder / "README.md" for folder in FOLDERS)]:
        path.unlink()

    run_cli("train.py", "--export-only", "--run", str(run_dir), "--gguf", "none", timeout=300)
    for folder, library in FOLDERS.items():
        assert load(run_dir / folder / "README.md").data.library_name == library
    text = (run_dir / "README.md").read_text()
    assert "No evaluation yet (report.json)" in section(text, "## Results")
    assert "### Seen products" not in text
    assert tables(section(text, "### Export fidelity"))  # export.json is still there

    settings = EvalSettings(samples=1, seed=3, sampling=Sampling(max_new_tokens=8))
    report = pipeline.finish(runs.load(run_dir), settings=settings)
    text = (run_dir / "adapter" / "README.md").read_text()
    assert "No evaluation yet" not in text
    for pop, heading in (("seen", "### Seen products"), ("heldout", "### Held-out products")):
        assert "Products scored: 1." in section(text, heading)
        tuned = tables(section(text, heading))[0]["tuned"]
        assert close(numbers(tuned["ROUGE-L F1"])[0], report[pop]["tuned"]["rougeL"]["mean"], 3)
    assert "greedy decoding of at most 8 tokens" in text  # the new report's settings


def test_missing_sources_say_so_and_a_local_base_keeps_its_license(trained_run, tmp_path):
    """A run folder holding only its config, adapter config and prompts, over a local base folder whose README.md
    names a license: every section says what is missing, and nothing is invented for the hub metadata."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n\nA local model.\n")
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    shutil.copytree(trained_run / "prompts", run_dir / "prompts")
    shutil.copy(trained_run / "adapter" / "adapter_config.json", run_dir / "adapter")
    (run_dir / "run_config.yaml").write_text(yaml.safe_dump({"base_model": str(base), "model": {}}))

    written = card.write(runs.load(run_dir))
    assert written == [run_dir / "README.md", run_dir / "adapter" / "README.md"]  # no merged/, no card there
    parsed = load(run_dir / "adapter" / "README.md")
    assert parsed.data.license == "mit" and parsed.data.library_name == "peft"
    assert parsed.data.base_model is None and parsed.data.datasets is None  # a folder is no hub id
    assert "gguf" not in parsed.data.tags
    text = parsed.text
    for line in (
        "No data statistics (data/stats.json is missing).",
        "No training log (train_log.jsonl is missing).",
        "No evaluation yet (report.json)",
        "No GGUF export (export.json).",
        "No merged/ yet",
        "No GGUF yet",
    ):
        assert line in text
    assert "the base model in `path/to/base`" in text and str(tmp_path) not in text

    # The real catalogue file is named as its dataset.
    (run_dir / "data").mkdir()
    stats = json.loads((trained_run / "data" / "stats.json").read_text())
    stats["input"]["path"] = "/data/LF-AmazonTitles-1.3M/trn.json"
    (run_dir / "data" / "stats.json").write_text(json.dumps(stats))
    card.write(runs.load(run_dir))
    assert load(run_dir / "README.md").data.datasets == ["LF-AmazonTitles-1.3M"]
