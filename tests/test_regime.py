"""scripts/regime.py on hand-made run folders: issue 16's bars, against both upper bounds, never guessed."""

from fcit.eval.metrics import AccuracyMatrix
from fcit.jsonio import write_json
from fcit.results import RunResult, Summary
from script_loader import load_script

regime = load_script("regime")
DATASETS = ["A", "B"]


def _run(folder, method, seed, last, artifacts=None, stages=1):
    rows = [{"A": last, "B": last}] * stages
    res = RunResult(method=method, scenario="task-hom", seed=seed, matrix=AccuracyMatrix(DATASETS, rows),
                    summary=Summary(last=last, avg=None, forgetting=None), per_dataset=[], rounds=[], timing={},
                    method_artifacts=artifacts or {})
    d = folder / f"{method}-s{seed}"
    d.mkdir(parents=True)
    write_json(d / "metrics.json", res.to_dict())


def _rows(folder, monkeypatch):
    monkeypatch.setattr(regime, "constant_scores", lambda run_dir, datasets: {d: 10.0 for d in datasets})
    return {bar: (measured, verdict) for bar, _, measured, verdict in regime.report(folder)}


def test_ratios_against_both_upper_bounds_and_means_over_seeds(tmp_path, monkeypatch):
    disco = {"max_cross_cosine": 0.8, "subspaces_formed": 1, "routing_accuracy": 0.95, "slot_of_dataset": {"A": 0}}
    for seed in range(3):
        _run(tmp_path, "zeroshot", seed, 20.0)
        _run(tmp_path, "finetune", seed, 30.0 + 2 * seed)  # mean 32
        _run(tmp_path, "disco", seed, 45.0, disco)
        _run(tmp_path, "mtl", seed, 80.0)
        _run(tmp_path, "mtl-fed", seed, 50.0)
    rows = _rows(tmp_path, monkeypatch)
    assert rows["Finetune Last / centralized MTL Last"] == ("32.0 / 80.0 = 0.40", "not met")
    assert rows["Finetune Last / federated MTL Last"] == ("32.0 / 50.0 = 0.64", "met")
    assert rows["Zero-shot Last / federated MTL Last"] == ("20.0 / 50.0 = 0.40", "met")
    assert rows["DISCO Last / centralized MTL Last"][1] == "not met"
    assert rows["DISCO Last / federated MTL Last"] == ("45.0 / 50.0 = 0.90", "met")
    assert rows["highest cross-task cosine of DISCO's identity tokens"] == ("0.80 / 0.80 / 0.80", "met")
    assert rows["learnable: MTL A - constant answer"] == ("80.0 - 10.0 = +70.0", "met")
    one_per_task = "DISCO subspaces, one per task (formed; tasks on a subspace of their own)"
    assert rows[one_per_task] == ("1; 1 / 1; 1 / 1; 1", "met")
    # the baselines were never run: their bars are not measured, not passed
    assert rows["continual baselines above Finetune on Last"][1] == "not measured"
    assert rows["seeds per method"][1] == "met"


def test_a_missing_upper_bound_is_not_measured(tmp_path, monkeypatch):
    _run(tmp_path, "finetune", 0, 30.0)
    _run(tmp_path, "mtl", 0, 60.0)
    rows = _rows(tmp_path, monkeypatch)
    assert rows["Finetune Last / centralized MTL Last"] == ("30.0 / 60.0 = 0.50", "not met")
    assert rows["Finetune Last / federated MTL Last"] == ("-", "not measured")
    assert rows["DISCO Last / federated MTL Last"] == ("-", "not measured")
    assert rows["seeds per method"][1] == "not met"


def test_per_dataset_table_is_the_mean_over_seeds_under_the_constant_answer(tmp_path, monkeypatch):
    _run(tmp_path, "finetune", 0, 30.0)
    _run(tmp_path, "finetune", 1, 40.0)
    _run(tmp_path, "mtl", 0, 80.0)
    monkeypatch.setattr(regime, "constant_scores", lambda run_dir, datasets: {d: 10.0 for d in datasets})
    lines = regime.per_dataset(tmp_path).splitlines()
    assert lines[0] == "| | seeds | A | B |"
    assert lines[2].endswith("| | 10.0 | 10.0 |")
    assert lines[3] == "| Finetune | 2 | 35.0 | 35.0 |" and lines[4] == "| MTL | 1 | 80.0 | 80.0 |"


