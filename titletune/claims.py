"""Claiming a run folder for a command that writes a run: a new folder's name, the folder made and locked, and the
run that --overwrite replaces moved aside until the new one has saved something.

runs.py decides what a command may do with a folder (runs.check_target) and holds the claim for the block
(runs.claimed); this is the filesystem work under it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
from pathlib import Path

from titletune import lock
from titletune.errors import UserError

log = logging.getLogger(__name__)


def unused_name(parent: Path, name: str) -> str:
    """`name`, or name-2, name-3, ... when it is taken: a timestamp has one-second resolution."""
    taken, n = name, 1
    while (parent / taken).exists():
        n += 1
        taken = f"{name}-{n}"
    return taken


def from_rank_zero(value: str) -> str:
    """Rank 0's value on every rank of an initialised process group (TrainingArguments starts it); else `value`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return value
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UserError(
            "--output-dir auto under several processes needs the process group started first; "
            "pass --output-dir outputs/<name> so every process writes to the same folder."
        )
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def busy(run_dir: Path) -> bool:
    """Whether the folder holds anything but a lock."""
    return run_dir.is_dir() and any(p.name != lock.NAME for p in run_dir.iterdir())


@dataclasses.dataclass
class Claim:
    """A run folder this process writes to (`runs.claimed`): its lock, and the run that --overwrite moved aside, kept
    until the new run has saved a checkpoint or finished."""

    dir: Path
    lock: Path
    new: bool
    previous: Path | None = None

    def saved(self) -> bool:
        return (self.dir / "adapter").exists() or any(self.dir.glob("checkpoint-*"))

    def drop_previous(self) -> None:
        """The new run has something to resume from: the run it replaces goes."""
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            log.info("--overwrite: removed the previous run (%s)", self.previous.name)
            self.previous = None

    def restore_previous(self) -> None:
        """The new run failed before saving anything: the run it was to replace comes back, as it was."""
        if self.previous is None:
            return
        if self.dir.exists():  # the failed run could not be removed: the old one stays where it is, and is named
            log.warning("--overwrite: the new run failed; the previous run is in %s", self.previous)
            return
        os.rename(self.previous, self.dir)
        log.warning(
            "--overwrite: the new run failed before its first checkpoint; %s holds the previous run again", self.dir
        )
        self.previous = None


def make(run_dir: Path, resume: bool) -> Claim:
    """Make and lock the run folder, once runs.check_target has allowed it; a folder with a run in it (--overwrite)
    is moved aside to .<name>.old-<time> first, and put back if the new one cannot be made."""
    if resume:
        return Claim(run_dir, lock.acquire(run_dir), new=False)
    previous = None
    if busy(run_dir):  # --overwrite of a run: no other command may be writing to it either
        old_lock = lock.acquire(run_dir)
        previous = run_dir.with_name(f".{run_dir.name}.old-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}")
        os.rename(run_dir, previous)
        old_lock = previous / lock.NAME
    try:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a parent is a regular file, no permission, read-only disk
            raise UserError(
                f"cannot create --output-dir {run_dir}: {e.strerror or e}. Choose another --output-dir."
            ) from e
        claim = Claim(run_dir, lock.acquire(run_dir), new=True, previous=previous)
    except BaseException:
        if previous is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
            os.rename(previous, run_dir)
            lock.release(run_dir / lock.NAME)
        raise
    if previous is not None:
        lock.release(old_lock)  # the old run goes back (if it does) as it was, without our lock
        log.info("--overwrite: moved the previous run aside to %s until this one saves a checkpoint", previous.name)
    return claim
