"""The environment record (``fcit.environment``) and how ``fcit compare`` flags runs from different environments.

Nothing here trains: the compare tests build finished run folders by hand (config.json + metrics.json), which
compare reuses without loading a model. The record of a real run and of a resumed one is checked in
test_experiment.py (``test_run_records_its_environment_and_resume_appends``).
"""

import copy
import json
import time

from fcit import environment
from fcit.config import load_config
from fcit.eval.metrics import AccuracyMatrix
from fcit.jsonio import write_json
from fcit.results import RunResult, Summary


def test_the_record_has_every_field_and_is_strict_json():
    import torch  # a run has imported it; the record reads its threads and GPUs only then

    t0 = time.perf_counter()
    rec = environment.record(device="cpu", workers=2, worker_threads=1)
    assert time.perf_counter() - t0 < 2.0  # < 0.1 s on the 2-core machine under load; generous for CI
    assert set(rec) == {"time", "fcit", "python", "platform", "cpu", "threads", "device", "gpu", "packages"}
    assert rec["time"].endswith("Z") and rec["python"].count(".") == 2
    assert set(rec["fcit"]) == {"version", "commit", "dirty"} and rec["fcit"]["version"]
    assert rec["cpu"]["cores"] >= 1 and rec["threads"] == {"torch": torch.get_num_threads(), "workers": 2,
                                                           "worker_threads": 1, "compiled": None}
    assert set(rec["packages"]) == set(environment.PACKAGES) and rec["packages"]["torch"]
    assert (rec["gpu"] is None) == (not torch.cuda.is_available())
    assert json.loads(json.dumps(rec, allow_nan=False)) == rec
    k = environment.key(rec)
    assert list(k) == list(environment.COMPARED) and k["threads"] == f"{torch.get_num_threads()} (pool 2x1)"
    # compiled layers round differently, as other threads do: a table mixing both is flagged
    compiled = environment.key(environment.record(device="cpu", workers=2, worker_threads=1, compiled=True))
    assert compiled["threads"] == f"{torch.get_num_threads()} (pool 2x1), compiled"
    assert environment.differences([k, compiled]) == [f"threads {k['threads']} vs {compiled['threads']}"]


def test_gpus_and_cuda_in_the_key():
    rec = environment.record(device="cuda:0")
    rec["gpu"] = {"cuda": "12.4", "devices": ["NVIDIA H200", "NVIDIA H200"]}
    k = environment.key(rec)
    assert (k["gpu"], k["cuda"], k["device"]) == ("2 x NVIDIA H200", "12.4", "cuda:0")
    rec["gpu"] = None
    assert (environment.key(rec)["gpu"], environment.key(rec)["cuda"]) == ("none", "none")


def test_outside_a_git_checkout_the_commit_is_null(monkeypatch, tmp_path):
    import fcit

    pkg = tmp_path / "site-packages" / "fcit"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(fcit, "__file__", str(pkg / "__init__.py"))
    assert environment.fcit_source() == {"version": fcit.__version__, "commit": None, "dirty": None}
    assert environment.key(environment.record())["fcit"] == f"{fcit.__version__} (not a git checkout)"


def test_a_probe_that_fails_is_null_not_an_error(monkeypatch):
    def broken():
        raise RuntimeError("no /proc here")

    monkeypatch.setattr(environment, "cpu_model", broken)
    monkeypatch.setattr(environment, "fcit_source", broken)
    rec = environment.record()
    assert rec["cpu"]["model"] is None and rec["fcit"]["commit"] is None


def test_append_keeps_every_start_and_survives_a_damaged_file(tmp_path):
    a, b = {"n": 1}, {"n": 2}
    assert environment.append(tmp_path, a) == ([a], None)
    assert environment.append(tmp_path, b) == ([a, b], None)
    assert environment.read_records(tmp_path) == [a, b]
    assert environment.append(tmp_path, a, fresh=True)[0] == [a]
    (tmp_path / environment.FILE).write_text('[{"n": ')
    records, warning = environment.append(tmp_path, b)
    assert records == [b] and "damaged" in warning and (tmp_path / "environment.json.damaged").exists()
    assert environment.read_records(tmp_path) == [b]


def _rec(**packages):
    rec = environment.record(device="cpu", workers=1)
    rec["packages"].update(packages)
    return rec


