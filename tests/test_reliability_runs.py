"""Run folders under stress, through the real train.py and infer.py: what --overwrite, --resume, a second command, a
kill signal or a full disk may and may not do to a run. Every refusal is exit 2 with one `error: ...` line that says
what to do, no traceback, and the user's files as they were.

    --overwrite --prompts /typo (or a bad model)    refused before the old run is touched
    --overwrite, new run fails before a checkpoint  the old run is moved back, byte for byte
    a run folder another live process writes to     refused, naming pid, host, start and command
    a lock left by a dead process                   a warning naming it, and taken over
    --resume --lora-r 32 / another base model       refused, nothing recorded under resumes:
    --resume from a checkpoint of another run       refused (titletune.json in every checkpoint)
    \"\"\" in system.txt                              refused before the run folder exists
    SIGTERM during data preparation                 exit 143, one line, no half-made folder
    --gguf ","                                      refused up front
    a full disk (/dev/full)                         one line: which folder, the free space, --resume
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SAMPLE, assert_user_error, run_cli


def finished_run(root: Path) -> Path:
    """A run folder as a finished run leaves it, with files of known content (no real weights: nothing may read them)."""
    run = root / "run"
    shutil.copytree(ROOT / "prompts" / "qa", run / "prompts")
    config = {"base_model": "embedded", "backend": "hf", "seed": 42, "max_length": 128, "model": {}}
    (run / "run_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text('{"r": 16}\n')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (run / "model.q8_0.gguf").write_bytes(b"GGUF" + os.urandom(2048))
    (run / "report.md").write_text("# the report\n")
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_lock(run: Path, pid: int) -> None:
    holder = {"pid": pid, "host": socket.gethostname(), "started": "2026-11-22T10:15:00", "command": "python train.py"}
    (run / ".lock").write_text(json.dumps(holder))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it now (pids are not reused this soon)


# ------------------------------------------------------------------------------------------------------ --overwrite


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--prompts", "/typo"], r"prompt set /typo lacks system\.txt"),
        (["--model-name-or-path", "/no/such/model"], r"--model-name-or-path /no/such/model: no such folder"),
    ],
)
def test_overwrite_with_a_bad_flag_leaves_the_finished_run_untouched(tmp_path, flags, pattern):
    run = finished_run(tmp_path)
    before = snapshot(run)
    result = run_cli("train.py", "--output-dir", str(run), "--overwrite", *flags, "--max-steps", "2", check=False)
    assert_user_error(result, pattern)
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing moved aside either


def test_overwrite_gives_the_old_run_back_when_the_new_one_fails_before_its_first_checkpoint(tmp_path):
    run = finished_run(tmp_path)
    before = snapshot(run)
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"name": "no title or content field"}\n' * 3)
    result = run_cli(
        "train.py", "--prepare-only", "--output-dir", str(run), "--overwrite", "--data", str(junk), check=False
    )
    # The data passes every check up front (it exists, it is not empty); only reading it shows every row is unusable.
    assert_user_error(result, r"all 3 rows of .*junk\.jsonl were dropped")
    assert "moved the previous run aside" in result.stderr
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.jsonl", "run"]

    # A new run that finishes replaces the old one, and the old one is gone, not left aside.
    run_cli("train.py", "--prepare-only", "--output-dir", str(run), "--overwrite", "--data", str(SAMPLE))
    assert not (run / "adapter").exists() and (run / "data" / "train.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.jsonl", "run"]


# ----------------------------------------------------------------------------------------------------------- lock


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    run = finished_run(tmp_path)
    write_lock(run, os.getpid())  # this test's own process: alive
    before = snapshot(run)
    held = r"is in use by pid %d on %s since 2026-11-22T10:15:00 \(python train\.py\)\. Wait for it to end"
    held %= (os.getpid(), socket.gethostname())
    for command in (
        ("train.py", "--prepare-only", "--output-dir", str(run), "--overwrite"),
        ("train.py", "--export-only", "--run", str(run), "--gguf", "q8_0"),
        ("infer.py", "evaluate", "--run", str(run), "--samples", "1"),
    ):
        assert_user_error(run_cli(*command, check=False), held)
        assert snapshot(run) == before

    write_lock(run, dead := dead_pid())
    result = run_cli("train.py", "--prepare-only", "--output-dir", str(run), "--overwrite", "--data", str(SAMPLE))
    assert f"taking over the stale lock of pid {dead} on {socket.gethostname()}" in result.stderr
    assert (run / "data" / "train.jsonl").is_file()
    assert not (run / ".lock").exists()  # released when the command ended


def test_auto_run_names_are_unique_within_a_second(tmp_path):
    from titletune import claims

    (tmp_path / "run-20261122-101500").mkdir()
    (tmp_path / "run-20261122-101500-2").mkdir()
    assert claims.unused_name(tmp_path, "run-20261122-101500") == "run-20261122-101500-3"
    assert claims.unused_name(tmp_path, "run-20261122-101501") == "run-20261122-101501"


# --------------------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished run of 2 steps with checkpoint-2: what the resume tests start from (each works on a copy)."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    run_cli(
        "train.py", "--data", str(SAMPLE), "--max-samples", "8", "--max-steps", "2", "--save-steps", "2",
        "--max-length", "128", "--max-content-chars", "200", "--output-dir", str(run),
        "--no-merge", "--gguf", "none", "--eval-samples", "0",
    )  # fmt: skip
    return run


@pytest.fixture
def resumable(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    return run


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--lora-r", "32"], r"--resume continues the same run, and --lora-r 16 -> 32 would make it another one"),
        (
            ["--model-name-or-path", "some-org/another-model", "--seed", "7"],
            (
                r"--model-name-or-path embedded -> some-org/another-model, --seed 42 -> 7 would make it another one.*"
                r"start a new run with them: python train\.py --output-dir <new folder> --model-name-or-path "
                r"some-org/another-model --seed 7"
            ),
        ),
    ],
)
def test_resume_refuses_what_would_make_another_run_and_records_nothing(resumable, flags, pattern):
    before = snapshot(resumable)
    result = run_cli("train.py", "--output-dir", str(resumable), "--resume", *flags, check=False)
    assert_user_error(result, pattern)
    assert snapshot(resumable) == before  # no `resumes:` entry, no lock left


def test_every_checkpoint_says_which_run_it_belongs_to(resumable):
    mark = resumable / "checkpoint-2" / "titletune.json"
    saved = json.loads(mark.read_text())
    assert saved["lora_r"] == 16 and saved["model_name_or_path"] == "embedded" and saved["max_samples"] == "8"
    mark.write_text(json.dumps({**saved, "lora_r": 8}))  # as if copied in from another run
    before = snapshot(resumable)
    result = run_cli("train.py", "--output-dir", str(resumable), "--resume", check=False)
    assert_user_error(result, r"checkpoint-2 was saved by another run: lora_r 8 \(this run: 16\)\. Resume the run")
    assert snapshot(resumable) == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, which fails every write with ENOSPC")
def test_a_full_disk_during_training_is_one_line_with_the_way_on(resumable):
    # train_log.jsonl, the file training appends to, on a device that is always full: a real ENOSPC from the kernel.
    (resumable / "train_log.jsonl").unlink()
    (resumable / "train_log.jsonl").symlink_to("/dev/full")
    result = run_cli("train.py", "--output-dir", str(resumable), "--resume", "--max-steps", "3", check=False)
    where = re.escape(str(resumable.resolve()))
    assert_user_error(
        result,
        rf"the disk is full: writing to {where} failed \([\d,.]+ [MG]B free there\)\. Free some space .*then "
        rf"continue the run with: python train\.py --output-dir {where} --resume\.",
    )
    assert (resumable / "checkpoint-2" / "trainer_state.json").is_file()  # still there to resume from
    assert not (resumable / ".lock").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, which fails every write with ENOSPC")
def test_a_full_disk_error_names_the_folder_and_its_free_space(tmp_path):
    from titletune.errors import UserError, full_disk_is_user_error

    then = lambda: "go on"
    full = r"the disk is full: writing to .* failed \([\d,.]+ [MG]B free there\)\. Free some space .* then go on\."
    with pytest.raises(UserError, match=full), full_disk_is_user_error(tmp_path, then), open("/dev/full", "w") as f:
        f.write("x")  # a real ENOSPC, raised when the file is flushed
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "f"))
    with (
        pytest.raises(UserError, match=r"the disk \(or your quota\) is full"),
        full_disk_is_user_error(tmp_path, then),
    ):
        raise quota
    with pytest.raises(OSError, match="Permission denied"), full_disk_is_user_error(tmp_path, then):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))  # any other error passes unchanged


# ----------------------------------------------------------------------------------------------- early refusals


def test_a_system_prompt_the_modelfile_cannot_hold_is_refused_before_any_work(tmp_path):
    prompts = tmp_path / "prompts"
    shutil.copytree(ROOT / "prompts" / "qa", prompts)
    system = prompts / "system.txt"
    system.write_text(system.read_text() + ' Say """hello""".\n')
    run = tmp_path / "run"
    started = time.monotonic()
    result = run_cli(
        "train.py", "--data", str(SAMPLE), "--prompts", str(prompts), "--output-dir", str(run), "--max-steps", "2",
        check=False,
    )  # fmt: skip
    assert_user_error(
        result, r'the system prompt \(system\.txt of the prompt set\) contains """, which ends the Ollama'
    )
    assert not run.exists()  # refused before the run folder, the data, the model and any checkpoint
    assert "trainable" not in result.stderr
    assert time.monotonic() - started < 60  # start-up only (once, it came after training, merge and GGUF)


@pytest.mark.parametrize("spec", [",", ""])
def test_a_gguf_list_without_a_type_is_refused(tmp_path, spec):
    result = run_cli("train.py", "--prepare-only", "--gguf", spec, "--output-dir", str(tmp_path / "run"), check=False)
    assert_user_error(result, rf"--gguf '{spec}' names no GGUF type; give types such as --gguf q8_0,q4_k_m")
    assert not (tmp_path / "run").exists()


def test_sigterm_during_data_preparation_exits_143_and_leaves_no_folder(tmp_path):
    # Enough rows that preparing them takes seconds, so the signal lands in the middle of it.
    rows = (
        json.dumps(
            {"uid": f"S{i}", "title": f"Garden Hose Reel Model {i}", "content": f"A hose reel, model {i}. " * 4}
        )
        for i in range(200_000)
    )
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--prepare-only", "--data", str(data), "--output-dir", str(run)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 300
    while not (run / "run_config.yaml").exists():  # written just before the data stage starts
        assert proc.poll() is None, f"train.py exited {proc.returncode} before its data stage: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "train.py did not reach its data stage within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1] == "terminated (SIGTERM)"
    assert not run.exists()
