"""One scorer per answer type, in two modes (``eval.scoring``); reference sections 7 and 10, with the reference's
metric bugs fixed (section 7 lists them).

Every scorer returns ``{"score": 0..100 headline, "correct": list[bool] | None, "n": int, ...extras}``.

``reference`` (the default) decides as the reference does, so numbers compare with the paper's: exact match for every
short answer (ImageNet-R, ArxivQA, IconQA, CLEVR-Math, OCR-VQA, super-CLEVR, AOKVQA, TabMWP), "contains" for FigureQA
and DVQA. A model has to answer in the asked format to score.

``lenient`` reads an answer out of a longer or differently written prediction, by answer type (what fcit used before
the reference mode; kept to tell "knows the answer" from "answers in the format"):

* choice: the option letter of "B", "B.", "(B)", "B) cube", "B. cube" is compared; an answer that is not a letter
  falls back to exact match.
* number: the first number of the prediction against the answer's, numerically ("3.0" == "3", "1" != "10",
  "1,000" == "1000", "3/4" == "0.75"); a non-numeric answer (TabMWP has some) falls back to exact match.
* yesno: the first word of the prediction against yes/no.
* exact and contains: as in the reference mode.

Both modes share:

* exact: case-insensitive equality after trimming white space and one final period (inner white space collapsed);
  the reference compares ``pred.upper() == gt.upper()`` after the generation's strip, section 10 adds the period.
* contains: the prediction contains the answer as a whole token sequence, case-insensitive. This is the intended
  direction; the reference tests answer-in-prediction backwards, so "" and "1" (for "10") counted as correct.
* grounding: the first four numbers of the prediction, every digit kept (the reference dropped y2's last digit), as
  [x1, y1, x2, y2] against ``meta["answer_bbox"]``; correct iff IoU > 0.5. Both boxes live in the same normalised
  frame, so the reference's rescaling by max(w, h) does not change the IoU and is skipped.
* caption: CIDEr-D (pycocoevalcap's ``Cider``: clipped n-gram tf-idf cosine with a Gaussian length penalty, sigma
  6, x10) over the scored corpus, plus BLEU-4 and ROUGE-L; all x100. METEOR and SPICE need Java and are skipped; the
  Java PTB tokenizer is replaced by lower-casing and dropping punctuation. The headline is CIDEr x100, uncapped,
  as in the captioning literature (FCIT-Synth v4's references are varied enough that it sits in the usual 0-150
  range; v3 capped it at 100 because near-identical references put it at 400-600). Note CIDEr's idf comes from the
  scored references themselves, so it needs a corpus: with a single image every idf is 0 and so is CIDEr.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal, Optional

import numpy as np

from fcit.data import registry
from fcit.data.records import Sample
from fcit.errors import FcitError

_WS = re.compile(r"\s+")
_NUM = re.compile(r"[-+]?(?:\d+(?:,\d{3})+(?:\.\d+)?|\d+\.?\d*|\.\d+)")
_FRACTION = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")
_BOX_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_LETTER_ONLY = re.compile(r"^\(?([A-Za-z])\)?[.:]?$")
_LETTER_LEAD = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])[.:)])(?:\s|$)")
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    text = _WS.sub(" ", text).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.casefold()


def exact(pred: str, answer: str) -> bool:
    return normalize(pred) == normalize(answer)


def choice_letter(text: str) -> Optional[str]:
    text = text.strip()
    m = _LETTER_ONLY.match(text) or _LETTER_LEAD.match(text)
    if m is None:
        return None
    return next(g for g in m.groups() if g).upper()


def choice(pred: str, answer: str) -> bool:
    want = choice_letter(answer)
    if want is None:
        return exact(pred, answer)
    return choice_letter(pred) == want


def parse_number(text: str) -> Optional[float]:
    frac = _FRACTION.search(text)
    m = _NUM.search(text)
    if m is None:
        return None
    if frac is not None and frac.start() == m.start() and int(frac.group(2)) != 0:
        return float(Fraction(int(frac.group(1)), int(frac.group(2))))
    return float(m.group().replace(",", ""))


def number(pred: str, answer: str) -> bool:
    want = parse_number(answer)
    if want is None:
        return exact(pred, answer)
    got = parse_number(pred)
    return got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))


def yesno(pred: str, answer: str) -> bool:
    want = normalize(answer)
    if want not in ("yes", "no"):
        return exact(pred, answer)
    words = _PUNCT.sub(" ", pred).split()
    return bool(words) and words[0].casefold() == want


def contains(pred: str, answer: str) -> bool:
    want = normalize(answer)
    if not pred.strip() or not want:
        return False
    return re.search(rf"(?<!\w){re.escape(want)}(?!\w)", _WS.sub(" ", pred).casefold()) is not None


def parse_box(text: str) -> Optional[tuple[float, float, float, float]]:
    nums = _BOX_NUM.findall(text)
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = (float(v) for v in nums[:4])
    return x1, y1, x2, y2


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return 0.0
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def tokenize_caption(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.casefold()).split())


Scoring = Literal["reference", "lenient"]
SCORINGS: tuple[str, ...] = ("reference", "lenient")

# answer type -> match(pred, answer), per scoring mode
_MATCHERS = {
    "reference": {
        registry.EXACT: exact,
        registry.CHOICE: exact,
        registry.NUMBER: exact,
        registry.YESNO: contains,
        registry.CONTAINS: contains,
    },
    "lenient": {
        registry.EXACT: exact,
        registry.CHOICE: choice,
        registry.NUMBER: number,
        registry.YESNO: yesno,
        registry.CONTAINS: contains,
    },
}


def _accuracy(correct: list[bool]) -> dict:
    return {"score": 100.0 * float(np.mean(correct)), "correct": correct, "n": len(correct)}


def _grounding(preds: Sequence[str], samples: Sequence[Sample]) -> dict:
    ious = []
    for p, s in zip(preds, samples):
        if "answer_bbox" not in s.meta:
            raise FcitError(f"score: grounding sample {s.dataset}/{s.id} has no answer_bbox")
        box = parse_box(p)
        ious.append(0.0 if box is None else iou(box, s.meta["answer_bbox"]))
    out = _accuracy([v > 0.5 for v in ious])
    out["iou_mean"] = 100.0 * float(np.mean(ious))
    return out


def _caption(preds: Sequence[str], samples: Sequence[Sample]) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [tokenize_caption(r) for r in (s.refs or (s.answer,))] for i, s in enumerate(samples)}
    res = {i: [tokenize_caption(p)] for i, p in enumerate(preds)}
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    return {
        "score": 100.0 * float(cider),
        "correct": None,
        "n": len(samples),
        "cider": 100.0 * float(cider),
        "bleu4": 100.0 * float(bleu[3]),
        "rougeL": 100.0 * float(rouge),
        "cider_per_sample": [100.0 * float(v) for v in per_image],
    }


def score(answer_type: str, preds: Sequence[str], samples: Sequence[Sample], scoring: Scoring = "reference") -> dict:
    if scoring not in _MATCHERS:
        raise FcitError(f"score: unknown scoring {scoring!r}; known: {', '.join(SCORINGS)}")
    if len(preds) != len(samples):
        raise FcitError(f"score: {len(preds)} predictions for {len(samples)} samples")
    if not samples:
        raise FcitError("score: nothing to score (0 samples)")
    preds = [p if isinstance(p, str) else "" for p in preds]
    if answer_type == registry.GROUNDING:
        return _grounding(preds, samples)
    if answer_type == registry.CAPTION:
        return _caption(preds, samples)
    matchers = _MATCHERS[scoring]
    if answer_type not in matchers:
        raise FcitError(f"score: unknown answer type {answer_type!r}; known: {', '.join(registry.ANSWER_TYPES)}")
    match = matchers[answer_type]
    return _accuracy([match(p, s.answer) for p, s in zip(preds, samples)])


def score_dataset(dataset: str, preds: Sequence[str], samples: Sequence[Sample], scoring: Scoring = "reference") -> dict:
    return score(registry.get(dataset).answer_type, preds, samples, scoring)
