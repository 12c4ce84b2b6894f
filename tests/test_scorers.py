import math
from collections import Counter

import pytest

from fcit.data import registry
from fcit.data.records import Sample
from fcit.eval.scorers import (
    choice,
    contains,
    exact,
    iou,
    number,
    parse_box,
    score,
    score_dataset,
    tokenize_caption,
    yesno,
)
from fcit.errors import FcitError


def _samples(answers, **meta):
    return [Sample("d", str(i), None, "q", a, (a,), dict(meta)) for i, a in enumerate(answers)]


def test_exact():
    assert exact("  Cat. ", "cat")
    assert exact("golden  retriever", "Golden retriever.")
    assert not exact("cats", "cat")
    assert not exact("", "cat")


@pytest.mark.parametrize("pred", ["B", "B.", "(B)", "B. cube", "b", "B) cube", " (B) the cube"])
def test_choice_accepts(pred):
    assert choice(pred, "B")


@pytest.mark.parametrize("pred", ["C", "C. cube", "", "A cube", "Because", "cube"])
def test_choice_rejects(pred):
    assert not choice(pred, "B")


def test_choice_non_letter_answer_falls_back_to_exact():
    assert choice("Square.", "square") and not choice("circle", "square")


def test_number():
    assert not number("1", "10") and not number("10", "1")
    assert number("3.0", "3") and number("There are 3 cubes.", "3")
    assert number("1,000", "1000") and number("-2", "-2") and not number("2", "-2")
    assert number("3/4", "0.75") and number("0.75", "3/4")
    assert not number("", "3") and not number("three", "3")
    assert number("Monday", "monday")  # non-numeric answers (TabMWP) fall back to exact


def test_yesno():
    assert yesno("Yes, it is.", "yes") and yesno("no", "No")
    assert not yesno("No", "yes") and not yesno("", "yes") and not yesno("yesterday", "yes")


def test_contains():
    assert not contains("", "10")  # the reference's reversed test counted this as correct
    assert not contains("   ", "yes")
    assert not contains("1", "10") and not contains("10", "1")
    assert contains("The value is 10.", "10") and contains("the BAR is BLUE", "blue")
    assert contains("it says new york city", "New York") and not contains("newyork", "new york")


def test_box_parsing_keeps_all_digits():
    assert parse_box("[0.12, 0.34, 0.56, 0.78]") == (0.12, 0.34, 0.56, 0.78)
    assert parse_box("[12, 34, 56, 789]") == (12, 34, 56, 789)
    assert parse_box("[0.1, 0.2, 0.3]") is None and parse_box("") is None


def test_iou():
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((1, 1, 0, 0), (0, 0, 1, 1)) == 0.0  # degenerate prediction


def test_grounding():
    gt = (0.2, 0.70, 0.6, 0.78)
    samples = [Sample("Grounding", str(i), None, "q", "", meta={"answer_bbox": gt}) for i in range(4)]
    preds = [
        "[0.2, 0.70, 0.6, 0.78]",  # the reference truncates y2 to 0.7: a zero-height box, scored wrong
        "[0.2, 0.70, 0.6, 0.73]",  # IoU 0.375
        "[0.0, 0.0, 0.1, 0.1]",
        "no box here",
    ]
    r = score("grounding", preds, samples)
    assert r["correct"] == [True, False, False, False] and r["score"] == 25.0 and r["n"] == 4
    assert r["iou_mean"] == pytest.approx(100 * (1 + 0.375) / 4)
    half = [Sample("Grounding", "0", None, "q", "", meta={"answer_bbox": (0, 0, 2, 1)})]
    assert score("grounding", ["[0, 0, 1, 1]"], half)["correct"] == [False]  # IoU exactly 0.5 is not > 0.5


def test_score_accuracy_and_dataset_lookup():
    r = score_dataset("DVQA", ["", "the answer is 10", "1"], _samples(["10", "10", "10"]))
    assert r["correct"] == [False, True, False] and r["score"] == pytest.approx(100 / 3)
    assert score_dataset("CLEVR-Math", ["10"], _samples(["1"]))["score"] == 0.0
    # the reference decides ArxivQA by exact match; the lenient scoring reads the letter
    assert score_dataset("ArxivQA", ["B. cube"], _samples(["B"]))["score"] == 0.0
    assert score_dataset("ArxivQA", ["B. cube"], _samples(["B"]), "lenient")["score"] == 100.0
    assert score(registry.EXACT, [None], _samples(["x"]))["correct"] == [False]


