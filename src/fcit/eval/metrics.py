"""Continual-learning summaries (Last / Avg / forgetting) over a stage-by-dataset accuracy matrix.

The reference repository never computes these numbers; the definitions are those of the reference notes,
section 7 and section 10:

* ``a[t][d]`` is the score (0..100; CIDEr x100 may exceed 100) on dataset ``d`` after stage ``t``; row ``t`` holds
  exactly the datasets seen by stage ``t`` (cumulative, in Het the union of the position tables).
* **Last** = mean over the final row.
* **Avg** = mean over stages of the row mean, so an early stage with one dataset weighs as much as the last stage.
* **Forgetting** = mean over datasets seen before the final stage and not trained in it of
  ``max_{t<T} a[t][d] - a[T][d]``. It is negative where a dataset improved.
* The Capability setting reports the same two numbers on capability-group means as well (``summary(..., groups=...)``).

Everything here is plain Python over JSON-friendly structures, so a run directory can store the matrix and
any later tool can recompute the summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from fcit.errors import FcitError

__all__ = [
    "AccuracyMatrix",
    "last",
    "avg",
    "forgetting",
    "stage_drops",
    "new_datasets",
    "group_means",
    "summary",
    "mean_std",
]


def _score(value: Any, where: str) -> float:
    # bool is an int subclass; a True score is always a bug upstream, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FcitError(f"{where}: score must be a number, got {value!r}")
    value = float(value)
    # A NaN from a failed evaluation would silently poison every mean it enters.
    if not math.isfinite(value):
        raise FcitError(f"{where}: score must be finite, got {value!r}")
    return value


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class AccuracyMatrix:
    """Scores after each stage; ``rows[t][d]`` exists only for datasets evaluated after stage ``t``."""

    datasets: list[str] = field(default_factory=list)  # column order = first-seen order
    rows: list[dict[str, float]] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.rows)

    def add_stage(self, scores: dict[str, float]) -> None:
        """Append the scores measured after the next stage; new datasets become new columns in the given order."""
        where = f"accuracy matrix, stage {len(self.rows) + 1}"
        if not isinstance(scores, dict) or not scores:
            raise FcitError(f"{where}: expected a non-empty mapping dataset -> score")
        row: dict[str, float] = {}
        for name, value in scores.items():
            if not isinstance(name, str) or not name:
                raise FcitError(f"{where}: dataset names must be non-empty strings, got {name!r}")
            row[name] = _score(value, f"{where}, dataset {name!r}")
        for name in row:
            if name not in self.datasets:
                self.datasets.append(name)
        self.rows.append(row)

    def to_dict(self) -> dict:
        return {"datasets": list(self.datasets), "rows": [dict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> "AccuracyMatrix":
        if not isinstance(d, dict) or not isinstance(d.get("rows"), list):
            raise FcitError("accuracy matrix: expected an object with a 'rows' list")
        m = cls()
        for row in d["rows"]:
            m.add_stage(row)
        # A stored column order is kept (it may be the configured stage order), but it must cover every scored dataset.
        stored = d.get("datasets")
        if stored is not None:
            if not isinstance(stored, list) or len(set(stored)) != len(stored):
                raise FcitError("accuracy matrix: 'datasets' must be a list of distinct names")
            missing = [n for n in m.datasets if n not in stored]
            if missing:
                raise FcitError(f"accuracy matrix: scored dataset {missing[0]!r} is missing from 'datasets'")
            m.datasets = list(stored)
        return m


def _require_rows(m: AccuracyMatrix) -> None:
    if not m.rows:
        raise FcitError("accuracy matrix has no stage yet")


def last(m: AccuracyMatrix) -> float:
    """Mean score over the datasets of the final row."""
    _require_rows(m)
    return _mean(list(m.rows[-1].values()))


def avg(m: AccuracyMatrix) -> float:
    """Mean over stages of the per-stage mean over the datasets seen so far."""
    _require_rows(m)
    return _mean([_mean(list(row.values())) for row in m.rows])


def forgetting(m: AccuracyMatrix, final_stage_datasets: list[str]) -> Optional[float]:
    """Mean drop from each old dataset's best earlier score to its final score; ``None`` when nothing is old.

    A dataset trained again in the final stage (Het recurrences, or a dataset spanning stages) is excluded: its
    final score measures relearning, not retention.
    """
    _require_rows(m)
    final = m.rows[-1]
    earlier = m.rows[:-1]
    trained_now = set(final_stage_datasets)
    drops: list[float] = []
    for name in m.datasets:
        if name in trained_now:
            continue
        history = [row[name] for row in earlier if name in row]
        if not history:
            continue
        if name not in final:
            # Rows are cumulative; a hole here means an evaluation was skipped and the number would be wrong.
            raise FcitError(f"accuracy matrix: dataset {name!r} was seen before but has no score after the final stage")
        drops.append(max(history) - final[name])
    return _mean(drops) if drops else None


def stage_drops(m: AccuracyMatrix) -> list[dict[str, float]]:
    """What each stage took from the datasets already seen: ``out[t][d] = a[t][d] - a[t+1][d]`` for every dataset
    scored after both stage ``t`` and stage ``t+1`` (so ``len(out) == num_stages - 1``; negative where it rose).

    Forgetting says how much a dataset lost by the end; this says which stage took it, so a benchmark's designer
    sees which tasks overwrite which (e.g. two tasks that answer in the same format).
    """
    _require_rows(m)
    return [{d: prev[d] - cur[d] for d in prev if d in cur} for prev, cur in zip(m.rows, m.rows[1:])]


def new_datasets(m: AccuracyMatrix) -> list[list[str]]:
    """Per stage, the datasets first scored after it (in the Task-related setting: the stage's own task)."""
    seen: set[str] = set()
    out = []
    for row in m.rows:
        out.append([d for d in m.datasets if d in row and d not in seen])
        seen.update(row)
    return out


def group_means(scores: dict[str, float], groups: dict[str, list[str]]) -> dict[str, float]:
    """Mean score of each capability group over its datasets present in ``scores``; groups with none are left out.

    Group order follows ``groups``. A scored dataset in no group is an error: it would silently vanish from the
    group-level numbers.
    """
    grouped = {name for members in groups.values() for name in members}
    for name in scores:
        if name not in grouped:
            raise FcitError(f"dataset {name!r} belongs to no capability group")
    out: dict[str, float] = {}
    for group, members in groups.items():
        present = [scores[n] for n in members if n in scores]
        if present:
            out[group] = _mean(present)
    return out


def summary(
    m: AccuracyMatrix, final_stage_datasets: list[str], groups: Optional[dict[str, list[str]]] = None
) -> dict:
    """``{"last", "avg", "forgetting"}`` plus ``"last_groups"``/``"avg_groups"`` when capability groups are given."""
    out: dict[str, Any] = {"last": last(m), "avg": avg(m), "forgetting": forgetting(m, final_stage_datasets)}
    if groups is not None:
        grouped = AccuracyMatrix()
        for row in m.rows:
            grouped.add_stage(group_means(row, groups))
        out["last_groups"] = last(grouped)
        out["avg_groups"] = avg(grouped)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over seeds; the std of a single seed is 0.0."""
    values = [_score(v, "mean_std") for v in values]
    if not values:
        raise FcitError("mean_std: no values")
    mu = _mean(values)
    if len(values) == 1:
        return mu, 0.0
    var = sum((v - mu) ** 2 for v in values) / (len(values) - 1)
    return mu, math.sqrt(var)