def test_resume_note_names_what_changed():
    a = _rec(torch="2.13.0")
    later = copy.deepcopy(a)
    later["time"] = "2030-01-01T00:00:00Z"  # the time is not part of the environment
    assert environment.resume_note([a]) is None and environment.resume_note([a, later]) is None
    b = copy.deepcopy(a)
    b["packages"]["torch"], b["cpu"]["model"] = "2.11.0", "Other CPU"
    note = environment.resume_note([a, b])
    assert "cpu " in note and "torch 2.13.0 vs 2.11.0" in note


# -- compare ------------------------------------------------------------------------------------------------------------
def _finished_run(out, seed, records):
    """A finished run folder as compare reuses it: its config, its metrics and (if given) its environment."""
    d = out / f"finetune-s{seed}"
    d.mkdir(parents=True)
    cfg = load_config(preset="smoke", overrides={"seed": seed, "method.name": "finetune"})
    write_json(d / "config.json", cfg.model_dump(mode="json"))
    m = AccuracyMatrix(datasets=[], rows=[])
    m.add_stage({"ImageNet-R": 40.0 + seed})
    result = RunResult(method="finetune", scenario="task-hom", seed=seed, matrix=m,
                       summary=Summary(last=40.0 + seed, avg=40.0 + seed, forgetting=None), per_dataset=[],
                       rounds=[], timing={"total": 1.0},
                       environment=environment.summary(records) if records else None)
    write_json(d / "metrics.json", result.to_dict())
    if records:
        write_json(d / environment.FILE, records)


def _compare(out, monkeypatch):
    """compare over the two hand-made runs: everything is finished, so nothing trains and no model is loaded."""
    import fcit.compare as compare_mod

    def no_training(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(compare_mod, "run", no_training)
    monkeypatch.setattr(compare_mod.Runtime, "build", no_training)
    cfg = load_config(preset="smoke", overrides={"method.name": "finetune"})
    return compare_mod.compare(cfg, ["finetune"], [0, 1], out=out, progress=False)


def test_compare_flags_runs_from_different_environments(tmp_path, capsys, monkeypatch):
    a = _rec(torch="2.13.0")
    b = copy.deepcopy(a)
    b["packages"]["torch"], b["threads"]["torch"] = "2.11.0", 7
    _finished_run(tmp_path, 0, [a])
    _finished_run(tmp_path, 1, [b])
    out, table = _compare(tmp_path, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: compare: runs come from 2 environments:"), err
    assert "torch 2.13.0 vs 2.11.0" in err[0] and "threads" in err[0]
    md = (out / "table.md").read_text()
    assert md == table and "| finetune |" in md
    assert "Note: runs come from 2 environments: threads" in md and "torch 2.13.0 vs 2.11.0" in md
    assert "- environment 1 (threads " in md and ": finetune-s0" in md and ": finetune-s1" in md
    res = json.loads((out / "results.json").read_text())
    assert res["environment_note"][0].startswith("runs come from 2 environments")
    assert set(res["environments"]) == {"finetune-s0", "finetune-s1"}


def test_compare_does_not_flag_one_environment(tmp_path, capsys, monkeypatch):
    a = _rec()
    later = copy.deepcopy(a)
    later["time"] = "2030-01-01T00:00:00Z"
    _finished_run(tmp_path, 0, [a])
    _finished_run(tmp_path, 1, [a, later])  # resumed later, same machine and versions
    out, table = _compare(tmp_path, monkeypatch)
    assert capsys.readouterr().err == ""
    assert "Note" not in table and "environment" not in (out / "table.md").read_text()
    assert json.loads((out / "results.json").read_text())["environment_note"] == []


def test_compare_says_when_a_run_has_no_record(tmp_path, capsys, monkeypatch):
    _finished_run(tmp_path, 0, [_rec()])
    _finished_run(tmp_path, 1, None)  # metrics.json of an fcit that recorded no environment
    out, _ = _compare(tmp_path, monkeypatch)
    assert "1 of 2 runs have no environment record" in capsys.readouterr().err
    assert "finetune-s1" in (out / "table.md").read_text()
    # The metrics without an environment still load, and write back as they were.
    d = json.loads((tmp_path / "finetune-s1" / "metrics.json").read_text())
    assert "environment" not in d and RunResult.from_dict(d).to_dict() == d
