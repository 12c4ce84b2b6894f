"""``fcit matrix`` at smoke size (reuse, resume, parallel jobs, its files) and ``scripts/findings.py`` on a
hand-made results folder."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fcit.matrix as matrix_mod
from fcit.cli import main
from fcit.launch import run
from script_loader import load_script
from test_experiment import cache_dir, small_base, smoke_cfg  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _matrix(cfg, out, methods=("finetune",), betas=(1.0,), seeds=(0,), jobs=1, ray=None):
    return matrix_mod.matrix(cfg, list(methods), ["task"], ["hom"], list(betas), list(seeds), out=out, jobs=jobs,
                             progress=False, ray_address=ray)


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
    walls = [json.loads((out / r / "metrics.json").read_text())["timing"]["total"] for r in sorted(res.executed)]
    from fcit.environment import record

    here = re.escape(record()["cpu"]["model"])
    assert re.search(rf"\): {here}: 3 runs, {sum(walls) / 3600:.1f} h \(task {min(walls):.0f}-{max(walls):.0f} s\)\.",
                     md), md
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
    # --report on a larger grid: the finished cells are tabled, the rest listed, still nothing trains.
    part = matrix_mod.matrix(cfg, ["zeroshot", "finetune"], ["task"], ["hom"], [0.5, 1.0, 5.0], [0, 1], out=out,
                             progress=False, report_only=True)
    assert part.executed == [] and _metrics_mtimes(out) == before
    assert sorted((c.method, c.beta, c.seed) for c in part.cells if c.method == "finetune") == [
        ("finetune", 1.0, 0), ("finetune", 5.0, 0)]
    data = json.loads((out / "matrix.json").read_text())
    assert data["missing"] == ["finetune-task-hom-b0.5-s0", "finetune-task-hom-b0.5-s1", "finetune-task-hom-b1-s1",
                               "finetune-task-hom-b5-s1"]
    assert "Not run yet (4 runs): finetune-task-hom-b0.5-s0" in part.markdown
    assert "### Task-related, Hom (seeds 0)" in part.markdown  # the seeds the numbers come from, not the grid's
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


@pytest.mark.slow
def test_sigterm_to_the_driver_alone_stops_its_parallel_runs(small_base, cache_dir, tmp_path):
    # `kill PID` or a scheduler signals the driver only: its --jobs children must stop too, each recording how
    # its run ended, instead of training on while the driver waits for them, and start none of the runs queued
    # behind (four runs on two jobs: the pool had already handed a third to its workers' queue).
    import signal
    import time

    out = tmp_path / "mx"
    sets = {"model.path": small_base, "data.root": cache_dir, "scenario.rounds": 200}
    args = [sys.executable, "-m", "fcit.cli", "matrix", "--preset", "smoke", "--quiet", "--methods", "finetune",
            "--settings", "task", "--scenarios", "hom", "--betas", "1", "--seeds", "0,1,2,3", "--jobs", "2",
            "--out", str(out)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    runs = [out / f"finetune-task-hom-b1-s{s}" for s in (0, 1)]
    deadline = time.monotonic() + 240
    while not all((r / "config.json").exists() for r in runs):  # both runs began
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    pids = [json.loads((r / "status.json").read_text())["pid"] for r in runs]
    assert proc.pid not in pids
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *pids]:  # leave no run training behind the failed test
            os.kill(pid, signal.SIGKILL)
        pytest.fail("the driver did not stop within 60 s of SIGTERM")
    err = proc.stderr.read()
    assert rc == 143 and "terminated (SIGTERM)" in err, err
    for r in runs:
        st = json.loads((r / "status.json").read_text())
        assert st["status"] == "failed" and st["reason"] == "interrupted (SIGTERM)", (r.name, st)
        assert not (r / "metrics.json").exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any((out / f"finetune-task-hom-b1-s{s}").exists() for s in (2, 3)), sorted(os.listdir(out))


@pytest.mark.slow
def test_matrix_on_a_local_ray_cluster_runs_each_cell_as_a_task(small_base, cache_dir, tmp_path, monkeypatch):
    cfg = smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 1})
    out = tmp_path / "mx"
    res = _matrix(cfg, out, seeds=(0, 1), jobs=2, ray="local")
    assert sorted(res.executed) == ["finetune-task-hom-b1-s0", "finetune-task-hom-b1-s1"]
    for name in res.executed:
        c = json.loads((out / name / "config.json").read_text())
        assert c["threads"] == 1 and c["federation"]["workers"] == 1
        assert json.loads((out / name / "status.json").read_text())["status"] == "finished"
    assert len(res.cells) == 2 and all(c.last is not None for c in res.cells)
    import ray

    assert not ray.is_initialized()  # the cluster fcit started is shut down again
    # the same runs as any other mode's: an in-process call reuses them
    monkeypatch.setattr(matrix_mod, "run", lambda *a, **k: pytest.fail("rerun"))
    assert _matrix(cfg, out, seeds=(0, 1)).executed == []


@pytest.mark.parametrize("args, needle", [
    (["--methods", "finetune,nope"], "--methods: unknown nope"),
    (["--betas", "1,0"], "--betas: Dirichlet beta must be a finite number > 0, got 0"),
    (["--betas", "1,x"], "--betas: expected comma-separated floats"),
    (["--betas", "1,1.0000001"], "would share the run folders '-b1-'"),
    (["--settings", "tasks"], "--settings: unknown tasks"),
    (["--scenarios", "hom,mixed"], "--scenarios: unknown mixed"),
    (["--jobs", "0"], "--jobs"),
    (["--ray", " "], "--ray: expected an address"),
    (["--ray", "local", "--set", "device=cuda:1"], "--ray: device cuda:1"),
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


# -- scripts/findings.py on hand-made results ---------------------------------------------------------------------------
def _cell(method, scenario, last, avg=None, beta=1.0, seed=0, setting="task", **extra):
    params = extra.pop("params", {})
    name = f"{method}-{setting}-{scenario}-b{beta:g}-s{seed}" + "".join(f"-{v}" for v in params.values())
    return {"method": method, "setting": setting, "scenario": scenario, "beta": beta, "seed": seed, "last": last,
            "avg": avg, "forgetting": None, "run_dir": name, "shared": False, "params": params, **extra}


def _write(folder, cells):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "matrix.json").write_text(json.dumps({"cells": cells}))
    return folder


def _hand_made(tmp_path):
    """Numbers chosen so that every verdict is known: (1) yes, (2) not measured (2 of 4 settings), (3) yes, (4) yes, (5) not measured,
    (6) no, (7) no, (8) yes, (9) not measured."""
    cells = []
    for sc, ft, ol, dl in (("hom", (10.0, 12.0), 20.0, 50.0), ("het", (11.0, 13.0), 22.0, 60.0)):
        cells += [_cell("finetune", sc, ft[0], 30.0, seed=0), _cell("finetune", sc, ft[1], 32.0, seed=1),
                  _cell("olora", sc, ol, 35.0, unseen={"AOKVQA": 30.0, "DVQA": 20.0}),
                  _cell("disco", sc, dl, 55.0, params={"tau": 0.9, "variant": "softmax", "identity": "text"},
                        artifacts={"subspaces_formed": 8 if sc == "hom" else 7}, tasks=8,
                        unseen={"AOKVQA": 40.0, "DVQA": 20.0}),
                  _cell("mtl", sc, 70.0), _cell("mtl", sc, 70.0, seed=1), _cell("zeroshot", sc, 1.0)]
    cells += [_cell("finetune", "hom", 8.0, 25.0, beta=0.5), _cell("finetune", "hom", 14.0, 33.0, beta=5.0)]
    # the gate ablation: argmax beats softmax, so the paper's order does not hold
    for v, last in (("argmax", 52.0), ("cosine", 40.0), ("concat", 30.0)):
        cells.append(_cell("disco", "hom", last, 50.0, params={"tau": 0.9, "variant": v, "identity": "text"},
                           artifacts={"subspaces_formed": 8}, tasks=8))
    return _write(tmp_path / "res", cells)


def test_findings_verdicts_on_hand_made_results(tmp_path):
    f = load_script("findings")
    got = {x.number: x for x in f.findings(f.load([_hand_made(tmp_path)]))}
    assert {n: x.verdict for n, x in got.items()} == {1: "yes", 2: "not measured", 3: "yes", 4: "yes", 5: "not measured",
                                                      6: "no", 7: "no", 8: "yes", 9: "not measured"}
    assert "task-hom β=1: 11.0 vs 70.0 (0.16)" in got[1].evidence  # the mean over seeds 10 and 12
    assert "2 of 4 settings measured" in got[2].evidence  # best where measured, not yet in all four
    assert "task-hom β=1: Last 50.0 vs olora 20.0" in got[2].evidence  # at seed 0, the one olora and disco have
    assert "Het +38.0 (vs olora) vs Hom +30.0 (vs olora)" in got[3].evidence  # ablation cells do not count
    assert "argmax 52.0 > softmax 50.0" in got[6].evidence
    assert "1 of 2 runs" in got[7].evidence and "7 for 8 tasks" in got[7].evidence
    assert "disco 30.0 vs olora 25.0" in got[8].evidence


def test_findings_never_guesses_from_missing_cells(tmp_path):
    f = load_script("findings")
    # Hom only, no MTL, no β=0.5: only (2) can be judged, and DISCO loses there.
    cells = [_cell("finetune", "hom", 20.0, 30.0), _cell("disco", "hom", 15.0, 40.0)]
    got = {x.number: x.verdict for x in f.findings(f.load([_write(tmp_path / "r", cells)]))}
    assert got == {1: "not measured", 2: "no", 3: "not measured", 4: "not measured", 5: "not measured",
                   6: "not measured", 7: "not measured", 8: "not measured", 9: "not measured"}


def test_findings_pools_folders_and_prints_markdown(tmp_path):
    main_dir = _write(tmp_path / "main", [_cell("disco", "hom", 50.0, 55.0)])
    image = _write(tmp_path / "image", [_cell("disco", "hom", 45.0, 50.0, params={"identity": "image"})])
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "findings.py"), str(main_dir), str(image),
                        "--markdown"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "| # | finding | fcit evidence | verdict |" and len(lines) == 2 + 9
    row5 = next(ln for ln in lines if ln.startswith("| 5 |"))
    assert "text 50.0 vs image 45.0 over 1 cells" in row5 and row5.endswith("| yes |")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "findings.py"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "not an fcit matrix output" in bad.stderr


def test_findings_counts_a_cell_repeated_in_two_folders_once(tmp_path):
    f = load_script("findings")
    disco = {"params": {"tau": 0.9, "variant": "softmax", "identity": "text"}, "artifacts": {"subspaces_formed": 8},
             "tasks": 8}
    main_dir = _write(tmp_path / "main", [_cell("finetune", "hom", 10.0, 30.0, seed=0),
                                          _cell("finetune", "hom", 20.0, 30.0, seed=1), _cell("mtl", "hom", 70.0),
                                          _cell("mtl", "hom", 70.0, seed=1),
                                          _cell("disco", "hom", 50.0, 55.0, **disco),
                                          _cell("olora", "hom", 30.0, 40.0)])
    # the transfer matrix repeats three seed-0 cells with eval.unseen: their Last must not be counted twice
    transfer = _write(tmp_path / "transfer", [
        _cell("finetune", "hom", 10.0, 30.0, seed=0), _cell("zeroshot", "hom", 5.0, unseen={"AOKVQA": 25.0}),
        _cell("disco", "hom", 50.0, 55.0, unseen={"AOKVQA": 40.0}, **disco),
        _cell("olora", "hom", 30.0, 40.0, unseen={"AOKVQA": 30.0})])
    got = {x.number: x for x in f.findings(f.load([main_dir, transfer]))}
    assert "task-hom β=1: 15.0 vs 70.0" in got[1].evidence  # seeds 0 and 1 once each, not (10 + 20 + 10) / 3
    assert got[7].evidence == "1 of 1 runs"
    assert got[8].verdict == "yes"
    assert got[8].evidence == "disco 40.0 vs olora 30.0 over 1 groups (the base, zero-shot: 25.0)"


def test_findings_compare_on_common_seeds_and_every_baseline(tmp_path):
    f = load_script("findings")
    # Finetune ran three seeds, DISCO and O-LoRA one: DISCO is compared with seed 0's Finetune (10), not with the
    # mean of three draws (20). At beta 5 O-LoRA never ran: that group is left out, not judged on Finetune alone.
    cells = [_cell("finetune", "hom", v, 30.0, seed=s) for s, v in enumerate((10.0, 10.0, 40.0))]
    cells += [_cell("olora", "hom", 5.0, 30.0), _cell("disco", "hom", 15.0, 35.0),
              _cell("finetune", "hom", 50.0, 30.0, beta=5.0), _cell("disco", "hom", 1.0, 35.0, beta=5.0),
              _cell("finetune", "hom", 30.0, 30.0, beta=0.5), _cell("finetune", "hom", 90.0, 30.0, beta=0.5, seed=1)]
    got = {x.number: x for x in f.findings(f.load([_write(tmp_path / "r", cells)]))}
    assert got[2].verdict == "not measured"  # DISCO best in the one setting measured, of four
    assert "task-hom β=1: Last 15.0 vs finetune 10.0" in got[2].evidence
    assert got[2].evidence.endswith("left out, a baseline missing: task-hom β=5 (no olora)")
    # beta: Finetune's seed 0 at both betas (30 - 50), not seed 1's 90 against a beta-5 seed that never ran
    assert got[4].verdict == "yes" and "finetune task-hom: -20.0" in got[4].evidence
    assert "disco task-hom" not in got[4].evidence  # no beta-0.5 DISCO cell


def test_findings_call_ties_ties(tmp_path):
    f = load_script("findings")
    disco = lambda v, last, **k: _cell("disco", "hom", last, 50.0, params={"tau": 0.9, "variant": v,  # noqa: E731
                                                                        "identity": "text"}, **k)
    cells = [disco("softmax", 50.0, unseen={"AOKVQA": 7.0}), disco("argmax", 50.0), disco("cosine", 49.0),
             disco("concat", 30.0), _cell("olora", "hom", 30.0, 40.0, unseen={"AOKVQA": 6.6})]
    got = {x.number: x for x in f.findings(f.load([_write(tmp_path / "r", cells)]))}
    assert got[6].verdict == "no" and got[6].evidence.startswith("softmax 50.0 = argmax 50.0 > cosine 49.0 > concat")
    assert got[8].verdict == "no" and got[8].evidence.endswith("within 1 point, a tie")


def test_activation_ablation_re_evaluates_every_gate_and_feeds_finding_6(small_base, cache_dir, tmp_path, capsys):
    cfg = smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 2})
    res = _matrix(cfg, tmp_path / "mx", methods=("disco",))
    (cell,) = res.cells
    last = load_script("disco_activation_ablation").main([str(tmp_path / "mx" / cell.run_dir),
                                                          "--matrix-out", str(tmp_path / "gates")])
    assert last["softmax"] == [pytest.approx(cell.last)]  # the re-evaluation reproduces the run's own gate
    gates = json.loads((tmp_path / "gates" / "matrix.json").read_text())["cells"]
    assert sorted(c["params"]["variant"] for c in gates) == ["argmax", "concat", "cosine"]
    assert all(c["last"] == pytest.approx(last[c["params"]["variant"]][0]) for c in gates)
    f = load_script("findings")
    (f6,) = [x for x in f.findings(f.load([tmp_path / "mx", tmp_path / "gates"])) if x.number == 6]
    assert f6.verdict in ("yes", "no") and f6.evidence.endswith("over 1 cells")
    assert f"softmax {cell.last:.1f}" in f6.evidence


# -- eval.unseen: zero-shot transfer to the datasets the setting never trains ------------------------------------------
def test_unseen_datasets_are_scored_after_the_last_stage_and_reach_the_matrix(small_base, cache_dir, tmp_path):
    cfg = smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 1, "eval.unseen": True})
    res = _matrix(cfg, tmp_path / "mx")
    for c in res.cells:
        m = json.loads((tmp_path / "mx" / c.run_dir / "metrics.json").read_text())
        assert sorted(m["unseen"]) == ["AOKVQA", "DVQA", "Grounding", "TabMWP"]  # what the Task setting never trains
        assert all(0 <= v <= 100 for v in m["unseen"].values()) and c.unseen == m["unseen"]
        assert not set(m["unseen"]) & set(m["matrix"]["datasets"])  # Last/Avg stay over the trained datasets
        assert "- **Unseen** (never trained): AOKVQA" in (tmp_path / "mx" / c.run_dir / "results.md").read_text()
    cells = json.loads((tmp_path / "mx" / "matrix.json").read_text())["cells"]
    assert all(set(c["unseen"]) == {"AOKVQA", "Grounding", "DVQA", "TabMWP"} for c in cells)
    # Off by default: no key, and the run identity of earlier runs is unchanged (a default is left out of it).
    from fcit.rundir import canonical

    plain = smoke_cfg(small_base, cache_dir, tmp_path)
    assert "eval" not in canonical(plain) or "unseen" not in canonical(plain)["eval"]
    assert canonical(cfg)["eval"]["unseen"] is True


def test_transfer_eval_afterwards_equals_the_evaluations_during_the_run(small_base, cache_dir, tmp_path):
    plain = smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 2})
    during = smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 2, "eval.unseen": True,
                                                           "eval.retention": True})
    ran = {c.method: c for c in _matrix(during, tmp_path / "during", methods=("zeroshot", "finetune")).cells}
    runs = {c.method: tmp_path / "plain" / c.run_dir
            for c in _matrix(plain, tmp_path / "plain", methods=("zeroshot", "finetune")).cells}
    cells = load_script("transfer_eval").main([str(runs["zeroshot"]), str(runs["finetune"]),
                                               "--matrix-out", str(tmp_path / "transfer")])
    got = {c["method"]: c for c in json.loads((tmp_path / "transfer" / "matrix.json").read_text())["cells"]}
    assert got == {c["method"]: c for c in cells} and set(got) == {"zeroshot", "finetune"}
    for m, c in got.items():  # greedy decoding of the same weights: equal, not close
        assert (c["unseen"], c["retention"], c["last"]) == (ran[m].unseen, ran[m].retention, ran[m].last)
    assert got["finetune"]["last_recomputed"] == ran["finetune"].last
    # the final state is what was scored, not the base again (the smoke model scores 0 either way)
    from fcit.models.lora import get_state
    from fcit.rundir import load_checkpoint

    exp, _, _ = load_script("transfer_eval").final_experiment(runs["finetune"])
    saved = load_checkpoint(runs["finetune"], exp.cfg, exp.scenario.num_stages)[0]
    now = get_state(exp.model, list(saved))
    assert all(torch.equal(now[k], saved[k]) for k in saved) and any(k.endswith("lora_B.default.weight") and
                                                                     saved[k].abs().sum() > 0 for k in saved)
    assert json.loads((runs["finetune"] / "transfer.json").read_text()) == {k: v for k, v in got["finetune"].items()
                                                                           if k != "run_dir"}
    assert (tmp_path / "transfer" / got["finetune"]["run_dir"]).resolve() == runs["finetune"].resolve()
    # a second call reuses each run's transfer.json (scoring again is minutes per run on the real matrix) ...
    out = runs["finetune"] / "transfer.json"
    out.write_text(out.read_text().replace('"unseen": {', '"unseen": {"marker": 1.0, ', 1))
    again = load_script("transfer_eval").main([str(runs["finetune"]), "--matrix-out", str(tmp_path / "again")])
    assert again[0]["unseen"] == {"marker": 1.0, **got["finetune"]["unseen"]}
    # ... until the run's metrics change (a resumed run finishes again), or --force asks
    os.utime(runs["finetune"] / "metrics.json", (out.stat().st_mtime + 5,) * 2)
    assert load_script("transfer_eval").main([str(runs["finetune"]), "--matrix-out", str(tmp_path / "again")]
                                             )[0]["unseen"] == got["finetune"]["unseen"]
    out.write_text(out.read_text().replace('"unseen": {', '"unseen": {"marker": 1.0, ', 1))
    os.utime(runs["finetune"] / "metrics.json", (out.stat().st_mtime - 5,) * 2)
    assert load_script("transfer_eval").main([str(runs["finetune"]), "--force", "--matrix-out",
                                              str(tmp_path / "again")])[0]["unseen"] == got["finetune"]["unseen"]
    # ... or the general set it was scored on is not today's
    stale = json.loads(out.read_text())
    assert stale["scored"]["unseen"] == ["AOKVQA", "Grounding", "DVQA", "TabMWP"]
    out.write_text(json.dumps({**stale, "unseen": {"marker": 1.0}, "scored": {**stale["scored"], "general": "0"}}))
    assert load_script("transfer_eval").main([str(runs["finetune"]), "--matrix-out", str(tmp_path / "again")]
                                             )[0]["unseen"] == got["finetune"]["unseen"]


def test_capability_setting_has_no_unseen_dataset():
    from fcit.config import ScenarioConfig
    from fcit.data.scenario import Scenario

    assert Scenario(ScenarioConfig(setting="capability"), 0, None).unseen == []
    assert Scenario(ScenarioConfig(setting="task"), 0, None).unseen == ["AOKVQA", "Grounding", "DVQA", "TabMWP"]
