"""A method's artifacts (``methods.base.Artifacts``: JSON data and figures as data) written into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fcit.jsonio import write_json
from fcit.methods.base import Artifacts
from fcit.report.plots import heatmap


def write_artifacts(artifacts: Artifacts, run_dir: Path) -> dict[str, Any]:
    """Write the files and draw the figures; returns the summary for metrics.json, with the files written."""
    written = []
    for rel, data in artifacts.files.items():
        path = Path(run_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data, indent=1, sort_keys=False)
        written.append(rel)
    for rel, h in artifacts.heatmaps.items():
        path = Path(run_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        heatmap(np.array(h.values), h.rows, h.cols, path, h.title, vmin=h.vmin, vmax=h.vmax,
                xlabel=h.xlabel or None, ylabel=h.ylabel or None)
        written.append(rel)
    if not written and not artifacts.summary:
        return {}
    return {**artifacts.summary, "files": written}
