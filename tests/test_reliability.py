"""Bad input through the real command line: every case exits 0 with the skip counted, or exits 2 with one line
`error: ...` on stderr that says what to do, and never a traceback.

Data, `train.py --prepare-only --data BAD` (function-level checks: test_data_bad_input.py). The skippable cases
share one run over one file that holds them all (`mixed`); its log line reads
"... kept 15 (..., 1 truncated); dropped 7 (1 malformed json, 2 missing field, 4 duplicate title)".
    malformed JSON line mid-file     exit 0, stats.json dropped.malformed_json = 1
    row without title / content      exit 0, stats.json dropped.missing_field = 2
    non-UTF-8 bytes                  exit 0, row kept with U+FFFD, stats.json notes.bad_utf8 = 1, eda.md says so
    200k-char description            exit 0, cut at a sentence end, stats.json truncated = 1
    description full of HTML         exit 0, trained on as plain text
    duplicated products              exit 0, stats.json dropped.duplicate_title = 4
    empty file                       exit 2 "... is empty (0 bytes); re-download it or pass --data ..."
    every row filtered out           exit 2 "all 9 rows ... were dropped: 6 empty content, 3 short content.
                                     Fix: lower --min_content_chars (now 20)."
    truncated gzip                   exit 2 "... truncated or corrupt gzip file ... Check it with `gzip -t ...`"
    nonexistent path                 exit 2 "data file ... does not exist; pass --data /path/to/trn.json ..."
    directory instead of file        exit 2 "--data ... is a directory, not a file. It holds trn.json. Pass ..."
    --max-samples 0 / -3             exit 2 "--max_samples must be a positive number or 'all', got 0. ..."
  A bad path, an empty file or a bad --max-samples fails before the run folder is made.

CLI and model:
    unknown hub id, no network       exit 2 "could not load model 'some-org/does-not-exist-xyz' (OSError: ...).
                                     If this machine has no access to the model hub, pass --model_name_or_path ..."
    local folder, no config.json     exit 2 "... has no config.json, so it is not a transformers model folder. ..."
    --gguf q3_zz                     exit 2 "--gguf 'q3_zz': unknown GGUF type q3_zz. Valid types: f16, ..."
    --export-only without --run      exit 2 "--export-only needs --run <run folder>, e.g. --run outputs/run-..."
    infer.py, no such --run          exit 2 "run folder ... does not exist; pass a run in outputs/, or train: ..."
    infer.py, run without adapter    exit 2 ".../adapter holds no LoRA adapter (adapter_config.json); did ..."
    infer.py --engine llamacpp --gguf missing.gguf
                                     exit 2 "GGUF file ... does not exist; check the path ... or leave --gguf out ..."
Covered elsewhere: --backend unsloth without CUDA, --resume without a checkpoint, an existing --output-dir, kill -9
then --resume, Ctrl-C (test_train.py); a crash during GGUF conversion or quantization (test_export.py).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import orjson
import pytest
import yaml
from conftest import ROOT, SAMPLE, run_cli

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
    "</ul><p>Battery lasts 2 years.<br>Gift box.</p></div>"
)


def lines(rows: list) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def prepare(tmp_path: Path, data: Path | str, *extra: str):
    return run_cli(
        "train.py",
        "--prepare-only",
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "run"),
        *extra,
        timeout=300,
        check=False,
    )


def assert_user_error(result, pattern: str) -> str:
    """Exit 2, no traceback, and exactly one `error: ...` line, the last one on stderr, matching `pattern`."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    text = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in text if line.startswith("error: ")]
    assert len(errors) == 1 and text[-1] == errors[0], result.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def assert_ok(result, tmp_path: Path) -> tuple[dict, str]:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    stats = orjson.loads((tmp_path / "run" / "data" / "stats.json").read_bytes())
    summary = next(line for line in result.stderr.splitlines() if "data: read" in line)  # the one data log line
    return stats, summary


def split_rows(tmp_path: Path) -> list[dict]:
    folder = tmp_path / "run" / "data"
    return [
        orjson.loads(line)
        for s in ("train", "val", "test")
        for line in (folder / f"{s}.jsonl").read_bytes().splitlines()
        if line.strip()
    ]


