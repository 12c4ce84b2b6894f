"""Issue 12, "nothing lost, nothing false": every observed fault is a one-line ``fcit: error:`` with exit status 2
(or documented behaviour), and the run directory keeps its last good state and says how the run ended.

Runs use the embedded base on a 16-sample FCIT-Synth; one diverging 2-stage run (lr=1000) is shared by the resume
tests, which each damage a copy of it.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from fcit import rundir
from fcit.cli import main
from fcit.errors import FcitError
from fcit.training.guard import TrainingDiverged, check_stage_progress, check_update


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synth-cache")


SMALL = ["--set", "data.synth.n_train=16", "--set", "data.synth.n_test=5", "--set", "eval.max_test=4",
         "--set", "threads=1"]


@pytest.fixture(scope="module")
def small(data_root):
    """Config options of a seconds-long smoke run (2 stages x 2 rounds, 2 of 4 clients)."""
    return ["--preset", "smoke", "--set", f"data.root={data_root}", *SMALL]


def fcit(capsys, *args) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit status, the error line) and checks there is exactly one error line."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("fcit:")]
    if rc == 2:
        assert len(errors) == 1 and errors[0].startswith("fcit: error: "), err
        return rc, errors[0]
    return rc, err


def strict_json(path: Path):
    def refuse(token):
        raise AssertionError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def all_json_is_strict(run_dir: Path) -> None:
    for p in run_dir.rglob("*.json"):
        strict_json(p)


# -- training guard ----------------------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_naming_stage_round_and_client(capsys, small, tmp_path):
    rc, err = fcit(capsys, "run", *small, "--set", "train.lr=1e30", "--out", tmp_path, "--name", "nan", "--quiet")
    # One local step per client: round 1 moves the weights to ~1e30 (finite), round 2's first step is NaN.
    assert rc == 2 and re.search(r"error: stage 1 round \d client \d+: loss is nan at local step 1;", err), err
    run_dir = tmp_path / "nan"
    st = strict_json(run_dir / "status.json")
    assert st["status"] == "failed" and "loss is nan" in st["reason"]
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "metrics.json").exists()
    all_json_is_strict(run_dir)

    # The same name again (another seed) is refused instead of mixing two runs in one directory.
    rc, err = fcit(capsys, "run", *small, "--seed", 1, "--out", tmp_path, "--name", "nan", "--quiet")
    assert rc == 2 and "already holds a run (failed" in err and "--resume" in err, err


@pytest.fixture(scope="module")
def stuck(small, tmp_path_factory):
    """lr=1000: stage 1's loss falls once and saturates (every answer empty); stage 2's never moves."""
    import io
    from contextlib import redirect_stderr

    out = tmp_path_factory.mktemp("stuck")
    buf = io.StringIO()
    with redirect_stderr(buf):
        rc = main(["run", *small, "--set", "train.lr=1000", "--out", str(out), "--name", "run", "--quiet"])
    return rc, buf.getvalue(), out / "run"


def test_stuck_stage_fails_and_keeps_the_last_good_checkpoint(stuck):
    rc, err, run_dir = stuck
    assert rc == 2 and "fcit: error: stage 2: the loss stayed at" in err, err
    assert strict_json(run_dir / "status.json")["status"] == "failed"
    manifest = strict_json(run_dir / "checkpoint" / "manifest.json")
    progress = strict_json(run_dir / "checkpoint" / "progress.json")
    assert manifest["next_stage"] == progress["next_stage"] == 1
    assert progress["warnings"] == ["after stage 1: ImageNet-R: all 4 predictions are empty"]
    all_json_is_strict(run_dir)


def _copy(stuck, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(stuck[2], d)
    return d


def test_finishing_a_run_prints_its_warnings_and_keeps_its_total_time(capsys, stuck, tmp_path):
    d = _copy(stuck, tmp_path)
    before = strict_json(d / "checkpoint" / "progress.json")["timing"]["total"]
    cfg = strict_json(d / "config.json")
    cfg["scenario"]["stages"] = 1  # the number of stages may change on resume; stage 1 is done, so results follow
    (d / "config.json").write_text(json.dumps(cfg))
    rc, err = fcit(capsys, "run", "--resume", d, "--quiet")
    assert rc == 0 and "warning: after stage 1: ImageNet-R: all 4 predictions are empty" in err, err
    m = strict_json(d / "metrics.json")
    assert m["warnings"] == ["after stage 1: ImageNet-R: all 4 predictions are empty"]
    assert m["timing"]["total"] >= before > 0
    assert strict_json(d / "status.json")["status"] == "finished"
    all_json_is_strict(d)

    # compare asked to reuse this finished run with a truncated metrics.json: one line, nothing rerun or lost.
    cmp = tmp_path / "cmp"
    shutil.copytree(d, cmp / "finetune-s0")
    (cmp / "finetune-s0" / "metrics.json").write_text('{"matrix": ')
    rc, err = fcit(capsys, "compare", "--config", d / "config.json", "--methods", "finetune", "--seeds", "0",
                   "--out", cmp, "--quiet")
    assert rc == 2 and "finetune-s0/metrics.json" in err and "damaged" in err, err


# -- resume ------------------------------------------------------------------------------------------------------------
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _next_stage_3(d: Path) -> None:
    m = strict_json(d / "checkpoint" / "manifest.json")
    m["next_stage"] = 3
    (d / "checkpoint" / "manifest.json").write_text(json.dumps(m))


def _other_seed(d: Path) -> None:
    c = strict_json(d / "config.json")
    c["seed"] = 5
    (d / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("damage, needle", [
    (lambda d: _truncate(d / "checkpoint" / "state.safetensors"), "state.safetensors: damaged"),
    (lambda d: (d / "checkpoint" / "state.safetensors").unlink(), "state.safetensors: missing"),
    (lambda d: _truncate(d / "checkpoint" / "progress.json"), "progress.json: damaged"),
    (lambda d: _truncate(d / "config.json"), "config.json (the run's config): damaged"),
    (lambda d: (d / "checkpoint" / "manifest.json").unlink(), "without manifest.json"),
    (_other_seed, "made with another configuration"),
    (_next_stage_3, "next stage 3 is outside this run's 1..2 stages"),
], ids=["state-truncated", "state-missing", "progress-truncated", "config-truncated", "no-manifest", "other-config",
        "next-stage-beyond"])
def test_resume_refuses_a_damaged_or_foreign_checkpoint(capsys, stuck, tmp_path, damage, needle):
    d = _copy(stuck, tmp_path)
    damage(d)
    rc, err = fcit(capsys, "run", "--resume", d, "--quiet")
    assert rc == 2 and needle in err, err
    assert strict_json(d / "status.json")["status"] == "failed"


def test_resume_refuses_options_it_cannot_honour(capsys, stuck, tmp_path):
    d = _copy(stuck, tmp_path)
    rc, err = fcit(capsys, "run", "--resume", d, "--method", "disco", "--set", "train.lr=5",
                   "--set", "scenario.betta=1", "--seed", 7)
    assert rc == 2, err
    for given in ("--set train.lr=5", "--set scenario.betta=1", "--method disco", "--seed 7"):
        assert given in err, err


def test_a_run_directory_in_use_is_refused(capsys, small, tmp_path):
    d = tmp_path / "busy"
    d.mkdir()
    with rundir.locked(d):
        rc, err = fcit(capsys, "run", *small, "--out", tmp_path, "--name", "busy", "--quiet")
    assert rc == 2 and "is in use by another fcit process" in err, err


def test_checkpoint_crash_between_writes_leaves_a_consistent_pair(stuck, tmp_path, monkeypatch):
    from fcit.config import Config

    d = _copy(stuck, tmp_path)
    cfg = rundir.read_config(d)
    good = rundir.load_checkpoint(d, cfg, 2)
    assert good is not None
    state, method_state, progress = good

    # A crash before the manifest: new files half-written as *.tmp, the previous pair still verifies.
    real = rundir.write_json

    def crash_on_manifest(path, obj, **kw):
        if Path(path).name == rundir.MANIFEST_FILE:
            raise KeyboardInterrupt
        return real(path, obj, **kw)

    monkeypatch.setattr(rundir, "write_json", crash_on_manifest)
    bumped = {k: v + 1 for k, v in state.items()}
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint(d, cfg, bumped, method_state, {**progress, "next_stage": 2})
    monkeypatch.setattr(rundir, "write_json", real)
    again = rundir.load_checkpoint(d, cfg, 2)
    assert again[2]["next_stage"] == 1 and all(torch.equal(again[0][k], state[k]) for k in state)

    # A crash after the manifest, before the renames: the complete *.tmp files are rolled forward.
    real_replace = rundir.os.replace
    calls = []

    def crash_on_first_rename(src, dst):
        if Path(dst).name == rundir.STATE_FILE and not calls:
            calls.append(src)
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", crash_on_first_rename)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint(d, cfg, bumped, method_state, {**progress, "next_stage": 2})
    monkeypatch.setattr(rundir.os, "replace", real_replace)
    rolled = rundir.load_checkpoint(d, cfg, 2)
    assert rolled[2]["next_stage"] == 2 and all(torch.equal(rolled[0][k], bumped[k]) for k in state)
    assert isinstance(cfg, Config)


def test_interrupt_names_the_real_run_directory(capsys, small, tmp_path, monkeypatch):
    import fcit.experiment as experiment

    def interrupted(self, resume=False):
        (self.run_dir / "config.json").write_text(self.cfg.model_dump_json())  # the run had begun
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment.Experiment, "run", interrupted)
    rc, err = fcit(capsys, "run", *small, "--out", tmp_path, "--name", "int", "--quiet")
    assert rc == 130 and f"fcit run --resume {tmp_path / 'int'}`" in err and "RUN_DIR" not in err, err
    st = strict_json(tmp_path / "int" / "status.json")
    assert st["status"] == "failed" and "interrupted" in st["reason"]


def test_a_run_stopped_before_it_began_is_started_again_by_the_same_command(capsys, small, tmp_path, monkeypatch):
    # Ctrl-C while the model or the data load leaves status.json and no config.json: --resume has nothing to read,
    # so the message says to rerun, and the rerun is not refused for the directory's status.json.
    import fcit.experiment as experiment

    real = experiment.Experiment.run

    def interrupted(self, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment.Experiment, "run", interrupted)
    args = ("run", *small, "--set", "scenario.stages=1", "--out", tmp_path, "--name", "early", "--quiet")
    rc, err = fcit(capsys, *args)
    assert rc == 130 and "before the run began; nothing to resume: run the same command again" in err, err
    assert "--resume" not in err and strict_json(tmp_path / "early" / "status.json")["status"] == "failed"
    assert not (tmp_path / "early" / "config.json").exists()

    monkeypatch.setattr(experiment.Experiment, "run", real)
    rc, err = fcit(capsys, *args)
    assert rc == 0, err
    assert strict_json(tmp_path / "early" / "status.json")["status"] == "finished"
    assert (tmp_path / "early" / "metrics.json").exists()


def test_sigterm_stops_a_run_as_ctrl_c_does(capsys, small, tmp_path, monkeypatch):
    # A scheduler's time limit sends SIGTERM: the run must say it was stopped and what to resume, not die "running".
    import os
    import signal
    import time

    import fcit.experiment as experiment

    def killed(self, resume=False):
        (self.run_dir / "config.json").write_text(self.cfg.model_dump_json())  # the run had begun
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, at the next bytecode
        raise AssertionError("SIGTERM did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(experiment.Experiment, "run", killed)
    rc, err = fcit(capsys, "run", *small, "--out", tmp_path, "--name", "term", "--quiet")
    assert rc == 143 and "terminated (SIGTERM)" in err and f"fcit run --resume {tmp_path / 'term'}`" in err, err
    st = strict_json(tmp_path / "term" / "status.json")
    assert st["status"] == "failed" and st["reason"] == "interrupted (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


def test_zero_client_weights_name_stage_round_and_clients(capsys, small, tmp_path, monkeypatch):
    import dataclasses

    import fcit.engines.inprocess as engine

    real = engine.client_update
    monkeypatch.setattr(engine, "client_update", lambda *a, **k: dataclasses.replace(real(*a, **k), num_samples=0))
    rc, err = fcit(capsys, "run", *small, "--out", tmp_path, "--name", "zero", "--quiet")
    assert rc == 2 and "client weights sum to zero" in err and "stage 1 round 1, clients " in err, err


# -- models ------------------------------------------------------------------------------------------------------------
def test_checkpoint_with_misnamed_weights_is_refused(capsys, small, tmp_path):
    from safetensors.torch import load_file, save_file

    from fcit.models.backbone import EMBEDDED_DIR, load_backbone

    d = tmp_path / "model"
    shutil.copytree(EMBEDDED_DIR, d)
    w = load_file(str(d / "model.safetensors"))
    key = next(k for k in sorted(w) if "layers.0.mlp.up_proj" in k)
    w[key.replace("up_proj", "upp_proj")] = w.pop(key)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    rc, err = fcit(capsys, "run", *small, "--set", f"model.path={d}", "--out", tmp_path, "--quiet")
    assert rc == 2 and "missing weights for 1 parameters" in err and "up_proj" in err and "upp_proj" in err, err
    assert not list(tmp_path.glob("*/checkpoint"))
    model, _ = load_backbone(str(d), allow_missing=True)  # asked for: a partial checkpoint loads
    assert model is not None


# -- data validated before stage 1 -------------------------------------------------------------------------------------
@pytest.fixture()
def real_copy(capsys, small, data_root, tmp_path):
    """The small FCIT-Synth as a `data.kind: real` release in a folder of its own."""
    assert fcit(capsys, "data", "check", *small, "--quiet")[0] == 0  # builds the synth cache if needed
    src = next(p for p in Path(data_root).iterdir() if (p / "instructions").is_dir())
    root = tmp_path / "release"
    shutil.copytree(src, root)
    return root, ["--preset", "smoke", "--set", "data.kind=real", "--set", f"data.root={root}", *SMALL]


def _file(root: Path, dataset: str, split: str) -> Path:
    from fcit.data import registry

    spec = registry.get(dataset)
    return root / "instructions" / spec.folder / (spec.train_file if split == "train" else spec.test_file)


def _break_record(root: Path):
    f = _file(root, "ArxivQA", "train")
    recs = json.loads(f.read_text())
    del recs[3]["conversations"]
    f.write_text(json.dumps(recs))
    return f"{f}: record 3", "missing field 'conversations'"


def _garbage_image(root: Path, split: str, dataset: str):
    f = _file(root, dataset, split)
    rec = json.loads(f.read_text())[2]
    img = root / rec["image"]
    img.write_bytes(b"not an image at all")
    rid = rec.get("id", rec.get("question_id"))
    return f"{f}: record 2 (id {rid}): field 'image': cannot decode {img}",


@pytest.mark.parametrize("damage", [
    _break_record,
    lambda r: (shutil.rmtree(_file(r, "ArxivQA", "train").parent), (f"{_file(r, 'ArxivQA', 'train')}: file not found",))[1],
    lambda r: _garbage_image(r, "train", "ArxivQA"),
    lambda r: _garbage_image(r, "test", "ImageNet-R"),
], ids=["stage2-record", "stage2-folder-missing", "stage2-train-image", "stage1-test-image"])
def test_bad_data_of_any_stage_fails_before_stage_1_trains(capsys, real_copy, tmp_path, damage):
    root, args = real_copy
    needles = damage(root)
    rc, err = fcit(capsys, "data", "check", *args, "--quiet")
    assert rc == 2 and all(n in err for n in needles), err
    rc, err = fcit(capsys, "run", *args, "--out", tmp_path / "runs", "--name", "r", "--quiet")
    assert rc == 2 and all(n in err for n in needles), err
    assert not (tmp_path / "runs" / "r" / "checkpoint").exists()


def test_data_check_summarises_a_good_release(capsys, real_copy):
    root, args = real_copy
    rc, out = main(["data", "check", *args, "--quiet"]), capsys.readouterr().out
    assert rc == 0 and "ImageNet-R" in out and "ArxivQA" in out and "OK: 2 datasets" in out, out


# -- input errors that used to be tracebacks ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["run", "--seed", "-1"], "config: seed: Input should be greater than or equal to 0"),
    (["run", "--seed", str(2**64)], "config: seed: Input should be less than or equal to"),
    (["run", "--set", "scenario.beta=Infinity"], "scenario.beta: Input should be a finite number"),
    (["compare", "--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    (["compare", "--methods", "finetune", "--aggregators", "fedavg,nosuch"], "federation.aggregator"),
])
def test_bad_input_is_one_line(capsys, tmp_path, args, needle):
    rc, err = fcit(capsys, *args, "--out", tmp_path / "o")
    assert rc == 2 and needle in err, err


def test_yaml_error_names_its_line(capsys, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: 1\n bad: [\n")
    rc, err = fcit(capsys, "run", "--config", f)
    assert rc == 2 and "line 3" in err, err


def test_unwritable_out_and_checkpoint_are_one_line(capsys, small, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, err = fcit(capsys, "run", *small, "--out", blocker / "sub", "--quiet")
    assert rc == 2 and "cannot create the run directory" in err, err

    from fcit.config import load_config

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint").write_text("")  # a file where the folder must go
    with pytest.raises(FcitError, match="cannot write the checkpoint"):
        rundir.save_checkpoint(tmp_path / "r", load_config(), {"a": torch.zeros(1)}, {}, {"next_stage": 1})


def test_json_writer_refuses_nan_and_infinity(tmp_path):
    with pytest.raises(FcitError, match=r"non-finite number .* at rows\.1\.x"):
        rundir.write_json(tmp_path / "m.json", {"rows": [{"x": 1.0}, {"x": float("nan")}]})
    with pytest.raises(FcitError, match="at loss"):
        rundir.write_json(tmp_path / "m.json", {"loss": float("inf")})
    assert not (tmp_path / "m.json").exists()


# -- the guard's pure checks -------------------------------------------------------------------------------------------
def test_check_update_and_stage_progress():
    good = {"w": torch.ones(3), "steps": torch.tensor([1])}
    check_update(0.5, good, "here")
    with pytest.raises(TrainingDiverged, match="stage 2 round 3 client 17: loss is nan"):
        check_update(float("nan"), good, "stage 2 round 3 client 17")
    with pytest.raises(TrainingDiverged, match="client 1: non-finite values in w"):
        check_update(0.5, {"w": torch.tensor([1.0, float("inf")])}, "client 1")
    check_stage_progress([2.0, 1.5, 1.4], "stage 1")
    check_stage_progress([1e-5, 1.2e-5], "stage 1")  # converged near 0 is not stuck
    check_stage_progress([3.0], "stage 1")  # nothing to compare with
    with pytest.raises(TrainingDiverged, match="stage 4: the loss stayed at 6.9431"):
        check_stage_progress([6.943122, 6.943121, 6.943122], "stage 4")
