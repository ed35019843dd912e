"""Run folders: one per training run, holding everything infer.py and export need."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from titletune.config import ROOT
from titletune.errors import UserError

OUTPUTS = ROOT / "outputs"
CONFIG = "run_config.yaml"


def resolve_dir(output_dir: str | None) -> Path:
    """'auto' (or nothing) -> outputs/<timestamp>; anything else as given.

    Under several processes (accelerate launch, torchrun) every rank gets rank 0's timestamp: their clocks are read
    seconds apart, and each rank computing its own would split one run across several folders.
    """
    if not output_dir or output_dir == "auto":
        return OUTPUTS / _from_rank_zero(dt.datetime.now().strftime("run-%Y%m%d-%H%M%S"))
    return Path(output_dir).expanduser().resolve()


def _from_rank_zero(value: str) -> str:
    """Rank 0's value on every rank of an initialised process group (TrainingArguments starts it); else `value`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return value
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UserError(
            "--output_dir auto under several processes needs the process group started first; "
            "pass --output_dir outputs/<name> so every process writes to the same folder."
        )
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def create(run_dir: Path, overwrite: bool, resume: bool) -> Path:
    """Make the run folder. An existing non-empty folder is refused unless --overwrite or --resume says otherwise."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output_dir {run_dir} is a file; give a folder.")
    busy = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not busy:
            raise UserError(f"--resume: {run_dir} holds no run to resume. Run without --resume to start it.")
        return run_dir
    if busy:
        if not overwrite:
            raise UserError(
                f"--output_dir {run_dir} already exists and is not empty. Pass --overwrite to replace it, "
                "--resume to continue it, or choose another --output_dir."
            )
        if not (run_dir / CONFIG).is_file():
            # Refuse to delete a folder we did not make: a typo must not wipe someone's files.
            raise UserError(f"--overwrite: {run_dir} is not a titletune run (no {CONFIG}); remove it yourself.")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def as_dict(obj) -> dict:
    if hasattr(obj, "to_dict"):  # TrainingArguments: turns enums into plain values
        return obj.to_dict()
    return dataclasses.asdict(obj)


def save_config(run_dir: Path, **sections) -> Path:
    """run_config.yaml: every resolved argument, so that the run folder alone reproduces and serves the run."""
    text = yaml.safe_dump(_plain(sections), sort_keys=False, allow_unicode=True)
    return write_text_atomic(run_dir / CONFIG, text)


def load_config(run_dir: str | Path) -> dict:
    """run_config.yaml of a run folder, as a dict; every problem is a UserError with the fix."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass a run in outputs/, or train: python train.py")
    if not path.is_file():
        raise UserError(f"{run_dir} has no {CONFIG}, so it is not a finished run; pass --run outputs/<run>.")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or not config.get("base_model"):
        raise UserError(f"{path} must be a YAML mapping with base_model; did another version of train.py write it?")
    return config


def write_text_atomic(path: Path, text: str) -> Path:
    """Write to a temp file beside `path`, then rename: a crash never leaves a half-written file under its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(value):
    """Make a value YAML-safe: enums, paths and other objects become strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