def test_score_errors():
    with pytest.raises(FcitError, match="2 predictions for 1 samples"):
        score("exact", ["a", "b"], _samples(["a"]))
    with pytest.raises(FcitError, match="unknown answer type"):
        score("bleu", ["a"], _samples(["a"]))
    with pytest.raises(FcitError, match="0 samples"):
        score("exact", [], [])
    with pytest.raises(FcitError, match="unknown dataset"):
        score_dataset("MNIST", ["a"], _samples(["a"]))


# -- captions ----------------------------------------------------------------------------------------------------------

def _cider_d_by_hand(cands, refs, n_max=4, sigma=6.0):
    """CIDEr-D from its definition (Vedantam et al. 2015, as in coco-caption), written independently of pycocoevalcap.

    g_k(s) = tf_k(s) * log(N / max(1, df_k)), df_k = number of images whose references contain n-gram k;
    CIDEr-D_n(c, R) = 10/|R| sum_r [sum_k min(g_k(c), g_k(r)) g_k(r) / (|g(c)| |g(r)|)] exp(-(l_c - l_r)^2 / 2 sigma^2)
    CIDEr-D = mean_n CIDEr-D_n, averaged over images.
    """

    def grams(s, n):
        w = s.split()
        return Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))

    N = len(cands)
    per_image = []
    for c, rs in zip(cands, refs):
        total = 0.0
        for n in range(1, n_max + 1):
            df = Counter(g for r_all in refs for g in set().union(*(grams(r, n) for r in r_all)))

            def vec(s):
                return {g: tf * math.log(N / max(1.0, df[g])) for g, tf in grams(s, n).items()}

            gc = vec(c)
            nc = math.sqrt(sum(v * v for v in gc.values()))
            acc = 0.0
            for r in rs:
                gr = vec(r)
                nr = math.sqrt(sum(v * v for v in gr.values()))
                dot = sum(min(v, gr.get(g, 0.0)) * gr.get(g, 0.0) for g, v in gc.items())
                cos = dot / (nc * nr) if nc and nr else 0.0
                acc += cos * math.exp(-((len(c.split()) - len(r.split())) ** 2) / (2 * sigma**2))
            total += acc / len(rs)
        per_image.append(10.0 * total / n_max)
    return sum(per_image) / N


REFS = [
    ("a dog runs on the grass", "a brown dog is running"),
    ("two people ride bikes", "people riding bicycles on a road"),
    ("a cat sleeps on a sofa", "the cat is asleep on the couch"),
]


def _caption_samples():
    return [Sample("Flickr30k", str(i), None, "Describe.", r[0], r) for i, r in enumerate(REFS)]


def test_cider_matches_definition():
    preds = ["A dog is running on grass.", "Two people riding bikes!", "a sofa"]
    r = score("caption", preds, _caption_samples())
    want = _cider_d_by_hand([tokenize_caption(p) for p in preds], REFS)
    assert 0 < want < 10
    assert r["cider"] == pytest.approx(100 * want, rel=1e-9)
    assert r["score"] == r["cider"]  # the headline is CIDEr x100, uncapped
    assert r["correct"] is None and r["n"] == 3
    assert 0 <= r["bleu4"] <= 100 and 0 < r["rougeL"] <= 100
    assert len(r["cider_per_sample"]) == 3


def test_perfect_caption_beats_wrong_one():
    perfect = score("caption", [r[0] for r in REFS], _caption_samples())
    wrong = score("caption", ["a red car", "a plate of food", "snow"], _caption_samples())
    assert perfect["cider"] > wrong["cider"] and perfect["bleu4"] > wrong["bleu4"]
    assert perfect["cider"] > 100 and perfect["score"] == perfect["cider"]  # unbounded, and not capped
    assert wrong["score"] < 10


