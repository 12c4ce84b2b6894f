import json
import math

import numpy as np
import pytest
from bench_fixture import make_bench
from pydantic import ValidationError

from fcit.cli import main
from fcit.config import ScenarioConfig, load_config
from fcit.data import registry
from fcit.data.loader import Benchmark
from fcit.data.scenario import CAP_DYN_LIST, SEQ_DYN_LIST, Scenario, het_table
from fcit.data.show import histogram, show
from fcit.errors import FcitError


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return Benchmark(make_bench(tmp_path_factory.mktemp("bench"), n_train=30, n_test=4))


def _sc(bench, seed=0, partitions_root=None, **kw):
    base = {"num_clients": 6, "clients_per_round": 5, "rounds": 3}
    return Scenario(ScenarioConfig(**{**base, **kw}), seed, bench, partitions_root)


def test_task_hom(bench):
    sc = _sc(bench)
    assert sc.name == "task-hom" and sc.num_stages == 8
    assert sc.tasks == [[d] for d in registry.TASK_ORDER] and sc.task_names == registry.TASK_ORDER
    assert [sc.stage_tasks(t) for t in range(8)] == [[t] for t in range(8)]
    assert sc.seen_datasets(0) == ["ImageNet-R"]
    assert sc.seen_datasets(3) == registry.TASK_ORDER[:4]
    assert sc.seen_datasets(7) == registry.TASK_ORDER


def test_cap_hom(bench):
    sc = _sc(bench, setting="capability")
    assert sc.name == "cap-hom" and sc.num_stages == 4
    assert sc.tasks == registry.CAPABILITY_ORDER and sc.task_names == registry.CAPABILITY_NAMES
    assert sc.seen_datasets(1) == registry.CAPABILITY_ORDER[0] + registry.CAPABILITY_ORDER[1]
    data = sc.task_train(1)
    assert len(data) == 90 and {s.dataset for s in data} == {"ArxivQA", "FigureQA", "DVQA"}
    # the group's concatenation is shuffled before the split, so clients hold a mixture
    assert any(len({s.dataset for s in share}) > 1 for share in sc.shares(1))


def test_cap_other_reading_keeps_group_names(bench):
    order = [registry.CAPABILITY_ORDER[i] for i in (0, 3, 2, 1)]
    sc = _sc(bench, setting="capability", capability_order=order)
    assert sc.task_names == ["General", "Other", "Math", "Chart"]


def test_het_default_tables(bench):
    sc = _sc(bench, mode="het")
    assert sc.name == "task-het" and sc.num_stages == 8 and sc.table == SEQ_DYN_LIST
    assert SEQ_DYN_LIST[0] == [1, 2, 4, 5, 6] and SEQ_DYN_LIST[7] == [5, 5, 5, 6, 6]
    assert sc.stage_tasks(1) == [3, 4, 5, 7]
    assert sc.seen_datasets(0) == ["ArxivQA", "IconQA", "OCR-VQA", "Flickr30k", "FigureQA"]
    assert set(sc.seen_datasets(2)) == set(registry.TASK_ORDER)  # all 8 tasks appear by stage 3
    cap = _sc(bench, setting="capability", mode="het")
    assert cap.name == "cap-het" and cap.num_stages == 4 and cap.table == CAP_DYN_LIST
    assert CAP_DYN_LIST == [[0, 1, 1, 3, 3], [0, 2, 2, 2, 3], [1, 2, 2, 3, 3], [0, 0, 0, 1, 1]]
    assert cap.stage_tasks(0) == [0, 1, 3]
    assert set(cap.seen_datasets(1)) == {d for g in registry.CAPABILITY_ORDER for d in g}


