"""The parallel reader's processes (selection.select_parallel, --data-workers): a plain JSON-lines file cut into byte
ranges at line ends, a worker function run over them in a pool, and the workers' results added up as they finish.

A chunk is bytes from the start of a line to the start of another (or the end of the file), so that every line falls
in exactly one chunk, whole. What a worker does with its lines is selection.py's: here a worker is a function of one
task dict that returns {"counts": Counter, "items": [(rank, order, ...)], ...}, the rest kept per chunk.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from titletune.errors import UserError
from titletune.reading import PROGRESS_MIN_BYTES


def ranges(path: Path, size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges that cover the file, each starting at the beginning of a line."""
    starts = [0]
    with open(path, "rb") as f:
        for cut in range(chunk_bytes, size, chunk_bytes):
            if cut <= starts[-1]:
                continue  # the previous line was longer than a chunk
            f.seek(cut - 1)
            skipped = 0
            while block := f.read(1 << 16):
                newline = block.find(b"\n")
                if newline >= 0:
                    skipped += newline + 1
                    break
                skipped += len(block)
            start = cut - 1 + skipped
            if start < size:
                starts.append(start)
    return list(zip(starts, [*starts[1:], size], strict=True))


def read(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _count_lines(task: tuple[str, int, int]) -> int:
    """Lines in one chunk, so that every worker knows the file line number of its first line (ids without uid)."""
    data = read(*task)
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def smallest(items: list[tuple], n: int) -> tuple[list[tuple], int]:
    """The n items (rank, order, ...) with the smallest distinct ranks, each rank's earliest occurrence, and the rank
    that every later chunk must be under to matter (2**64 while fewer than n are known)."""
    items.sort(key=lambda item: (item[0], item[1]))
    kept, last = [], None
    for item in items:
        if item[0] != last:
            kept.append(item)
            last = item[0]
            if len(kept) == n:
                break
    return kept, (kept[-1][0] if len(kept) == n else 1 << 64)


class Results:
    """The chunks' results as the workers finish them: `counts` added up, each chunk's result in its place, and the
    sample's candidates, cut to the max_samples smallest ranks whenever they pass twice that; `bound` is then the
    rank that a chunk not yet begun must be under to matter."""

    def __init__(self, n: int, counts: Counter, max_samples: int | None, bar):
        self.results: list[dict | None] = [None] * n
        self.candidates: list[tuple] = []
        self.bound = 1 << 64
        self.counts, self.max_samples, self.bar = counts, max_samples, bar

    def add(self, index: int, result: dict, size: int) -> None:
        self.counts.update(result.pop("counts"))
        self.candidates.extend(result.pop("items"))
        if self.max_samples is not None and len(self.candidates) > 2 * self.max_samples:
            self.candidates, self.bound = smallest(self.candidates, self.max_samples)
        self.results[index] = result
        if self.bar is not None:
            self.bar.update(size)


def run(
    worker: Callable[[dict], dict],
    path: Path,
    spans: list[tuple[int, int]],
    settings: dict,
    tmp: list[Path],
    counts: Counter,
    workers: int,
) -> Results:
    """`worker` over every chunk of `spans` in `workers` processes, each task `settings` with its chunk's index,
    start, end, first line number, chunk file (`tmp`) and bound. On any failure (a worker died, Ctrl-C) the pool
    stops, the chunks not begun never run, and the chunk files go."""
    from concurrent.futures.process import BrokenProcessPool

    import numpy as np

    pool = _pool(workers)  # before the progress bar's thread
    finished = False
    bar = None
    size = spans[-1][1]  # the file's
    if size >= PROGRESS_MIN_BYTES:
        from tqdm import tqdm

        bar = tqdm(
            total=size, unit="B", unit_scale=True, desc=f"reading {path.name} ({workers} workers)", disable=None
        )
    try:
        line_counts = list(pool.map(_count_lines, [(str(path), start, end) for start, end in spans]))
        firsts = np.concatenate([[1], 1 + np.cumsum(line_counts)[:-1]]).tolist()
        tasks = [
            {**settings, "index": i, "start": start, "end": end, "first": firsts[i], "tmp": str(tmp[i])}
            for i, (start, end) in enumerate(spans)
        ]
        results = Results(len(spans), counts, settings["max_samples"], bar)
        _submit(pool, worker, tasks, results, workers)
        finished = True
    except BrokenProcessPool:
        raise UserError(
            "a data-prep worker process died (out of memory?); run again with --data-workers 1 (one process)."
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=not finished)  # Ctrl-C or an error: the chunks not begun never run
        if bar is not None:
            bar.close()
        if not finished:
            for file in tmp:
                file.unlink(missing_ok=True)
    return results


def _submit(pool, worker: Callable[[dict], dict], tasks: list[dict], results: Results, workers: int) -> None:
    """The tasks a few ahead of the workers, no more: each later chunk gets the tightest bound known when it is
    submitted."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pending: dict = {}
    following = 0
    while following < len(tasks) or pending:
        while following < len(tasks) and len(pending) < 2 * workers:
            pending[pool.submit(worker, {**tasks[following], "bound": results.bound})] = following
            following += 1
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            index = pending.pop(future)
            results.add(index, future.result(), tasks[index]["end"] - tasks[index]["start"])


def _pool(workers: int):
    """The worker processes. fork on Linux, as torch's DataLoader does: a worker runs only titletune's data code,
    never torch, and needs no `if __name__ == "__main__"` guard in the caller's script."""
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if sys.platform == "linux" else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_worker_signals)


def _worker_signals() -> None:
    """Worker initializer: Ctrl-C is the main process's to handle (it stops the pool and cleans up), and SIGTERM
    ends a worker at once, as it did before the fork copied the main process's handler (errors.cli)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
