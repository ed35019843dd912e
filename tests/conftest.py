"""Shared fixtures: one real training run of the embedded model, made once per session through the real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# As in train.py: passive OpenMP waiting, so tests sharing 2 cores with other processes do not collapse.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "data" / "sample_trn.json"

# A schedule that is tiny but real: 12 steps of batch 4 at a high learning rate visibly lower the loss of the
# 135M model in about a minute on 2 cores. Short answers keep every step cheap.
TINY = [
    "--max-samples",
    "40",
    "--max-steps",
    "12",
    "--per-device-train-batch-size",
    "4",
    "--learning-rate",
    "1e-3",
    "--max-length",
    "128",
    "--max-content-chars",
    "240",
    "--logging-steps",
    "2",
    "--save-steps",
    "6",
    "--warmup-steps",
    "0",
]


def run_cli(*args: str, timeout: int = 900, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the entry points as a user would, from the repository root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args[0]} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
            f"--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def assert_user_error(result: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit 2, no traceback, and exactly one `error: ...` line, the last one on stderr, matching `pattern`."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    text = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in text if line.startswith("error: ")]
    assert len(errors) == 1 and text[-1] == errors[0], result.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def jsonl(rows: list) -> bytes:
    """Rows as JSON lines; a bytes row is written as it is (a broken line on purpose)."""
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def prepare_cli(tmp_path: Path, data: Path | str, *extra: str) -> subprocess.CompletedProcess:
    """train.py --prepare-only on `data` into tmp_path/run, as a user runs it; the caller checks the outcome."""
    args = ("train.py", "--prepare-only", "--data", str(data), "--output-dir", str(tmp_path / "run"), *extra)
    return run_cli(*args, timeout=300, check=False)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from the run's train_log.jsonl."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A complete run folder: data, adapter, merged model, GGUF (f16 + q4_k_m), Modelfile and evaluation report."""
    run_dir = tmp_path_factory.mktemp("runs") / "run1"
    result = run_cli(
        "train.py",
        "--data",
        str(SAMPLE),
        "--output-dir",
        str(run_dir),
        *TINY,
        "--gguf",
        "q4_k_m",
        "--eval-samples",
        "2",
    )
    (run_dir.parent / "train.log").write_text(result.stderr)  # beside the run: what the command said
    return run_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The 300 real records beside the project (never copied into it)."""
    path = SHARED_DATA / "trn_real_head300.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is not here (the shared folder sits beside the checkout)")
    return path


@pytest.fixture(scope="module")
def gguf_run(run_dir, tmp_path_factory) -> Path:
    """The module's `run_dir` with a GGUF export; the embedded GGUF stands in for it (a link, not a 100 MB copy)."""
    import shutil

    from titletune import base_models

    run = tmp_path_factory.mktemp("gguf") / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report.*"))
    (run / "model.q4_k_m.gguf").symlink_to(base_models.embedded_gguf())
    return run
