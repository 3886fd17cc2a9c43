"""Plain-text tables, as the commands print them (`distill report`, `compare`, `pipeline`)."""
from __future__ import annotations

__all__ = ["format_rows"]


def format_rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A plain-text table: columns padded to their widest cell, a dashed rule under the header."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