def test_het_table_validation(bench):
    with pytest.raises(FcitError, match="row 0 has 5 positions but clients_per_round is 2"):
        _sc(bench, mode="het", clients_per_round=2)
    with pytest.raises(FcitError, match="one row per stage"):
        _sc(bench, mode="het", het_table=SEQ_DYN_LIST[:7])
    with pytest.raises(FcitError, match="row 3: task 8"):
        _sc(bench, mode="het", het_table=SEQ_DYN_LIST[:3] + [[0, 0, 1, 3, 8]] + SEQ_DYN_LIST[4:])
    with pytest.raises(FcitError, match="at most one"):
        _sc(bench, mode="het", het_table=SEQ_DYN_LIST, het_table_seed=1)
    sc = _sc(bench, mode="het", clients_per_round=2, het_table=[[k, (k + 1) % 8] for k in range(8)])
    assert sc.stage_tasks(7) == [0, 7]


def test_het_table_generator():
    t = het_table(8, 8, 5, seed=3)
    assert t == het_table(8, 8, 5, seed=3) and t != het_table(8, 8, 5, seed=4)
    assert len(t) == 8 and all(len(r) == 5 and r == sorted(r) for r in t)
    assert {k for r in t[: math.ceil(8 / 3)] for k in r} == set(range(8))
    t4 = het_table(4, 4, 2, seed=0)
    assert {k for r in t4[:2] for k in r} == set(range(4))
    with pytest.raises(FcitError, match="cannot all appear"):
        het_table(8, 8, 2, seed=0)


def test_het_table_seed_in_scenario(bench):
    sc = _sc(bench, mode="het", clients_per_round=3, het_table_seed=7)
    assert sc.table == het_table(8, 8, 3, 7)


def test_selection_seeded_sorted(bench):
    a, b = _sc(bench, num_clients=20), _sc(bench, num_clients=20)
    for t in range(3):
        for r in range(3):
            sel = a.selected(t, r)
            assert sel == b.selected(t, r) and sel == sorted(sel) and len(set(sel)) == 5
            assert all(0 <= c < 20 for c in sel)
    picks = {tuple(a.selected(t, r)) for t in range(4) for r in range(3)}
    assert len(picks) > 1
    assert _sc(bench, seed=1, num_clients=20).selected(0, 0) != a.selected(0, 0) or \
        _sc(bench, seed=1, num_clients=20).selected(0, 1) != a.selected(0, 1)


def test_more_per_round_than_clients_rejected(bench):
    with pytest.raises(ValidationError):
        ScenarioConfig(num_clients=3, clients_per_round=5)
    cfg = ScenarioConfig().model_copy(update={"num_clients": 3, "clients_per_round": 5})
    with pytest.raises(FcitError, match="clients_per_round"):
        Scenario(cfg, 0, bench)


def test_round_assignments_and_client_data_hom_and_het(bench):
    hom = _sc(bench)
    for a in hom.assignments(2, 1):
        data = hom.client_data(a.task, a.client_id)
        assert a.task == 2 and data is hom.shares(2)[a.client_id] and data
        assert {x.dataset for x in data} == {"IconQA"}
    het = _sc(bench, mode="het")
    assigned = het.assignments(3, 0)
    assert [a.client_id for a in assigned] == het.selected(3, 0)
    assert [a.position for a in assigned] == list(range(5))
    assert [a.task for a in assigned] == SEQ_DYN_LIST[3]
    for a in assigned:
        assert het.client_data(a.task, a.client_id) is het.shares(a.task)[a.client_id]


def test_partition_of_tasks(bench):
    sc = _sc(bench, beta=0.5, min_size=2)
    sizes = sc.client_sizes(4)
    assert sizes.sum() == 30 and sizes.min() >= 2 and len(sizes) == 6
    assert sorted(s.id for s in sc.task_train(4)) == sorted(s.id for s in bench.train("OCR-VQA"))
    again = _sc(bench, beta=0.5, min_size=2)
    assert [[s.id for s in c] for c in again.shares(4)] == [[s.id for s in c] for c in sc.shares(4)]
    assert not np.array_equal(_sc(bench, beta=0.5, min_size=2, seed=5).client_sizes(4), sizes)
    with pytest.raises(FcitError, match="task ImageNet-R"):
        _sc(bench, num_clients=40, min_size=1).client_sizes(0)


