"""General-ability retention: the held-out split of the base's generic instruction mixture, scored per answer format.

This is fcit's analogue of the paper's MME and POPE: questions in the benchmark's answer formats that none of the
12 tasks asks (``fcit.data.synth.INSTRUCT``), drawn from their own seeds. A run scores the base on it before stage 1
and its final model after the last stage (``eval.retention``); the drop is what tuning cost the base.

Each format is scored with the project's scorers as the answer type ``registry.FORMATS`` names, under the run's
``eval.scoring``: word exact match, number and letter exact (lenient: parsed), yes/no "contains" (lenient: the first
word), box IoU > 0.5, caption CIDEr-D. The headline ``score`` is the mean over the accuracy formats present (word,
number, yes/no, letter, box), each format weighing the same whatever its count, as MME sums its subtasks. Caption
CIDEr is reported beside it and kept out of the mean: it is uncapped and on another scale (a templated caption
repeated exactly scores far above 100), so it would swamp the accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fcit.data import registry
from fcit.data.records import Sample
from fcit.errors import FcitError
from fcit.eval.scorers import Scoring, score

ACCURACY_FORMATS = tuple(f for f, t in registry.FORMATS.items() if t != registry.CAPTION)


@dataclass(frozen=True)
class GeneralScore:
    """One model on the general set: the headline (mean over accuracy formats), each format's score and count."""

    score: float
    per_format: dict[str, float]  # format -> 0..100 (caption: CIDEr-D x100, uncapped)
    n: dict[str, int]  # format -> samples scored

    def to_dict(self) -> dict:
        return {"score": self.score, "per_format": self.per_format, "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> "GeneralScore":
        return cls(score=float(d["score"]), per_format={k: float(v) for k, v in d["per_format"].items()},
                   n={k: int(v) for k, v in d["n"].items()})


def score_general(preds: Sequence[str], samples: Sequence[Sample], scoring: Scoring = "reference") -> GeneralScore:
    if len(preds) != len(samples):
        raise FcitError(f"score: {len(preds)} predictions for {len(samples)} general-set samples")
    by: dict[str, tuple[list[str], list[Sample]]] = {}
    for p, s in zip(preds, samples):
        ps, ss = by.setdefault(s.meta["format"], ([], []))
        ps.append(p)
        ss.append(s)
    per = {f: score(registry.FORMATS[f], *by[f], scoring)["score"] for f in registry.FORMATS if f in by}
    acc = [per[f] for f in ACCURACY_FORMATS if f in per]
    if not acc:
        raise FcitError("score: the general set holds no sample of an accuracy format (word, number, yes/no, "
                        "letter, box)")
    return GeneralScore(score=sum(acc) / len(acc), per_format=per, n={f: len(by[f][1]) for f in per})
