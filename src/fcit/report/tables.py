"""Markdown tables: one run's accuracy matrix, and a paper-style comparison of methods over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

from fcit.eval.metrics import AccuracyMatrix, mean_std

__all__ = ["matrix_markdown", "results_markdown", "seed_cell", "format_cell"]

# Headers for the summary keys produced by fcit.eval.metrics.summary; any other column key is shown as given.
_HEADERS = {
    "last": "Last",
    "avg": "Avg",
    "forgetting": "Forgetting",
    "last_groups": "Last (groups)",
    "avg_groups": "Avg (groups)",
}

Cell = Union[None, float, int, Sequence]


def _escape(text: str) -> str:
    # A '|' in a dataset or method name would split the Markdown cell.
    return str(text).replace("|", "\\|")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_cell(value: Cell, digits: int = 1) -> str:
    """``56.2`` for a number, ``56.2 ± 1.3`` for ``(mean, std)``, ``-`` for a missing value.

    ``(mean, None)`` prints the mean alone. Lists are treated like tuples because JSON turns tuples into lists.
    """
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        mu, sd = value
        if mu is None:
            return "-"
        if sd is None:
            return f"{mu:.{digits}f}"
        return f"{mu:.{digits}f} ± {sd:.{digits}f}"
    raise TypeError(f"cannot format table cell {value!r}: expected a number, (mean, std) or None")


def seed_cell(values: Sequence[float]) -> Union[float, tuple[float, float]]:
    """The table cell for per-seed results: the value itself for one seed (no ± shown), else ``(mean, std)``."""
    mu, sd = mean_std(list(values))
    return mu if len(values) == 1 else (mu, sd)


def matrix_markdown(
    m: AccuracyMatrix, summary: Optional[dict], title: Optional[str] = None, digits: int = 1,
    row_labels: Optional[list[str]] = None,
) -> str:
    """Stage x dataset table (blank where a dataset was not yet seen) followed by the summary lines.

    ``row_labels`` replaces "After stage t" (e.g. the one row of a method that is not continual)."""
    lines: list[str] = []
    if title:
        lines += [f"### {title}", ""]
    lines.append(_row(["Stage"] + [_escape(d) for d in m.datasets]))
    lines.append(_row(["---"] + ["---:"] * len(m.datasets)))
    for t, row in enumerate(m.rows, start=1):
        cells = [f"{row[d]:.{digits}f}" if d in row else "" for d in m.datasets]
        lines.append(_row([row_labels[t - 1] if row_labels else f"After stage {t}"] + cells))
    if summary:
        lines.append("")
        for key in ("last", "avg", "forgetting", "last_groups", "avg_groups"):
            if key not in summary:
                continue
            value = summary[key]
            # Forgetting is undefined with a single stage or when every dataset is retrained at the end; Avg and
            # forgetting are not applicable to a method that is not continual.
            text = "n/a" if value is None else f"{value:.{digits}f}"
            lines.append(f"- **{_HEADERS[key]}**: {text}")
    return "\n".join(lines) + "\n"


def results_markdown(rows: list[dict[str, Any]], columns: list[str], digits: int = 1) -> str:
    """One line per method: ``{"method": name, col: number | (mean, std) | None, ...}`` for each key in ``columns``."""
    lines = [
        _row(["Method"] + [_escape(_HEADERS.get(c, c)) for c in columns]),
        _row(["---"] + ["---:"] * len(columns)),
    ]
    for r in rows:
        cells = [format_cell(r.get(c), digits) for c in columns]
        lines.append(_row([_escape(r.get("method", ""))] + cells))
    return "\n".join(lines) + "\n"
