"""The data stage's report on its own output: eda.md (counts, drop reasons, length percentiles) and lengths.png (the
histograms), both from the stats prepare.py computes; and the file size as its log line shows it (format_bytes)."""

from __future__ import annotations

from array import array
from pathlib import Path

from titletune import files
from titletune.selection import SPLITS


def format_bytes(n: float) -> str:
    """A byte count as B, KB, MB or GB."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def render(stats: dict) -> str:
    """The EDA report as markdown: counts, drop reasons, length percentiles, the histogram."""
    kept, source = stats["kept"], stats["input"]
    size = format_bytes(source["bytes"]) + (", gzip" if source["gzip"] else "")
    lines = [
        "# Data report",
        "",
        f"Input: `{source['path']}` ({size}), seed {stats['seed']}, max_samples {stats['args']['max_samples']}.",
        "",
        "## Counts",
        "",
        "| | rows | share of rows read |",
        "|---|---:|---:|",
    ]
    total = max(stats["rows_read"], 1)
    for name, n in [
        ("read", stats["rows_read"]),
        *((f"kept: {s}", kept[s]) for s in SPLITS),
        *([("kept: read only (--rag-read)", kept["rag_read"])] if kept.get("rag_read") else []),
        ("kept: total", kept["total"]),
        ("dropped", stats["dropped_total"]),
    ]:
        lines.append(f"| {name} | {n:,} | {100 * n / total:.1f}% |")
    lines += [
        "",
        (
            f"{stats['truncated']:,} kept descriptions were cut to {stats['args']['max_content_chars']:,} chars "
            "(at a sentence end where one was near)."
        ),
        "",
        "## Drop reasons",
        "",
        "| reason | rows |",
        "|---|---:|",
        *(f"| {reason.replace('_', ' ')} | {n:,} |" for reason, n in stats["dropped"].items()),
        "",
        (
            f"Notes: {stats['notes']['bad_utf8']:,} rows had invalid UTF-8 (repaired with U+FFFD and kept), "
            f"{stats['notes']['blank_lines']:,} blank lines were skipped, "
            f"{stats['notes'].get('chat_markers', 0):,} kept products had chat-control markers (e.g. <|im_end|>) "
            "made plain text."
        ),
        "",
        "## Lengths (characters, distinct valid products, cleaned, before cutting)",
        "",
        "| field | p25 | p50 | p75 | p95 | max | mean |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for field_name, p in stats["lengths"].items():
        cells = " | ".join(f"{p[k]:,}" for k in ("p25", "p50", "p75", "p95", "max", "mean"))
        lines.append(f"| {field_name} | {cells} |")
    lines += ["", "![title and content lengths](lengths.png)", ""]
    return "\n".join(lines)


def plot_lengths(title_lengths: array, content_lengths: array, target: Path) -> None:
    """Histograms of title and content lengths, log-x; Figure without pyplot, so no global backend is touched."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    panels = zip(fig.subplots(1, 2), (title_lengths, content_lengths), ("title", "content"), strict=True)
    for ax, values, name in panels:
        data = np.frombuffer(values, dtype=np.uint32) if values else np.zeros(0, dtype=np.uint32)
        if data.size:
            bins = np.logspace(0, np.log10(max(int(data.max()), 10)), 50)
            ax.hist(np.maximum(data, 1), bins=bins, color="#4472c4")
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} length (chars)")
        ax.set_ylabel("products")
        ax.set_title(f"{name}: n={data.size:,}, median={int(np.median(data)) if data.size else 0}")
    with files.atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
