"""bench/gpu_check.py, the CUDA check, end to end on CPU: `prepare` for the CUDA machine (Python 3.12, budget) and for
this interpreter (the same distributions), then `run --cpu-smoke`: a fresh --no-index install, children that see only
what a CUDA machine has, train.py on a random tiny Llama, the checks and the report. Needs the package index (pip's
cache makes a second prepare fast). The CUDA run itself is marked gpu and skipped without CUDA.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from packaging.utils import parse_wheel_filename

sys.path.insert(0, str(ROOT / "bench"))
import gpu_wheels

pytestmark = pytest.mark.slow
CHECK = "bench/gpu_check.py"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(the CUDA machine's folder, this interpreter's folder of the same distributions)."""
    base = tmp_path_factory.mktemp("gpu-check")
    cuda, local = base / "wheels-cuda", base / "wheels-local"
    run_cli(CHECK, "prepare", "--dir", str(cuda), timeout=1200)
    run_cli(CHECK, "prepare", "--for-this-python", "--like", str(cuda), "--dir", str(local), timeout=1200)
    return cuda, local


def manifest(folder: Path) -> dict:
    return json.loads((folder / gpu_wheels.MANIFEST).read_text())


def test_the_cuda_folder_fits_the_budget_and_lists_what_it_left_out(folders):
    cuda, _ = folders
    m = manifest(cuda)
    on_disk = sum(p.stat().st_size for p in cuda.rglob("*") if p.is_file())
    assert on_disk < 60 * 2**20 and m["total_mib"] < 60, m["total_mib"]
    names = {w["name"] for w in m["wheels"]}
    assert {"trl", "datasets", "unsloth", "unsloth_zoo", "bitsandbytes", "pyarrow", "rouge-score", "orjson"} <= names
    for w in m["wheels"]:  # every wheel installs on CPython 3.12, manylinux x86_64
        tags = parse_wheel_filename(w["file"])[3]
        assert any(t.interpreter in ("py3", "py312", "cp312") or t.abi == "abi3" for t in tags), w["file"]
        assert all(t.platform == "any" or re.match(r"manylinux.*_x86_64$", t.platform) for t in tags), w["file"]
    assert {p.name for p in (cuda / "tokenizer").iterdir()} == {"tokenizer.json.gz", "tokenizer_config.json",
                                                                "chat_template.jinja"}  # fmt: skip
    left_out = " ".join(item["name"] for item in m["left_out"])
    assert "llama-cpp-python" in left_out and "matplotlib" in left_out
    assert "matplotlib" in m["assumed_on_machine"]


def test_repacked_wheels_hold_only_what_cuda_runs_and_a_true_record(folders):
    cuda, _ = folders
    files = {w["name"]: cuda / w["file"] for w in manifest(cuda)["wheels"]}
    with zipfile.ZipFile(files["unsloth"]) as z:
        names = z.namelist()
        assert "unsloth/__init__.py" in names and not any(n.startswith("studio/") for n in names)
    with zipfile.ZipFile(files["bitsandbytes"]) as z:
        libs = sorted(n.split("/")[-1] for n in z.namelist() if n.endswith(".so"))
        assert libs == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    for name in ("unsloth", "bitsandbytes", "pyarrow", "pillow", "lxml"):
        assert_record_matches(files[name])


def assert_record_matches(wheel: Path) -> None:
    """Every file in the wheel is in RECORD with its sha256 and size, and RECORD lists nothing else."""
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = {row[0]: row[1:] for row in csv.reader(io.StringIO(z.read(record).decode()))}
        files = [i for i in z.infolist() if not i.is_dir() and i.filename != record]
        assert set(rows) == {i.filename for i in files} | {record}, wheel.name
        for info in files:
            data = z.read(info)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert rows[info.filename] == [f"sha256={digest}", str(len(data))], info.filename


def test_cpu_smoke_installs_from_the_folder_trains_and_checks(folders, tmp_path):
    _, local = folders
    out = tmp_path / "out"
    result = run_cli(CHECK, "run", "--cpu-smoke", "--wheels", str(local), "--out", str(out), timeout=1500)
    assert "gpu_check: passed" in result.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert "failed" not in report, report.get("failed")
    versions = report["versions"]
    for name in ("trl", "datasets", "pyarrow", "bitsandbytes", "unsloth", "orjson", "rouge_score", "PIL"):
        assert "/site/" in versions[name]["file"], (name, versions[name])  # the folder's copy, not this venv's
    assert versions["unsloth"]["path"] == "CPU backend"
    assert versions["bitsandbytes lib"]["file"].endswith("libbitsandbytes_cpu.so")
    tiny = report["tiny"]["hf"]
    assert tiny["loss_last"] < tiny["loss_first"] and tiny["steps_logged"] == 20
    assert tiny["lora_b"] > 0 and tiny["lora_b_zero"] == 0
    assert tiny["merge_error"] <= 0.01 < tiny["references"]["16-bit"]["adapter_effect"]
    assert all(tiny["checks"].values()), tiny["checks"]
    assert (out / "gpu_check.md").read_text().startswith("# GPU check (cpu smoke)")
    assert (out / "run-hf" / "report.json").is_file()


def test_a_package_missing_from_the_folder_stops_the_run_in_one_line(folders, tmp_path):
    _, local = folders
    broken = tmp_path / "wheels"  # a folder that holds orjson only: TRL is then on neither side
    shutil.copytree(local, broken, ignore=lambda _, names: [n for n in names if n.endswith(".whl")])
    m = manifest(local)
    m["wheels"] = [w for w in m["wheels"] if w["name"] == "orjson"]
    shutil.copy(local / m["wheels"][0]["file"], broken)
    (broken / gpu_wheels.MANIFEST).write_text(json.dumps(m))
    out = tmp_path / "out"
    result = run_cli(CHECK, "run", "--cpu-smoke", "--wheels", str(broken), "--out", str(out), timeout=600, check=False)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("gpu_check: ")]
    assert len(lines) == 1 and lines[0].startswith("gpu_check: install: trl: ModuleNotFoundError"), result.stderr
    assert "tiny" not in json.loads((out / "gpu_check.json").read_text())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
def test_cuda_run_trains_both_backends_in_4bit(folders, tmp_path):
    _, local = folders
    out = tmp_path / "out"
    run_cli(CHECK, "run", "--wheels", str(local), "--out", str(out), "--no-bench", "--budget-scale", "3", timeout=1800)
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report["tiny"]) == {"unsloth", "hf"}
    for backend, r in report["tiny"].items():
        assert all(r["checks"].values()), (backend, r["checks"])
    assert report["tiny"]["unsloth"]["merged_into"] == "4-bit"
