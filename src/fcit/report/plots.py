"""PNG heatmaps drawn headlessly.

The figures are built on ``matplotlib.figure.Figure`` with an Agg canvas instead of pyplot: no GUI backend is
ever selected, no global pyplot state is touched (a notebook's backend stays as it is), and no figure is left open.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fcit.eval.metrics import AccuracyMatrix

__all__ = ["heatmap", "matrix_heatmap", "Series", "line_panels", "matrix_grid"]

# Beyond this many cells the numbers no longer fit legibly (e.g. a 50-client similarity matrix).
_MAX_ANNOTATED_CELLS = 400


def heatmap(
    values: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: Path,
    title: str,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    fmt: str = ".2f",
    cmap: str = "viridis",
    annotate: Optional[bool] = None,
    colorbar_label: Optional[str] = None,
    xlabel: Optional[str] = None,
    ylabel: Optional[str] = None,
) -> Path:
    """Write a rows x cols heatmap; NaN (or masked) cells are left blank. Returns ``path``.

    ``annotate=None`` writes the values into the cells only when the matrix is small enough to read them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.ma.filled(np.ma.asarray(values, dtype=float), np.nan)
    if data.ndim != 2:
        raise ValueError(f"heatmap expects a 2-D array, got shape {data.shape}")
    n_rows, n_cols = data.shape
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise ValueError(
            f"heatmap labels ({len(row_labels)} rows, {len(col_labels)} cols) do not match shape {data.shape}"
        )
    masked = np.ma.masked_invalid(data)
    finite = data[np.isfinite(data)]
    if vmin is not None:
        lo = float(vmin)
    else:
        lo = float(finite.min()) if finite.size else 0.0
    if vmax is not None:
        hi = float(vmax)
    else:
        hi = float(finite.max()) if finite.size else lo + 1.0
    if hi <= lo:  # a constant matrix would give a zero-width colour scale
        hi = lo + 1.0
    if annotate is None:
        annotate = n_rows * n_cols <= _MAX_ANNOTATED_CELLS

    # Size grows with the matrix so labels and numbers stay readable, within sane bounds.
    width = min(max(4.0, 0.75 * n_cols + 3.0), 24.0)
    height = min(max(3.0, 0.5 * n_rows + 2.2), 24.0)
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    colormap = _colormap(cmap)
    image = ax.imshow(masked, cmap=colormap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax)
    if colorbar_label:
        bar.set_label(colorbar_label)

    ax.set_xticks(np.arange(n_cols))
    ax.set_yticks(np.arange(n_rows))
    ax.set_xticklabels([str(c) for c in col_labels], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels([str(r) for r in row_labels])
    # Thin white grid between cells so blank (unseen) cells read as gaps, not as a colour.
    ax.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)

    if annotate:
        norm = image.norm
        for i in range(n_rows):
            for j in range(n_cols):
                v = data[i, j]
                if not np.isfinite(v):
                    continue
                r, g, b, _ = colormap(float(norm(v)))
                # Dark text on light cells and vice versa (ITU-R BT.601 luma).
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, format(v, fmt), ha="center", va="center", color=colour, fontsize=8)

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _colormap(name: str):
    import matplotlib

    # Unseen / undefined cells stay blank.
    return matplotlib.colormaps[name].with_extremes(bad="white")


def matrix_heatmap(m: AccuracyMatrix, path: Path, title: str, row_labels: Optional[list[str]] = None) -> Path:
    """Stages x datasets picture of an accuracy matrix, colour scale 0..100 (stretched if CIDEr exceeds 100);
    ``row_labels`` replaces "Stage t"."""
    values = np.full((len(m.rows), len(m.datasets)), np.nan)
    for t, row in enumerate(m.rows):
        for j, name in enumerate(m.datasets):
            if name in row:
                values[t, j] = row[name]
    finite = values[np.isfinite(values)]
    top = max(100.0, float(finite.max())) if finite.size else 100.0
    return heatmap(
        values,
        row_labels=row_labels or [f"Stage {t}" for t in range(1, len(m.rows) + 1)],
        col_labels=m.datasets,
        path=path,
        title=title,
        vmin=0.0,
        vmax=top,
        fmt=".1f",
        colorbar_label="score",
        ylabel="" if row_labels else "after stage",
    )


@dataclass
class Series:
    """One line of a panel: ``y`` at ``x`` (with an error bar ``yerr`` where given); ``level`` draws the one value
    of ``y`` as a dashed horizontal line over the panel (a reference point with no x axis of its own)."""

    label: str
    x: list[float]
    y: list[float]
    yerr: Optional[list[float]] = None
    level: bool = False


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return -(-n // ncols), ncols


def line_panels(panels: Sequence[tuple[str, Sequence[Series]]], path: Path, title: str, xlabel: str, ylabel: str,
                log_x: bool = False, ncols: int = 2) -> Path:
    """Small multiples: one axes per (panel title, its series), one legend for all. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = _grid(max(1, len(panels)), ncols)
    labels = list(dict.fromkeys(s.label for _, series in panels for s in series))
    # three entries fit across a 5-inch panel: a longer legend wraps onto rows the figure reserves above the panels
    legend_cols = max(1, min(len(labels), 3 * cols))
    top = 0.22 * -(-len(labels) // legend_cols) + 0.05
    height = 3.6 * rows + 0.4 + top
    fig = Figure(figsize=(5.0 * cols, height), dpi=110)
    FigureCanvasAgg(fig)
    colours: dict[str, Any] = {}
    handles: dict[str, Any] = {}
    for i, (name, series) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for s in series:
            c = colours.setdefault(s.label, f"C{len(colours) % 10}")
            if s.level:
                h = ax.axhline(s.y[0], color=c, linestyle="--", linewidth=1.2)
            else:
                h = ax.errorbar(s.x, s.y, yerr=s.yerr, color=c, marker="o", capsize=3, linewidth=1.4)
            handles.setdefault(s.label, h)
        xs = sorted({x for s in series for x in s.x})
        if log_x:
            ax.set_xscale("log")
        if xs:  # the measured points are the ticks (betas, stages), not matplotlib's guesses between them
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=legend_cols,
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(title, y=0.005, va="bottom", fontsize=10)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1 - top / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def matrix_grid(matrices: Sequence[tuple[str, AccuracyMatrix]], path: Path, ncols: int = 4) -> Path:
    """Several accuracy matrices (stages x datasets, 0..100 as in ``matrix_heatmap``) in one figure, one colour scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = _grid(max(1, len(matrices)), ncols)
    # constrained layout keeps the rotated dataset names of one row off the titles of the next
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    cmap = _colormap("viridis")
    image = None
    for i, (name, m) in enumerate(matrices):
        values = np.full((len(m.rows), len(m.datasets)), np.nan)
        for t, row in enumerate(m.rows):
            for j, d in enumerate(m.datasets):
                if d in row:
                    values[t, j] = min(row[d], 100.0)  # one colour scale for all: CIDEr above 100 shows as 100
        ax = fig.add_subplot(rows, cols, i + 1)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto",
                          interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(np.arange(len(m.datasets)))
        ax.set_xticklabels(m.datasets, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(np.arange(len(m.rows)))
        ax.set_yticklabels([str(t) for t in range(1, len(m.rows) + 1)], fontsize=6)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="score")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
