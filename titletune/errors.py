"""One exception for every problem the user can fix; entry points print it as one line and exit 2 (`cli`), as they
do for Ctrl-C and SIGTERM. A full disk is such a problem too, wherever it happens (`full_disk_is_user_error`)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or machine. The message says what was wrong and what to do."""


def flag(name: str) -> str:
    """A setting's flag as messages spell it: --max-samples for max_samples (both spellings are accepted)."""
    return "--" + name.replace("_", "-")


class Problems:
    """Every problem with a command's flags, said at once: each check adds what it finds, and `done` raises one
    UserError naming them all (so a user fixes the command once, not once per flag)."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        self.found.append(problem)

    def at_least(self, flag: str, value: float | None, low: float, why: str = "") -> None:
        """`flag` (spelled as the user types it, with dashes) must be >= low when given."""
        if value is not None and value < low:
            self.add(f"{flag} must be >= {low}{f' ({why})' if why else ''}, got {value}")

    def extend(self, problems: list[str]) -> None:
        self.found += problems

    def done(self) -> None:
        if self.found:
            raise UserError("; ".join(self.found) + ".")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, a job scheduler), raised where Ctrl-C would be: a KeyboardInterrupt, so every
    clean-up that Ctrl-C gets (a new run folder removed, a lock released) happens for it too."""


def _terminate(signum, frame):
    raise Terminated


def cli(main):
    """Run `main` so that a UserError prints `error: <message>` and exits 2, Ctrl-C exits 130 and SIGTERM 143, each
    with one line and no traceback, and a reader that closes the pipe (`| head`) ends it quietly. (Training catches
    both signals itself, to save a checkpoint first.)"""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return main(*args, **kwargs)
        except UserError as e:
            _close_progress_bars()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Terminated:
            _close_progress_bars()
            print("terminated (SIGTERM)", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            _close_progress_bars()
            print("\ninterrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        except BrokenPipeError:
            _closed_pipe()

    return wrapper


def _closed_pipe() -> None:
    """The reader of stdout or stderr went away (`python infer.py --help | head`): exit as a shell pipeline's writer
    would (141, SIGPIPE), with nothing more written. Python flushes stdout at exit and would print a second error
    for the dead stream, so both streams point at /dev/null first."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            os.dup2(devnull, stream.fileno())
    sys.exit(128 + signal.SIGPIPE)


def _close_progress_bars() -> None:
    """A stage stopped by an error leaves its tqdm bar open, mid-line, and it would be redrawn at exit: close it now
    (which ends its line), so that the message is a line of its own, and the last one."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", None) or ()):
        with contextlib.suppress(Exception):
            bar.close()


# ------------------------------------------------------------------------------------------------------ full disk

FULL = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do not raise OSError report it: safetensors (Rust) keeps the OS message in its own exception,
# torch's checkpoint writer says only "file write failed" (then the free space decides, see disk_full).
FULL_MESSAGES = tuple(os.strerror(code) for code in FULL) + ("StorageFull", "QuotaExceeded")
ALMOST_NOTHING = 64 << 20  # bytes free under which "file write failed" is taken for a full disk


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on the file system of `folder` (or of its nearest existing parent); None when it cannot be read."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(error: BaseException, folder: str | Path, then: str) -> UserError | None:
    """The UserError for `error` when it means the disk (or the user's quota) is full while writing to `folder`;
    None for any other error. `then` says how to go on once there is space, e.g. the --resume command."""
    free = free_bytes(folder)
    text = str(error)
    full = (
        (isinstance(error, OSError) and error.errno in FULL)
        or any(message in text for message in FULL_MESSAGES)
        or ("file write failed" in text and free is not None and free < ALMOST_NOTHING)
    )
    if not full:
        return None
    left = "unknown" if free is None else f"{free / 1e6:,.0f} MB" if free < 1e9 else f"{free / 1e9:,.1f} GB"
    quota = " (or your quota)" if isinstance(error, OSError) and error.errno == errno.EDQUOT else ""
    return UserError(
        f"the disk{quota} is full: writing to {folder} failed ({left} free there). Free some space (old runs in "
        f"outputs/, the cache in $TITLETUNE_CACHE or ~/.cache/titletune), then {then}."
    )


@contextlib.contextmanager
def full_disk_is_user_error(folder: str | Path, then: Callable[[], str]):
    """Turn a full disk inside the block into a UserError naming `folder`, its free space and `then()` (read at the
    moment of the error, since what comes next depends on what was saved by then). Other errors pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        translated = disk_full(e, folder, then())
        if translated is None:
            raise
        raise translated from e