def test_stages_cap_and_bad_order(bench):
    assert _sc(bench, stages=2).num_stages == 2
    assert _sc(bench, stages=20).num_stages == 8
    with pytest.raises(FcitError, match="stage 2 out of range"):
        _sc(bench, stages=2).stage_tasks(2)
    with pytest.raises(FcitError, match="MNIST"):
        _sc(bench, task_order=["ImageNet-R", "MNIST"])
    with pytest.raises(FcitError, match="at most once"):
        _sc(bench, task_order=["ImageNet-R", "ImageNet-R"])


def test_released_partitions_in_scenario(bench, tmp_path):
    drawn = _sc(bench, setting="capability", num_clients=3, clients_per_round=2)
    root = tmp_path / "partitioned_data"
    raw = {}
    for ds in registry.DATASETS:
        recs = json.loads(bench.train_path(ds).read_text())
        raw.update({r["id"]: r for r in recs})
    for k in range(4):
        folder = root / "Capability-related" / "cap" / "1.0" / f"Task{k + 1}"
        folder.mkdir(parents=True)
        for i, share in enumerate(drawn.shares(k)):
            (folder / f"client_{i}.json").write_text(json.dumps([raw[s.id] for s in share]))
    sc = _sc(bench, setting="capability", num_clients=3, clients_per_round=2, partitions_root=str(root))
    for k in range(4):
        assert np.array_equal(sc.client_sizes(k), drawn.client_sizes(k))
        assert [[(s.dataset, s.id) for s in c] for c in sc.shares(k)] == \
            [[(s.dataset, s.id) for s in c] for c in drawn.shares(k)]


def test_union_is_one_stage_over_every_task_with_the_continual_sample_budget(bench):
    sc = Scenario(ScenarioConfig(num_clients=6, clients_per_round=5, rounds=3), 0, bench, union=True)
    assert sc.name == "task-hom-union" and sc.num_stages == 1 and sc.rounds == 3
    assert sc.tasks == [registry.TASK_ORDER] and sc.stage_tasks(0) == [0]
    assert sc.seen_datasets(0) == registry.TASK_ORDER
    data = sc.task_train(0)
    assert len(data) == 8 * 30 and {s.dataset for s in data} == set(registry.TASK_ORDER)
    # partitioned over the clients like any stage: a seeded Dirichlet draw over the shuffled union
    assert sc.client_sizes(0).sum() == 240 and len(sc.client_sizes(0)) == 6
    assert any(len({s.dataset for s in share}) > 1 for share in sc.shares(0))
    again = Scenario(ScenarioConfig(num_clients=6, clients_per_round=5, rounds=3), 0, bench, union=True)
    assert [[s.id for s in c] for c in again.shares(0)] == [[s.id for s in c] for c in sc.shares(0)]
    assert all(a.task == 0 for r in range(sc.rounds) for a in sc.assignments(0, r))
    # the stages the continual run would train: a truncated run, Het (its tables' tasks), Capability
    two = Scenario(ScenarioConfig(num_clients=6, clients_per_round=5, rounds=3, stages=2), 0, bench, union=True)
    assert two.tasks == [registry.TASK_ORDER[:2]] and two.rounds == 3
    het = Scenario(ScenarioConfig(num_clients=6, clients_per_round=5, rounds=3, mode="het", stages=1), 0, bench,
                   union=True)
    assert het.tasks == [[registry.TASK_ORDER[k] for k in sorted(set(SEQ_DYN_LIST[0]))]] and het.table is None
    cap = Scenario(ScenarioConfig(num_clients=6, clients_per_round=5, rounds=3, setting="capability"), 0, bench,
                   union=True)
    assert cap.tasks == [[d for g in registry.CAPABILITY_ORDER for d in g]] and cap.rounds == 3


