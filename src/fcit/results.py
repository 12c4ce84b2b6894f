"""The typed results a run produces, from one round up to the whole run: what every engine returns, what the run
directory's ``metrics.json`` holds, what the reports and ``fcit compare`` read back.

``to_dict`` / ``from_dict`` are the JSON form (keys as in ``metrics.json``); nothing else in fcit builds or reads
these as loose dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from fcit.errors import FcitError
from fcit.eval.general import GeneralScore
from fcit.eval.metrics import AccuracyMatrix
from fcit.jsonio import read_json


@dataclass
class RoundLog:
    """One communication round as the server saw it; lists are per replying client, in round-position order."""

    stage: int
    round: int
    clients: list[int]
    tasks: list[int]
    samples: list[int]
    loss: float  # sample-weighted mean of the clients' mean training loss
    bytes_up: int  # trainable tensors uploaded by the replying clients
    bytes_down: int  # global state sent to every client asked to train
    seconds: float
    dropped: list[int] = field(default_factory=list)  # selected clients whose update is missing
    failures: list[dict] = field(default_factory=list)  # {"client", "what", "why"} per failed exchange

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RoundLog":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Summary:
    last: float
    avg: Optional[float]  # None: not applicable (a method that is not continual: zero-shot, MTL)
    forgetting: Optional[float]  # None: no dataset left the training set, or not applicable
    last_groups: Optional[float] = None  # Capability setting: the same over capability-group means
    avg_groups: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # avg and forgetting are always written (null when not applicable); the group means only where they exist.
        return {k: v for k, v in d.items() if v is not None or k in ("avg", "forgetting")
                or (k == "avg_groups" and d["last_groups"] is not None)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Summary":
        return cls(**{k: d.get(k) for k in ("last", "avg", "forgetting", "last_groups", "avg_groups")})


@dataclass
class Retention:
    """eval.retention: the general set (``fcit.eval.general``) scored on the base before stage 1 and on the final
    model after the last stage, the same samples both times."""

    before: GeneralScore
    after: GeneralScore

    @property
    def drop(self) -> float:
        return self.before.score - self.after.score

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before.score, "after": self.after.score, "drop": self.drop,
                "per_format": {f: {"before": v, "after": self.after.per_format[f]}
                               for f, v in self.before.per_format.items()},
                "n": self.before.n}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Retention":
        n = {k: int(v) for k, v in d["n"].items()}
        pf = d["per_format"]
        return cls(before=GeneralScore(float(d["before"]), {f: float(v["before"]) for f, v in pf.items()}, n),
                   after=GeneralScore(float(d["after"]), {f: float(v["after"]) for f, v in pf.items()}, n))


@dataclass
class RunResult:
    """Everything ``metrics.json`` records about one finished run."""

    method: str
    scenario: str
    seed: int
    matrix: AccuracyMatrix
    summary: Summary
    per_dataset: list[dict]  # per evaluation: dataset -> score, raw metrics and a few examples
    rounds: list[RoundLog]
    timing: dict[str, float]
    method_artifacts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. a dataset on which every prediction was empty
    # ``fcit.environment.summary`` of the run directory's environment.json; None in metrics of older fcit versions
    environment: Optional[dict[str, Any]] = None
    # eval.unseen: dataset -> score after the last stage on the datasets the setting never trains; None: not asked
    unseen: Optional[dict[str, float]] = None
    # eval.retention: the general set before stage 1 and after the last stage; None: not asked
    retention: Optional[Retention] = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "method": self.method,
            "scenario": self.scenario,
            "seed": self.seed,
            "matrix": self.matrix.to_dict(),
            "summary": self.summary.to_dict(),
            "per_dataset": self.per_dataset,
            "rounds": [r.to_dict() for r in self.rounds],
            "timing": self.timing,
            "method_artifacts": self.method_artifacts,
            "warnings": self.warnings,
        }
        if self.environment is not None:
            d["environment"] = self.environment
        if self.unseen is not None:
            d["unseen"] = self.unseen
        if self.retention is not None:
            d["retention"] = self.retention.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        return cls(
            method=d["method"], scenario=d["scenario"], seed=int(d["seed"]),
            matrix=AccuracyMatrix.from_dict(d["matrix"]), summary=Summary.from_dict(d["summary"]),
            per_dataset=d["per_dataset"], rounds=[RoundLog.from_dict(r) for r in d["rounds"]],
            timing=d["timing"], method_artifacts=d.get("method_artifacts", {}), warnings=d.get("warnings", []),
            environment=d.get("environment"), unseen=d.get("unseen"),
            retention=Retention.from_dict(d["retention"]) if d.get("retention") is not None else None,
        )

    @classmethod
    def load(cls, run_dir: Path) -> "RunResult":
        """The result of the finished run in ``run_dir`` (its ``metrics.json``)."""
        path = Path(run_dir) / "metrics.json"
        data = read_json(path, "a finished run's metrics")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FcitError(f"{path}: damaged metrics file ({type(exc).__name__}: {exc})") from None
