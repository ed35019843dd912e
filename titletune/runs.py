"""Run folders: one per training run, holding everything infer.py and export need."""

from __future__ import annotations

import contextlib
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
    if busy and overwrite:
        if not (run_dir / CONFIG).is_file():
            # Refuse to delete a folder we did not make: a typo must not wipe someone's files.
            raise UserError(f"--overwrite: {run_dir} is not a titletune run (no {CONFIG}); remove it yourself.")
        shutil.rmtree(run_dir)
    elif busy:
        raise UserError(
            f"--output_dir {run_dir} already exists and is not empty. Pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output_dir."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a regular file, no permission, read-only disk
        raise UserError(
            f"cannot create --output_dir {run_dir}: {e.strerror or e}. Choose another --output_dir."
        ) from e
    return run_dir


@contextlib.contextmanager
def removed_on_failure(run_dir: Path, enabled: bool = True):
    """Remove the run folder if the block fails before training saved anything (no checkpoint, no adapter): such a
    folder cannot be resumed or served, and would otherwise look like the newest run and block a rerun."""
    try:
        yield
    except BaseException:
        saved = (run_dir / "adapter").exists() or any(run_dir.glob("checkpoint-*"))
        if enabled and not saved:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def as_dict(obj) -> dict:
    if hasattr(obj, "to_dict"):  # TrainingArguments: turns enums into plain values
        return obj.to_dict()
    return dataclasses.asdict(obj)


def save_config(run_dir: Path, **sections) -> Path:
    """run_config.yaml: every resolved argument, so that the run folder alone reproduces and serves the run."""
    text = yaml.safe_dump(plain(sections), sort_keys=False, allow_unicode=True)
    return write_text_atomic(run_dir / CONFIG, text)


def load_config(run_dir: str | Path) -> dict:
    """run_config.yaml of a run folder, as a dict; every problem is a UserError with the fix."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass a run in outputs/, or train: python train.py")
    if not path.is_file():
        raise UserError(f"{run_dir} has no {CONFIG}, so it is not a finished run; pass --run outputs/<run>.")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not readable YAML ({type(e).__name__}); the run's config is damaged. Train the run again, "
            "or restore run_config.yaml from a copy."
        ) from e
    if not isinstance(config, dict) or not config.get("base_model"):
        raise UserError(f"{path} must be a YAML mapping with base_model; did another version of train.py write it?")
    return config


SECTIONS = ("script", "model", "data", "export", "training")  # the argument dataclasses, as save_config writes them
# Not carried into a resumed run: where it is (given again), which stages to run this time (a --prepare-only run is
# resumed to train), and every *_token field, which TrainingArguments.to_dict() writes masked ("<EOS_TOKEN>"), so
# run_config.yaml does not hold its value (they keep their defaults).
NOT_RESUMED = ("output_dir", "resume", "overwrite", "prepare_only", "export_only", "run")


def resume_settings(run_dir: str | Path) -> dict | None:
    """Every argument the run was started with, flat (flag name -> value), for --resume to start from; None when
    the folder holds no run_config.yaml (then --resume fails later, with its own message)."""
    if not (Path(run_dir) / CONFIG).is_file():
        return None
    config = load_config(run_dir)
    flat = {"backend": config.get("backend")}
    for section in SECTIONS:
        values = (config.get(section) or {}).items()
        flat.update({k: v for k, v in values if k not in NOT_RESUMED and not k.endswith("_token")})
    return flat


def record_resume(run_dir: Path, changed: dict) -> Path:
    """Append one entry to run_config.yaml's `resumes`: the flags this resume gave with a new value, [old, new].
    Nothing else in the file changes: a resumed run is the same run."""
    config = load_config(run_dir)
    config["resumes"] = [*(config.get("resumes") or []), {"changed": changed}]
    return write_text_atomic(run_dir / CONFIG, yaml.safe_dump(plain(config), sort_keys=False, allow_unicode=True))


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


@contextlib.contextmanager
def staged_dir(final: Path):
    """A temp folder beside `final` to write into; on success it replaces `final`, on any failure it is removed.
    So a folder such as merged/ is either complete or absent, never half-written under its final name."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process that was killed
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plain(value):
    """Make a value YAML-safe: enums, paths and other objects become strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