def test_two_tasks_on_one_subspace_fail_the_one_per_task_bar(tmp_path, monkeypatch):
    # v4 seed 1 before the sampling correction: 8 subspaces formed, but one task split over two and two tasks on one
    shared = {"subspaces_formed": 2, "routing_accuracy": 1.0, "slot_of_dataset": {"A": 0, "B": 0}}
    _run(tmp_path, "disco", 0, 40.0, shared, stages=2)
    rows = _rows(tmp_path, monkeypatch)
    assert rows["DISCO subspaces, one per task (formed; tasks on a subspace of their own)"] == ("2; 1", "not met")


def test_interference_is_what_each_stage_took_from_each_earlier_dataset_mean_over_seeds(tmp_path):
    for seed, (a2, a3, b3) in enumerate([(70.0, 60.0, 50.0), (60.0, 70.0, 30.0)]):
        res = RunResult(method="finetune", scenario="task-hom", seed=seed,
                        matrix=AccuracyMatrix(["A", "B", "C"], [{"A": 80.0}, {"A": a2, "B": 60.0},
                                                                {"A": a3, "B": b3, "C": 90.0}]),
                        summary=Summary(last=0.0, avg=None, forgetting=None), per_dataset=[], rounds=[], timing={})
        d = tmp_path / f"finetune-s{seed}"
        d.mkdir()
        write_json(d / "metrics.json", res.to_dict())
    lines = regime.interference(tmp_path).splitlines()
    table = lines[lines.index("| dataset \\ stage | B | C |"):]
    # A: stage B took 10 and 20 (mean 15), stage C took 10 and -10 (mean 0); B: stage C took 10 and 30 (mean 20)
    assert table[2] == "| A | 15.0 | 0.0 |"
    assert table[3] == "| B |  | 20.0 |"
    assert lines[-1] == ("Largest: B loses 20.0 in the C stage; A loses 15.0 in the B stage; "
                         "A loses 0.0 in the C stage")
    assert regime.interference(tmp_path, "disco").startswith("(no disco runs")


# -- scripts/base_skills.py ---------------------------------------------------------------------------------------
def test_base_skills_sets_each_format_against_a_constant_answer_and_splits_the_comparison_formats_by_family():
    from fcit.data.records import Sample

    skills = load_script("base_skills").skills

    family = {6: "object", 7: "object", 10: "line", 11: "line"}  # the others: bars

    def sample(i, fmt, answer):
        return Sample(dataset="general", id=f"q{i}", image="x.png", prompt="?", answer=answer, refs=(answer,),
                      meta={"format": fmt, "family": family.get(i, "bars")})

    # word: always right; yes/no: a base that says "No" to everything, on 3 "Yes" and 1 "No" of bars and 2 "No" of
    # the object family; letter: the right letter on one of the two families only; caption: not an accuracy format
    samples = [sample(0, "word", "red"), sample(1, "word", "blue"),
               sample(2, "yesno", "Yes"), sample(3, "yesno", "Yes"), sample(4, "yesno", "Yes"), sample(5, "yesno", "No"),
               sample(6, "yesno", "No"), sample(7, "yesno", "No"),
               sample(8, "letter", "A"), sample(9, "letter", "B"), sample(10, "letter", "C"), sample(11, "letter", "C"),
               sample(12, "caption", "A bar chart.")]
    preds = ["red", "blue", "No", "No", "No", "No", "No", "No", "A", "B", "A", "A", "A bar chart."]
    rows = {(r["format"], r["family"]): r for r in skills(samples, preds)}
    assert set(rows) == {("word", "all"), ("yesno", "all"), ("yesno", "bars"), ("yesno", "object"),
                         ("letter", "all"), ("letter", "bars"), ("letter", "line")}
    assert (rows["word", "all"]["base"], rows["word", "all"]["n"]) == (100.0, 2)
    # "No" to everything scores 50 where "Yes" and "No" are even, and sits 0 above answering "No" or "Yes" always
    assert rows["yesno", "all"] == {"format": "yesno", "family": "all", "n": 6, "base": 50.0, "constant": 50.0,
                                   "margin": 0.0}
    assert (rows["yesno", "bars"]["base"], rows["yesno", "bars"]["constant"], rows["yesno", "bars"]["margin"]) == (
        25.0, 75.0, -50.0)
    assert (rows["letter", "bars"]["margin"], rows["letter", "line"]["base"], rows["letter", "line"]["margin"]) == (
        50.0, 0.0, -100.0)
