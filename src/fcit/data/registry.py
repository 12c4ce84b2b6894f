"""The 12 FCIT datasets: where their files live in the official layout, their capability group and scorer.

The same registry serves the real benchmark (official ``instructions/`` layout) and FCIT-Synth, which writes
its files under the same relative paths so one loader reads both.
"""

from __future__ import annotations

from dataclasses import dataclass

from fcit.errors import FcitError

# Answer types, each with its scorers in fcit.eval.scorers: the reference scoring decides the short ones by exact
# match (yes/no and contains by "contains"), the lenient one parses by type.
EXACT = "exact"  # case-insensitive exact match after trimming white space and a final period
CHOICE = "choice"  # a multiple-choice letter (A, B, C, ...); lenient: the letter of "B) cube"
NUMBER = "number"  # a number; lenient: the first number, "1" never matches "10"
YESNO = "yesno"  # yes / no; reference: "contains", lenient: the first word
CONTAINS = "contains"  # the prediction contains the answer as a whole token; empty prediction is wrong
GROUNDING = "grounding"  # a normalised box [x1, y1, x2, y2], correct iff IoU > 0.5
CAPTION = "caption"  # CIDEr-D x100 (headline)

ANSWER_TYPES = (EXACT, CHOICE, NUMBER, YESNO, CONTAINS, GROUNDING, CAPTION)

# The answer formats of the generic instruction mixture (FCIT-Synth's ``INSTRUCT``) and the answer type each is
# scored as; its held-out split is the general-ability benchmark (``fcit.eval.general``), one record per format name.
FORMATS: dict[str, str] = {"word": EXACT, "number": NUMBER, "yesno": YESNO, "letter": CHOICE, "box": GROUNDING,
                           "caption": CAPTION}


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # canonical name used in configs and tables
    folder: str  # folder under instructions/
    train_file: str
    test_file: str
    group: str  # capability group of the Capability-related setting
    answer_type: str


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec("ImageNet-R", "ImageNet-R", "train.json", "test.json", "General", EXACT),
        DatasetSpec("ArxivQA", "ArxivQA", "train_4w.json", "test_1w.json", "Chart", CHOICE),
        DatasetSpec("IconQA", "IconQA", "train.json", "val.json", "General", CHOICE),
        DatasetSpec("CLEVR-Math", "CLEVR-Math", "train_4w.json", "test_1w.json", "Math", NUMBER),
        DatasetSpec("OCR-VQA", "OCRVQA", "train_10w.json", "test_1w.json", "Other", EXACT),
        DatasetSpec("Flickr30k", "Flickr30k-cap", "train_brief_4w.json", "val_brief.json", "Other", CAPTION),
        DatasetSpec("FigureQA", "FigureQA", "train.json", "test.json", "Chart", YESNO),
        DatasetSpec("super-CLEVR", "super-CLEVR", "train.json", "test.json", "Math", EXACT),
        DatasetSpec("AOKVQA", "AOKVQA", "train.json", "val.json", "General", CHOICE),
        DatasetSpec("Grounding", "Grounding", "train_11w.json", "test_6000.json", "General", GROUNDING),
        DatasetSpec("DVQA", "DVQA", "train.json", "test.json", "Chart", CONTAINS),
        DatasetSpec("TabMWP", "TabMWP", "train.json", "test.json", "Math", NUMBER),
    ]
}

# Reference section 10: the eval-script order is the real one.
TASK_ORDER = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR"]
CAPABILITY_ORDER = [
    ["AOKVQA", "IconQA", "Grounding", "ImageNet-R"],  # General
    ["ArxivQA", "FigureQA", "DVQA"],  # Chart
    ["CLEVR-Math", "super-CLEVR", "TabMWP"],  # Math
    ["Flickr30k", "OCR-VQA"],  # Other
]
CAPABILITY_NAMES = ["General", "Chart", "Math", "Other"]


def get(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise FcitError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
