"""Small report helpers shared by the evaluation modes: aligned text tables, markdown, CSV, JSON.

A table is a list of rows (dicts) plus the column order; numbers are formatted per column with an
optional format spec (`{"loss": ".4f"}`); None prints as "-".
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path


def _cell(value, spec: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cells(rows: Sequence[dict], columns: Sequence[str], formats: dict | None) -> list[list[str]]:
    formats = formats or {}
    return [[_cell(row.get(c), formats.get(c)) for c in columns] for row in rows]


def text_table(
    rows: Sequence[dict], columns: Sequence[str], formats: dict | None = None, headers: dict | None = None
) -> str:
    """Fixed-width table for the terminal; text columns left-aligned, numbers right-aligned."""
    headers = headers or {}
    head = [headers.get(c, c) for c in columns]
    body = _cells(rows, columns, formats)
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown_table(
    rows: Sequence[dict], columns: Sequence[str], formats: dict | None = None, headers: dict | None = None
) -> str:
    headers = headers or {}
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]
    out = [
        "| " + " | ".join(headers.get(c, c) for c in columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in _cells(rows, columns, formats)]
    return "\n".join(out)


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """Raw values (full precision), one row per dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return path


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)
