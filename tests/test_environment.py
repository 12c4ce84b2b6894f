"""The environment record (``fcit.environment``)."""

import copy
import json
import time

from fcit import environment


def test_the_record_has_every_field_and_is_strict_json():
    import torch  # a run has imported it; the record reads its threads and GPUs only then

    t0 = time.perf_counter()
    rec = environment.record(device="cpu", workers=2, worker_threads=1)
    assert time.perf_counter() - t0 < 2.0  # < 0.1 s on the 2-core machine under load; generous for CI
    assert set(rec) == {"time", "fcit", "python", "platform", "cpu", "threads", "device", "gpu", "packages"}
    assert rec["time"].endswith("Z") and rec["python"].count(".") == 2
    assert set(rec["fcit"]) == {"version", "commit", "dirty"} and rec["fcit"]["version"]
    assert rec["cpu"]["cores"] >= 1 and rec["threads"] == {"torch": torch.get_num_threads(), "workers": 2,
                                                           "worker_threads": 1}
    assert set(rec["packages"]) == set(environment.PACKAGES) and rec["packages"]["torch"]
    assert (rec["gpu"] is None) == (not torch.cuda.is_available())
    assert json.loads(json.dumps(rec, allow_nan=False)) == rec
    k = environment.key(rec)
    assert list(k) == list(environment.COMPARED) and k["threads"] == f"{torch.get_num_threads()} (pool 2x1)"


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
