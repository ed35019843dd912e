"""Writing files so that a crash, a kill or a full disk never leaves half a file under its final name.

Every writer in titletune goes through these three: `write_atomic` for text and bytes, `atomic_path` for a tool
that writes a file itself (savefig, llama.cpp's converter and quantizer), `staged_dir` for a whole folder (merged/).

A rename alone is not enough after a power cut or a kernel crash: the file system may have recorded the rename before
the data, leaving an empty or short file under the final name. So the data is flushed to disk (fsync) before the
rename, and the folder after it, so the rename itself is on disk. The cost is the writeback that would happen anyway.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

STALE = ".tmp-*"  # what a killed writer leaves behind: the glob for cleaning up after it


def sync(path: str | Path) -> None:
    """fsync a file, or every file under a folder, then the folder: their data is on disk."""
    path = Path(path)
    if path.is_dir():
        for folder, _, names in os.walk(path):
            for name in names:
                _fsync(Path(folder) / name)
    _fsync(path)


def sync_dir(folder: str | Path) -> None:
    """fsync a folder, so that a rename or a new name in it is on disk."""
    _fsync(Path(folder))


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a dangling link, or a file not ours to read: nothing of ours to flush
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a folder (EINVAL); a full disk must still surface
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """A hidden name beside `path` (os.replace must not cross file systems) that keeps its suffix, which tools such as
    savefig and llama.cpp read, and the process id, so two processes never write one temp file."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write `path` through: renamed to `path` when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        sync(tmp)
        os.replace(tmp, path)
        sync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` through a temp file and a rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return path


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """A temp folder beside `final` to write into; on success it replaces `final`, on any failure it is removed.
    So a folder such as merged/ is either complete or absent, never half-written under its final name."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process that was killed
    try:
        yield tmp
        sync(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        sync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256(path: Path) -> str:
    """The file's SHA-256, read in 1 MB chunks (a GGUF or a merged model can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