# ------------------------------------------------------------------------------------- data: skipped and counted


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One --prepare-only run over a file that holds every skippable problem at once, as a real dump does."""
    tmp_path = tmp_path_factory.mktemp("mixed")
    bad_utf8 = b'{"uid": "B1", "title": "Caf\xe9 Espresso Cups", "content": "Four cups \xff\xfe in white porcelain."}'
    rows = (
        GOOD[:6]
        + [
            b'{"uid": "X", "title": "Broken',  # malformed JSON, mid-file
            {"uid": "N1", "content": "No title field here at all."},
            {"uid": "N2", "title": "No content field"},
            bad_utf8,
            {"uid": "L", "title": "Huge Workshop Manual", "content": LONG},
            {"uid": "H", "title": "Dive Watch &amp; Strap", "content": HTML},
        ]
        + GOOD[6:]
        + GOOD[:4]
    )  # the last four are duplicates
    path = tmp_path / "trn.json"
    path.write_bytes(lines(rows))
    result = prepare(tmp_path, path)
    stats, summary = assert_ok(result, tmp_path)
    return {
        "stats": stats,
        "summary": summary,
        "rows": {row["id"]: row for row in split_rows(tmp_path)},
        "eda": (tmp_path / "run" / "data" / "eda.md").read_text(encoding="utf-8"),
    }


def test_mixed_corpus_keeps_every_good_row(mixed):
    assert mixed["stats"]["kept"]["total"] == 15 and set(mixed["rows"]) == {g["uid"] for g in GOOD} | {"B1", "L", "H"}
    assert "dropped 7 (1 malformed json, 2 missing field, 4 duplicate title)" in mixed["summary"], mixed["summary"]


def test_malformed_json_line_mid_file_is_skipped_and_counted(mixed):
    assert mixed["stats"]["dropped"]["malformed_json"] == 1


def test_row_without_title_or_content_is_skipped_and_counted(mixed):
    assert mixed["stats"]["dropped"]["missing_field"] == 2


def test_non_utf8_bytes_are_repaired_and_counted(mixed):
    assert mixed["stats"]["notes"]["bad_utf8"] == 1 and "1 rows had invalid UTF-8" in mixed["eda"]
    assert "Caf\ufffd Espresso Cups" in mixed["rows"]["B1"]["prompt"][-1]["content"]


def test_200k_char_description_is_cut_and_counted(mixed):
    assert mixed["stats"]["truncated"] == 1 and mixed["stats"]["lengths"]["content"]["max"] == len(LONG)
    cut = mixed["rows"]["L"]["completion"][0]["content"]  # the answer template is "{content}"
    limit = mixed["stats"]["args"]["max_content_chars"]  # the CPU preset's, here
    assert limit // 2 <= len(cut) <= limit and cut.endswith("manual.")  # cut at a sentence end
    assert re.search(r"kept 15 .*, 1 truncated\)", mixed["summary"])


def test_html_description_is_trained_on_as_plain_text(mixed):
    answer = mixed["rows"]["H"]["completion"][0]["content"]
    assert "Waterproof to 30 m" in answer and "<" not in answer and "&amp;" not in answer


def test_duplicated_products_are_skipped_and_counted(mixed):
    assert mixed["stats"]["dropped"]["duplicate_title"] == 4


# ---------------------------------------------------------------------------------------------- data: errors


def test_empty_file(tmp_path):
    path = tmp_path / "trn.json"
    path.write_bytes(b"")
    assert_user_error(prepare(tmp_path, path), r"is empty \(0 bytes\); re-download it or pass --data")
    assert not (tmp_path / "run").exists(), "a failed start leaves no run folder for infer.py to pick up"


def test_every_row_filtered_out_names_the_filters(tmp_path):
    rows = [{"uid": f"E{i}", "title": f"Item {i}", "content": ""} for i in range(6)]
    rows += [{"uid": f"S{i}", "title": f"Short {i}", "content": "tiny"} for i in range(3)]
    path = tmp_path / "trn.json"
    path.write_bytes(lines(rows))
    assert_user_error(
        prepare(tmp_path, path),
        r"all 9 rows of .* were dropped: 6 empty content, 3 short content\. Fix: lower "
        r"--min_content_chars \(now 20\)",
    )
    assert not (tmp_path / "run").exists(), "a run whose data failed is removed, so it never looks like a run"


def test_truncated_gzip(tmp_path):
    whole = gzip.compress(lines(GOOD * 400))
    path = tmp_path / "trn.json.gz"
    path.write_bytes(whole[: len(whole) // 2])
    assert_user_error(prepare(tmp_path, path), r"truncated or corrupt gzip file: .*Check it with `gzip -t ")
    assert not (tmp_path / "run").exists()


def test_nonexistent_path(tmp_path):
    assert_user_error(prepare(tmp_path, tmp_path / "nope.json"), r"does not exist; pass --data /path/to/trn\.json")
    assert not (tmp_path / "run").exists()


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "trn.json").write_bytes(lines(GOOD))
    assert_user_error(
        prepare(tmp_path, tmp_path / "dataset"),
        r"is a directory, not a file\. It holds trn\.json\. Pass the file itself",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_samples_zero_or_negative(tmp_path, value):
    assert_user_error(
        prepare(tmp_path, SAMPLE, "--max-samples", value),
        rf"--max_samples must be a positive number or 'all', got {value}\. Use --max_samples all",
    )
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------------- CLI and model input


def test_unknown_hub_model_without_network(tmp_path, monkeypatch):
    # Offline mode makes "no network" fast and certain; the dead endpoint catches any request that slips through.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    result = run_cli(
        "train.py",
        "--data",
        str(SAMPLE),
        "--max-samples",
        "8",
        "--output-dir",
        str(tmp_path / "run"),
        "--model-name-or-path",
        "some-org/does-not-exist-xyz",
        "--gguf",
        "none",
        "--no-merge",
        "--eval-samples",
        "0",
        timeout=300,
        check=False,
    )
    assert_user_error(
        result,
        r"could not load model 'some-org/does-not-exist-xyz' \(OSError: .*\)\. If this machine "
        r"has no access to the model hub, pass --model_name_or_path with a local model folder",
    )


def test_local_folder_without_config_json(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    result = prepare(tmp_path, SAMPLE, "--model-name-or-path", str(folder))
    assert_user_error(
        result,
        r"has no config\.json, so it is not a transformers model folder\. Pass a folder written "
        r"by save_pretrained, a hub id, or leave --model_name_or_path out",
    )


def test_unknown_gguf_type(tmp_path):
    result = run_cli(
        "train.py",
        "--prepare-only",
        "--gguf",
        "q3_zz",
        "--output-dir",
        str(tmp_path / "run"),
        timeout=300,
        check=False,
    )
    assert_user_error(result, r"--gguf 'q3_zz': unknown GGUF type q3_zz\. Valid types: f16, .*q4_k_m")
    assert not (tmp_path / "run").exists()


def test_export_only_without_run():
    result = run_cli("train.py", "--export-only", timeout=300, check=False)
    assert_user_error(result, r"--export-only needs --run <run folder>, e.g\. --run outputs/")


def fake_run(root: Path) -> Path:
    """A run folder as train.py leaves it before training: config and prompts, no adapter and no GGUF."""
    run = root / "run"
    run.mkdir()
    shutil.copytree(ROOT / "prompts" / "qa", run / "prompts")
    config = {
        "base_model": "embedded",
        "backend": "hf",
        "seed": 42,
        "trust_remote_code": False,
        "max_length": 128,
        "model": {"model_name_or_path": "embedded"},
    }
    (run / "run_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return run


def test_infer_run_that_does_not_exist(tmp_path):
    result = run_cli("infer.py", "What is it?", "--run", str(tmp_path / "nope"), timeout=300, check=False)
    assert_user_error(result, r"run folder .*nope does not exist; pass a run in outputs/, or train: python train\.py")


def test_infer_run_without_adapter(tmp_path):
    run = fake_run(tmp_path)
    result = run_cli("infer.py", "What is it?", "--run", str(run), timeout=300, check=False)
    assert_user_error(result, r"adapter holds no LoRA adapter \(adapter_config\.json\); did training finish\?")


def test_infer_llamacpp_missing_gguf(tmp_path):
    run = fake_run(tmp_path)
    result = run_cli(
        "infer.py",
        "What is it?",
        "--run",
        str(run),
        "--engine",
        "llamacpp",
        "--only",
        "tuned",
        "--gguf",
        str(tmp_path / "missing.gguf"),
        timeout=300,
        check=False,
    )
    assert_user_error(result, r"GGUF file .*missing\.gguf does not exist; check the path .*leave --gguf out")