def test_caption_tokenization():
    assert tokenize_caption("A Dog, running!  Fast.") == "a dog running fast"


# -- the reference scoring (default) against the lenient one ----------------------------------------------------------
# (answer type, prediction, answer, reference decision, lenient decision); reference sections 7 and 10.
REFERENCE_CASES = [
    # exact match for the choice datasets (ArxivQA, IconQA, AOKVQA): the letter alone, case and a final period aside
    (registry.CHOICE, "B", "B", True, True),
    (registry.CHOICE, "b.", "B", True, True),
    (registry.CHOICE, "B. cube", "B", False, True),
    (registry.CHOICE, "(B)", "B", False, True),
    (registry.CHOICE, "C", "B", False, False),
    # exact match for the number datasets (CLEVR-Math, TabMWP)
    (registry.NUMBER, "3", "3", True, True),
    (registry.NUMBER, "3.0", "3", False, True),
    (registry.NUMBER, "There are 3 cubes.", "3", False, True),
    (registry.NUMBER, "1", "10", False, False),
    (registry.NUMBER, "10", "1", False, False),
    # exact match for ImageNet-R, OCR-VQA, super-CLEVR in both modes
    (registry.EXACT, " Golden  retriever. ", "golden retriever", True, True),
    (registry.EXACT, "a golden retriever", "golden retriever", False, False),
    # FigureQA: "contains" (whole token, prediction contains answer) against the lenient first word
    (registry.YESNO, "No", "No", True, True),
    (registry.YESNO, "No, it is not.", "No", True, True),
    (registry.YESNO, "It is no.", "No", True, False),
    (registry.YESNO, "nothing", "No", False, False),
    (registry.YESNO, "", "No", False, False),
    # DVQA: "contains" in both modes; "1" never matches "10", an empty prediction is wrong
    (registry.CONTAINS, "The value is 10", "10", True, True),
    (registry.CONTAINS, "1", "10", False, False),
    (registry.CONTAINS, "", "10", False, False),
]


@pytest.mark.parametrize("kind,pred,answer,ref,len_", REFERENCE_CASES)
def test_reference_and_lenient_scoring(kind, pred, answer, ref, len_):
    samples = _samples([answer])
    assert score(kind, [pred], samples)["correct"] == [ref]  # the default is the reference
    assert score(kind, [pred], samples, "reference")["correct"] == [ref]
    assert score(kind, [pred], samples, "lenient")["correct"] == [len_]


def test_reference_scoring_per_dataset():
    # The datasets the reference scores by exact match, and the two it scores by "contains".
    ref_exact = ["ImageNet-R", "IconQA", "OCR-VQA", "super-CLEVR", "TabMWP", "AOKVQA", "CLEVR-Math", "ArxivQA"]
    for d in ref_exact:
        answer = "3" if registry.get(d).answer_type == registry.NUMBER else "B"
        assert score_dataset(d, [f"{answer} is it"], _samples([answer]))["score"] == 0.0
        assert score_dataset(d, [answer.lower()], _samples([answer]))["score"] == 100.0
    for d in ["FigureQA", "DVQA"]:
        assert score_dataset(d, ["I think yes"], _samples(["Yes"]))["score"] == 100.0


def test_unknown_scoring_is_an_error():
    with pytest.raises(FcitError, match="unknown scoring 'loose'"):
        score(registry.EXACT, ["a"], _samples(["a"]), "loose")


def test_eval_scoring_config_default_and_one_line_error():
    from fcit.config import load_config

    assert load_config().eval.scoring == "reference"
    assert load_config(overrides=["eval.scoring=lenient"]).eval.scoring == "lenient"
    with pytest.raises(FcitError) as err:
        load_config(overrides=["eval.scoring=loose"])
    assert str(err.value) == "config: eval.scoring: Input should be 'reference' or 'lenient' (got 'loose')"


def test_a_run_from_before_eval_scoring_reads_as_lenient(tmp_path):
    import json

    from fcit.config import Config
    from fcit.rundir import read_config

    raw = Config().model_dump(mode="json")
    del raw["eval"]["scoring"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_config(tmp_path).eval.scoring == "lenient"
