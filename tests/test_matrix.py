"""``fcit matrix`` at smoke size (reuse, resume, parallel jobs, its files) and ``scripts/findings.py`` on a
hand-made results folder."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fcit.matrix as matrix_mod
from fcit.cli import main
from fcit.launch import run
from test_experiment import cache_dir, small_base, smoke_cfg  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _matrix(cfg, out, methods=("finetune",), betas=(1.0,), seeds=(0,), jobs=1):
    return matrix_mod.matrix(cfg, list(methods), ["task"], ["hom"], list(betas), list(seeds), out=out, jobs=jobs,
                             progress=False)


def _metrics_mtimes(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}


def test_matrix_writes_every_cell_and_reuses_finished_runs(small_base, cache_dir, tmp_path, monkeypatch):
    cfg = smoke_cfg(small_base, cache_dir, tmp_path)
    out = tmp_path / "mx"
    res = _matrix(cfg, out, methods=("zeroshot", "finetune"), betas=(1.0, 5.0))
    # zero-shot never trains: one run answers both betas; finetune runs once per beta
    assert sorted(res.executed) == ["finetune-task-hom-b1-s0", "finetune-task-hom-b5-s0", "zeroshot-task-hom"]
    data = json.loads((out / "matrix.json").read_text())
    cells = {(c["method"], c["beta"]): c for c in data["cells"]}
    assert sorted(cells) == [("finetune", 1.0), ("finetune", 5.0), ("zeroshot", 1.0), ("zeroshot", 5.0)]
    assert cells[("zeroshot", 1.0)]["run_dir"] == cells[("zeroshot", 5.0)]["run_dir"] == "zeroshot-task-hom"
    assert cells[("zeroshot", 1.0)]["shared"] and not cells[("finetune", 1.0)]["shared"]
    for (m, b), c in cells.items():
        metrics = json.loads((out / c["run_dir"] / "metrics.json").read_text())
        assert (c["last"], c["avg"], c["forgetting"]) == tuple(metrics["summary"][k] for k in
                                                              ("last", "avg", "forgetting"))
        assert c["matrix"] == metrics["matrix"] and c["setting"] == "task" and c["scenario"] == "hom"
        assert len(c["curve"]) == (2 if m == "finetune" else 1)
    ft5 = json.loads((out / "finetune-task-hom-b5-s0" / "config.json").read_text())
    assert ft5["scenario"]["beta"] == 5.0 and ft5["method"]["name"] == "finetune"
    assert cells[("finetune", 1.0)]["params"] == {} and cells[("finetune", 1.0)]["tasks"] == 2
    with open(out / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["beta"]), float(r["last"]), r["run_dir"]) for r in rows] == \
        [(c["method"], c["beta"], c["last"], c["run_dir"]) for c in data["cells"]]
    assert rows[0]["avg"] == "" and rows[0]["method"] == "zeroshot"  # not applicable, not 0
    md = (out / "matrix.md").read_text()
    assert "### Task-related, Hom (seeds 0)" in md and "| Method | Last β=1 | Avg β=1 | Last β=5 | Avg β=5 |" in md
    for png in ("last_vs_beta.png", "avg_curves.png", "matrices.png"):
        assert (out / png).stat().st_size > 1000, png

    # A second call finds every run finished: nothing trains, no model loads, no run directory is rewritten.
    before = _metrics_mtimes(out)

    def no_training(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(matrix_mod, "run", no_training)
    monkeypatch.setattr(matrix_mod.Runtime, "build", no_training)
    again = _matrix(cfg, out, methods=("zeroshot", "finetune"), betas=(1.0, 5.0))
    assert again.executed == [] and _metrics_mtimes(out) == before
    assert [c.to_dict() for c in again.cells] == [c.to_dict() for c in res.cells]
    # Another config in the same folder is refused before anything runs.
    other = smoke_cfg(small_base, cache_dir, tmp_path, **{"train.lr": 1e-3})
    with pytest.raises(Exception, match="different config"):
        _matrix(other, out)


def test_matrix_resumes_an_interrupted_run(small_base, cache_dir, tmp_path, monkeypatch):
    cfg = smoke_cfg(small_base, cache_dir, tmp_path)
    out = tmp_path / "mx"
    cell = out / "finetune-task-hom-b1-s0"
    # An interrupted run of the cell: stage 1 checkpointed, no metrics (as test_experiment builds one).
    _, first = run(smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 1}), cell, progress=False)
    (cell / "metrics.json").unlink()
    (cell / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    calls = []
    real_run = matrix_mod.run

    def spy(c, run_dir, **kw):
        calls.append((Path(run_dir).name, kw.get("resume")))
        return real_run(c, run_dir, **kw)

    monkeypatch.setattr(matrix_mod, "run", spy)
    res = _matrix(cfg, out)
    assert calls == [("finetune-task-hom-b1-s0", True)] and res.executed == ["finetune-task-hom-b1-s0"]
    m = json.loads((cell / "metrics.json").read_text())
    assert m["matrix"]["rows"][0] == first.matrix.rows[0] and len(m["matrix"]["rows"]) == 2
    assert [r["loss"] for r in m["rounds"][:2]] == [r.loss for r in first.rounds]  # stage 1 came from the checkpoint
    assert len(json.loads((cell / "environment.json").read_text())) == 2  # a resumed start appends one record
    assert res.cells[0].last == m["summary"]["last"]


@pytest.mark.slow
def test_matrix_jobs_run_in_parallel_processes_at_one_thread(small_base, cache_dir, tmp_path, monkeypatch):
    cfg = smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 1})
    out = tmp_path / "mx"
    res = _matrix(cfg, out, seeds=(0, 1), jobs=2)
    assert sorted(res.executed) == ["finetune-task-hom-b1-s0", "finetune-task-hom-b1-s1"]
    for name in res.executed:
        c = json.loads((out / name / "config.json").read_text())
        assert c["threads"] == 1 and c["federation"]["workers"] == 1
        assert json.loads((out / name / "status.json").read_text())["status"] == "finished"
    # The run identity leaves threads and workers out: an in-process call reuses the parallel runs.
    monkeypatch.setattr(matrix_mod, "run", lambda *a, **k: pytest.fail("rerun"))
    assert _matrix(cfg, out, seeds=(0, 1)).executed == []


@pytest.mark.parametrize("args, needle", [
    (["--methods", "finetune,nope"], "--methods: unknown nope"),
    (["--betas", "1,0"], "--betas: Dirichlet beta must be a finite number > 0, got 0"),
    (["--betas", "1,x"], "--betas: expected comma-separated floats"),
    (["--settings", "tasks"], "--settings: unknown tasks"),
    (["--scenarios", "hom,mixed"], "--scenarios: unknown mixed"),
    (["--jobs", "0"], "--jobs"),
    (["--methods", "disco", "--set", "method.params.tau=2"], "disco-task-hom-b1-s0"),
    # the smoke preset's 2-client rounds do not fit the default Het table: said before the first run
    (["--preset", "smoke", "--scenarios", "het", "--methods", "finetune"], "scenario.het_table"),
])
def test_matrix_bad_input_is_one_line_before_any_work(args, needle, tmp_path, capsys):
    out = tmp_path / "mx"
    rc = main(["matrix", "--settings", "task", "--betas", "1", "--seeds", "0", *args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fcit: error:") and needle in err[0], err
    assert not out.exists()
