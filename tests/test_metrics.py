import json
import math

import pytest

from fcit.errors import FcitError
from fcit.eval.metrics import (
    AccuracyMatrix,
    avg,
    forgetting,
    group_means,
    last,
    mean_std,
    new_datasets,
    stage_drops,
    summary,
)


def three_stage() -> AccuracyMatrix:
    # A is trained in stage 1, B in stage 2, C in stage 3. A's best score is at stage 1, not the stage just before
    # the last, so a "previous row minus final row" implementation would get the wrong answer.
    m = AccuracyMatrix()
    m.add_stage({"A": 80.0})
    m.add_stage({"A": 70.0, "B": 60.0})
    m.add_stage({"A": 75.0, "B": 40.0, "C": 95.0})
    return m


GROUPS = {"G1": ["A", "B"], "G2": ["C"]}


def test_columns_follow_first_seen_order():
    m = AccuracyMatrix()
    m.add_stage({"Z": 1.0})
    m.add_stage({"A": 2.0, "Z": 3.0})
    assert m.datasets == ["Z", "A"]
    assert m.num_stages == 2


def test_last_and_avg_by_hand():
    m = three_stage()
    assert last(m) == pytest.approx((75 + 40 + 95) / 3)  # 70.0
    # Each stage weighs the same whatever its number of datasets: (80 + 65 + 70) / 3.
    assert avg(m) == pytest.approx((80 + 65 + 70) / 3)


def test_forgetting_uses_best_earlier_score():
    m = three_stage()
    # A: max(80, 70) - 75 = 5; B: 60 - 40 = 20; C is trained in the last stage and does not count.
    assert forgetting(m, ["C"]) == pytest.approx(12.5)


def test_forgetting_excludes_datasets_retrained_in_final_stage():
    # Het recurrences: A is trained again at the end, so only B measures retention.
    assert forgetting(three_stage(), ["A", "C"]) == pytest.approx(20.0)


def test_forgetting_can_be_negative_when_old_tasks_improve():
    m = AccuracyMatrix()
    m.add_stage({"A": 50.0})
    m.add_stage({"A": 58.0, "B": 70.0})
    assert forgetting(m, ["B"]) == pytest.approx(-8.0)


def test_stage_drops_say_which_stage_took_what_and_new_datasets_name_the_stages():
    m = three_stage()
    # stage 2 took 10 from A; stage 3 gave A back 5 and took 20 from B; C is new in stage 3, so not a drop
    assert stage_drops(m) == [{"A": 10.0}, {"A": -5.0, "B": 20.0}]
    assert new_datasets(m) == [["A"], ["B"], ["C"]]
    one = AccuracyMatrix()
    one.add_stage({"A": 1.0})
    assert stage_drops(one) == []


def test_forgetting_undefined_cases():
    single = AccuracyMatrix()
    single.add_stage({"A": 80.0})
    assert forgetting(single, ["A"]) is None
    assert forgetting(three_stage(), ["A", "B", "C"]) is None


def test_forgetting_rejects_missing_final_score():
    # A skipped evaluation must not silently shrink the average.
    m = AccuracyMatrix()
    m.add_stage({"A": 80.0})
    m.add_stage({"B": 60.0})
    with pytest.raises(FcitError, match="'A'"):
        forgetting(m, ["B"])


def test_group_means():
    row = {"A": 75.0, "B": 40.0, "C": 95.0}
    assert group_means(row, GROUPS) == {"G1": pytest.approx(57.5), "G2": pytest.approx(95.0)}
    # A group with nothing seen yet is absent, not 0.
    assert group_means({"A": 80.0}, GROUPS) == {"G1": 80.0}


def test_group_means_rejects_ungrouped_dataset():
    with pytest.raises(FcitError, match="'D'"):
        group_means({"A": 1.0, "D": 2.0}, GROUPS)


def test_summary_with_groups():
    s = summary(three_stage(), ["C"], GROUPS)
    assert s["last"] == pytest.approx(70.0)
    assert s["avg"] == pytest.approx(215 / 3)
    assert s["forgetting"] == pytest.approx(12.5)
    # Group rows: [80], [65], [57.5, 95] -> 80, 65, 76.25.
    assert s["last_groups"] == pytest.approx(76.25)
    assert s["avg_groups"] == pytest.approx((80 + 65 + 76.25) / 3)
    json.dumps(s)  # stored in the run directory as is


def test_summary_without_groups_has_only_three_keys():
    assert set(summary(three_stage(), ["C"])) == {"last", "avg", "forgetting"}


def test_round_trip_through_json():
    m = three_stage()
    back = AccuracyMatrix.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back == m
    assert summary(back, ["C"]) == summary(m, ["C"])


def test_from_dict_keeps_stored_column_order_but_checks_it():
    d = three_stage().to_dict()
    d["datasets"] = ["C", "B", "A"]
    assert AccuracyMatrix.from_dict(d).datasets == ["C", "B", "A"]
    d["datasets"] = ["A", "B"]
    with pytest.raises(FcitError, match="'C'"):
        AccuracyMatrix.from_dict(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "80", None, True])
def test_add_stage_rejects_non_scores(bad):
    with pytest.raises(FcitError):
        AccuracyMatrix().add_stage({"A": bad})


def test_empty_inputs_are_errors():
    with pytest.raises(FcitError):
        AccuracyMatrix().add_stage({})
    with pytest.raises(FcitError):
        last(AccuracyMatrix())
    with pytest.raises(FcitError):
        mean_std([])


def test_mean_std():
    mu, sd = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mu == pytest.approx(2.5)
    assert sd == pytest.approx(math.sqrt(5 / 3))  # ddof=1: sum of squares 5 over n-1 = 3
    assert mean_std([42.0]) == (42.0, 0.0)
