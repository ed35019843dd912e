"""The lock of a run folder: one command at a time writes to a run (train, resume, --export-only, infer.py evaluate).

The lock is a file in the run folder, <run>/.lock, holding who writes there: pid, host, start time and command. It
is there for as long as that command runs. Another command that finds it is refused, with the holder named. A lock
whose process is gone (kill -9, a crash, a reboot) is stale: the next command says so in a warning and takes it over.
A holder on another host cannot be checked from here, so it is refused, with the file to remove if it is gone.

flock only orders the reading and writing of the file between processes; the file's content is the lock, so a lock
survives being moved with its folder (runs.create, --overwrite) and is readable by anyone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from titletune.errors import FULL, UserError

log = logging.getLogger(__name__)

NAME = ".lock"


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat): a pid reused by another process, after
    a reboot or a container restart, has another one. None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name before ")" may hold spaces


def _alive(holder: dict) -> bool:
    """Whether the process named by a lock on this host still runs (and is the same process, where it says when it
    started)."""
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process: alive
        return True
    started = holder.get("pid_start")
    return started is None or _start_time(pid) in (None, str(started))


def describe(holder: dict) -> str:
    command = holder.get("command") or "a titletune command"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} ({command})"


@contextlib.contextmanager
def _locked_file(path: Path, create: bool = True) -> Iterator[int | None]:
    """The lock file open and flock'ed: the same file as at `path` now (one replaced meanwhile is opened again).
    None when there is none and `create` is false."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield fd
                return
        finally:
            os.close(fd)  # closing releases the flock


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16)
    try:
        holder = json.loads(text)
    except ValueError:
        return None  # empty: its maker is between creating and writing it, and waits for our flock
    return holder if isinstance(holder, dict) else None


def acquire(folder: str | Path, command: str | None = None) -> Path:
    """Take the lock of `folder` (which must exist) for this process; a UserError naming the holder when another
    live process has it. Returns the lock file."""
    path = Path(folder) / NAME
    try:
        return _take(path, host=socket.gethostname(), command=command)
    except OSError as e:
        if e.errno in FULL:
            raise  # the caller says the disk is full, and where (errors.full_disk_is_user_error)
        raise UserError(
            f"cannot write the lock file {path}: {e.strerror or e}. The run folder must be writable."
        ) from e


def _take(path: Path, host: str, command: str | None) -> Path:
    folder = path.parent
    with _locked_file(path) as fd:
        holder = _read(fd)
        if holder and not (holder.get("pid") == os.getpid() and holder.get("host") == host):
            if holder.get("host") != host:
                raise UserError(
                    f"{folder} is in use by {describe(holder)}: another host. Wait for it to end, or use another run "
                    f"folder. If that process is gone, remove {path}."
                )
            if _alive(holder):
                raise UserError(
                    f"{folder} is in use by {describe(holder)}. Wait for it to end, or use another run folder (two "
                    "commands writing to one run folder would mix their files)."
                )
            log.warning("%s: taking over the stale lock of %s, which no longer runs", folder, describe(holder))
        mine = {
            "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()),
            "host": host,
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command or shlex.join(["python", *sys.argv]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(fd)
    return path


def release(path: str | Path) -> None:
    """Remove the lock file if this process still holds it (a folder removed or moved back holds none)."""
    path = Path(path)
    with contextlib.suppress(OSError), _locked_file(path, create=False) as fd:  # one left behind is taken over later
        holder = (_read(fd) if fd is not None else None) or {}
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            path.unlink()


@contextlib.contextmanager
def held(folder: str | Path, command: str | None = None) -> Iterator[Path]:
    """The lock of `folder` for the duration of the block."""
    path = acquire(folder, command)
    try:
        yield path
    finally:
        release(path)