def test_union_with_released_partitions_gives_each_client_its_shares_of_every_task(bench, tmp_path):
    drawn = _sc(bench, setting="capability", num_clients=3, clients_per_round=2)
    root = tmp_path / "partitioned_data"
    raw = {}
    for ds in registry.DATASETS:
        raw.update({r["id"]: r for r in json.loads(bench.train_path(ds).read_text())})
    for k in range(4):
        folder = root / "Capability-related" / "cap" / "1.0" / f"Task{k + 1}"
        folder.mkdir(parents=True)
        for i, share in enumerate(drawn.shares(k)):
            (folder / f"client_{i}.json").write_text(json.dumps([raw[s.id] for s in share]))
    sc = Scenario(ScenarioConfig(setting="capability", num_clients=3, clients_per_round=2), 0, bench,
                  partitions_root=str(root), union=True)
    for c in range(3):
        want = [(s.dataset, s.id) for k in range(4) for s in drawn.shares(k)[c]]
        assert [(s.dataset, s.id) for s in sc.shares(0)[c]] == want


def test_histogram_lines():
    lines = histogram(np.array([1, 1, 2, 5, 9, 9, 9]), bins=3)
    assert sum(int(line.split()[-1]) for line in lines) == 7
    assert lines[0].startswith("1..")


def test_show(bench, tmp_path):
    cfg = load_config(overrides={"data.kind": "real", "data.root": str(bench.root), "scenario.num_clients": 6})
    text = show(cfg, "task-het", 0.5, tmp_path / "out")
    assert "task-het" in text and "beta 0.5" in text and "Gini" in text and "#" in text
    assert "positions -> tasks [1, 2, 4, 5, 6]" in text
    assert text.splitlines()[1] == f"Benchmark: {bench.root}"  # real files: no generator version to name
    assert (tmp_path / "out" / "samples.png").stat().st_size > 1000
    assert "Instruction endings" in text
    # the fixture's instructions are all different: the two most common endings, then how many more there are
    assert '  super-CLEVR: "Question 0 about super-CLEVR?" 3%; "Question 1 about super-CLEVR?" 3% (+28 more)' in text
    text = show(cfg, "cap-hom", None, tmp_path / "out2")
    assert "General" in text and "stage 4" in text and "beta 1" in text
    with pytest.raises(FcitError, match="unknown setting"):
        show(cfg, "task", None, tmp_path / "out3")


def test_show_identity_overlap_prints_the_closest_task_pairs(bench, tmp_path, capsys):
    # The fixture's instructions are "Question i about <dataset>?": the real MiniLM encoder on them, every pair listed
    # highest first, the pairs' cosines between -1 and 1 and below 1 (no two datasets share a question).
    args = ["data", "show", "task-hom", "--set", "data.kind=real", "--set", f"data.root={bench.root}",
            "--set", "scenario.num_clients=6", "--out", str(tmp_path / "out")]
    assert main([*args, "--identity", "--identity-samples", "7"]) == 0
    out = capsys.readouterr().out
    head, _, tail = out.partition("Identity-token overlap (minilm; each task's token the mean of up to 7 training")
    assert "Instruction endings" in head and tail
    pairs = [line.split() for line in tail.splitlines()[1:] if line.startswith("  ")]
    assert len(pairs) == 5
    cosines = [float(p[0]) for p in pairs]
    assert cosines == sorted(cosines, reverse=True) and all(-1 <= c < 0.999 for c in cosines)
    assert all(p[2] == "/" and p[1] in registry.TASK_ORDER and p[3] in registry.TASK_ORDER for p in pairs)


@pytest.mark.parametrize("extra, needle", [(["--identity", "clip:"], "identity encoder 'clip:'"),
                                           (["--identity-samples", "0"], "--identity-samples must be >= 1")])
def test_show_identity_bad_input_is_one_line_before_any_work(bench, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    args = ["data", "show", "task-hom", "--set", "data.kind=real", "--set", f"data.root={bench.root}", "--out", str(out)]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not out.exists()  # nothing was drawn before the error
