"""End-to-end runs of the in-process engine on the smoke setting, through the same code as `fcit run`."""

import json
import subprocess
import sys

import pytest
import torch

from fcit.config import load_config
from fcit.errors import FcitError
from fcit.launch import run as _run
from fcit.methods import REGISTRY


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fcit-cache")


@pytest.fixture(scope="session")
def small_base(tmp_path_factory, cache_dir):
    """`fcit pretrain` at a small size: the real pre-training path, in seconds."""
    from fcit.pretrain import pretrain

    out = tmp_path_factory.mktemp("base")
    cfg = load_config(preset="smoke", overrides={"data.root": str(cache_dir), "data.synth.n_pretrain": 48,
                                                 "data.synth.n_instruct": 36})
    pretrain(cfg, out, epochs=1, progress=False, instruct_epochs=1)
    meta = json.loads((out / "fcit_pretrain.json").read_text())
    assert meta["samples"] == 48 and meta["epochs"] == 1
    assert meta["instruct"]["samples"] == 36 and meta["instruct"]["frozen"] == "vision_tower"
    return out


def smoke_cfg(base, cache_dir, tmp_path, **over):
    o = {"model.path": str(base), "data.root": str(cache_dir), "out_dir": str(tmp_path)}
    o.update(over)
    return load_config(preset="smoke", overrides=o)


def test_smoke_run_writes_the_run_directory(small_base, cache_dir, tmp_path):
    run_dir, m = run(smoke_cfg(small_base, cache_dir, tmp_path), tmp_path / "ft", progress=False)
    for f in ("config.json", "metrics.json", "results.md", "matrix.png", "checkpoint/state.safetensors"):
        assert (run_dir / f).is_file(), f
    assert m["matrix"]["datasets"] == ["ImageNet-R", "ArxivQA"]
    assert [sorted(r) for r in m["matrix"]["rows"]] == [["ImageNet-R"], ["ArxivQA", "ImageNet-R"]]
    assert set(m["summary"]) >= {"last", "avg", "forgetting"}
    assert len(m["rounds"]) == 2 * 2 and all(r["bytes_up"] > 0 and len(r["clients"]) == 2 for r in m["rounds"])
    assert set(m["timing"]) >= {"train", "eval", "aggregation", "other", "total"}
    assert "After stage 2" in (run_dir / "results.md").read_text()
    with pytest.raises(Exception, match="already holds a finished run"):
        run(smoke_cfg(small_base, cache_dir, tmp_path), tmp_path / "ft", progress=False)


def run(*args, **kwargs):
    """``fcit.launch.run`` with the result in its metrics.json form, which these tests check."""
    run_dir, result = _run(*args, **kwargs)
    return run_dir, result.to_dict()


def _rounds(m):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in m["rounds"]]


def _without_timing(m):
    # wall times (the run's breakdown and each round's) are the only thing a rerun may change
    return {**{k: v for k, v in m.items() if k not in ("timing", "rounds")}, "rounds": _rounds(m)}


def test_same_seed_same_metrics_and_resume_continues(small_base, cache_dir, tmp_path):
    cfg = smoke_cfg(small_base, cache_dir, tmp_path)
    _, a = run(cfg, tmp_path / "a", progress=False)
    _, b = run(cfg, tmp_path / "b", progress=False)
    assert _without_timing(a) == _without_timing(b)
    c = _crash_after_stage_1_and_resume(small_base, cache_dir, tmp_path, tmp_path / "c")
    assert c["matrix"] == a["matrix"] and _rounds(c) == _rounds(a)


def _crash_after_stage_1_and_resume(small_base, cache_dir, tmp_path, run_dir, **overrides):
    """A smoke run that crashed after stage 1 (only the stage-1 checkpoint kept), resumed to the end: its metrics."""
    cfg = smoke_cfg(small_base, cache_dir, tmp_path, **overrides)
    run(smoke_cfg(small_base, cache_dir, tmp_path, **overrides, **{"scenario.stages": 1}), run_dir, progress=False)
    (run_dir / "metrics.json").unlink()
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    return run(cfg, run_dir, progress=False, resume=True)[1]


def test_a_resumed_run_keeps_the_bias_corrected_server_optimizers_counts(small_base, cache_dir, tmp_path):
    # The counts are part of the server optimizer's state: a resume that lost them would take stage 2's first steps
    # as a fresh slot's and drift from the uninterrupted run.
    opt = {"federation.aggregator": "fedadam", "federation.bias_correction": True, "federation.server_lr": 0.01}
    _, a = run(smoke_cfg(small_base, cache_dir, tmp_path, **opt), tmp_path / "a", progress=False)
    c = _crash_after_stage_1_and_resume(small_base, cache_dir, tmp_path, tmp_path / "c", **opt)
    assert c["matrix"] == a["matrix"] and _rounds(c) == _rounds(a)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "c" / "checkpoint" / "state.safetensors")
    assert any(k.startswith("method/server_opt/t::") for k in saved)


def test_run_records_its_environment_and_resume_appends(small_base, cache_dir, tmp_path):
    from fcit import environment

    cfg = smoke_cfg(small_base, cache_dir, tmp_path, threads=1)
    one = smoke_cfg(small_base, cache_dir, tmp_path, threads=1, **{"scenario.stages": 1})
    d = tmp_path / "env"
    _, m = run(one, d, progress=False)
    (rec,) = json.loads((d / "environment.json").read_text())
    assert rec["device"] == "cpu" and rec["threads"]["torch"] == 1 and rec["packages"]["torch"]
    assert m["environment"] == {"file": "environment.json", "starts": 1, "environments": [environment.key(rec)]}
    # Resumed "on another machine": the first start's record says another torch; the resume appends its own record
    # and warns about the change.
    (d / "metrics.json").unlink()
    (d / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    rec["packages"]["torch"] = "2.11.0"
    (d / "environment.json").write_text(json.dumps([rec]))
    _, m = run(cfg, d, progress=False, resume=True)
    first, second = json.loads((d / "environment.json").read_text())
    assert first == rec and second["packages"]["torch"] != "2.11.0" and second["time"] >= first["time"]
    assert m["environment"]["starts"] == 2 and len(m["environment"]["environments"]) == 2
    assert any(w.startswith("this run was resumed in another environment") and "torch 2.11.0 vs" in w
               for w in m["warnings"]), m["warnings"]


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_registered_method_completes_a_smoke_run(small_base, cache_dir, tmp_path, method):
    _, m = run(smoke_cfg(small_base, cache_dir, tmp_path, **{"method.name": method}), tmp_path / method,
               progress=False)
    assert m["method"] == method
    if REGISTRY[method].continual:
        assert len(m["matrix"]["rows"]) == 2 and m["summary"]["avg"] is not None
    else:
        # One final model, evaluated once on every dataset: Last only, Avg and forgetting not applicable.
        assert len(m["matrix"]["rows"]) == 1 and sorted(m["matrix"]["rows"][0]) == ["ArxivQA", "ImageNet-R"]
        assert m["summary"]["avg"] is None and m["summary"]["forgetting"] is None
        assert m["summary"]["last"] == sum(m["matrix"]["rows"][0].values()) / 2
    if REGISTRY[method].kind != "federated":
        assert m["rounds"] == []


def test_federated_mtl_is_one_stage_over_the_union_with_one_stages_rounds(small_base, cache_dir, tmp_path):
    run_dir, m = run(smoke_cfg(small_base, cache_dir, tmp_path, **{"method.name": "mtl-fed"}), tmp_path / "mf",
                     progress=False)
    # smoke: 2 stages x 2 rounds of 2 clients; the union stage has one stage's 2 rounds, every client on the union
    # task, each holding both tasks' shares (the continual run's sample budget)
    assert [(r["stage"], r["round"]) for r in m["rounds"]] == [(0, r) for r in range(2)]
    assert all(len(r["clients"]) == 2 and r["tasks"] == [0, 0] for r in m["rounds"])
    assert m["scenario"] == "task-hom-union" and m["matrix"]["datasets"] == ["ImageNet-R", "ArxivQA"]
    assert len(m["matrix"]["rows"]) == 1 and m["summary"]["avg"] is None and m["summary"]["forgetting"] is None
    md = (run_dir / "results.md").read_text()
    assert "| Final model |" in md and "**Avg**: n/a" in md
    # a union client holds both datasets' samples, partitioned like any stage
    from fcit.data.loader import open_benchmark
    from fcit.data.scenario import Scenario

    cfg = smoke_cfg(small_base, cache_dir, tmp_path)
    sc = Scenario(cfg.scenario, cfg.seed, open_benchmark(cfg, progress=False), union=True)
    assert sum(len(sh) for sh in sc.shares(0)) == 2 * 40
    assert m["rounds"][0]["samples"] == [len(sc.client_data(0, c)) for c in m["rounds"][0]["clients"]]


def test_disco_smoke_in_het(small_base, cache_dir, tmp_path):
    over = {"method.name": "disco", "scenario.mode": "het", "scenario.het_table": [[0, 1], [1, 1]] + [[0, 0]] * 6}
    run_dir, m = run(smoke_cfg(small_base, cache_dir, tmp_path, **over), tmp_path / "het", progress=False)
    assert m["matrix"]["datasets"] == ["ImageNet-R", "ArxivQA"]
    art = m["method_artifacts"]
    assert art["subspaces_formed"] >= 1
    assert (run_dir / "disco" / "routing.json").is_file() and (run_dir / "disco" / "activation.png").is_file()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fcit.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--set", "scenario.beta=0"], "scenario.beta"),
        (["run", "--set", "scenario.clients_per_round=60"], "clients_per_round"),
        (["run", "--set", "train.lr=fast"], "train.lr"),
        (["run", "--set", "bogus.key=1"], "bogus"),
        (["run", "--method", "nope"], "unknown method"),
        (["run", "--method", "disco", "--set", "method.params.tau=2", "--set", "method.params.nope=1"], "method.params"),
        (["run", "--config", "/nonexistent.yaml"], "not found"),
    ],
)
def test_cli_bad_input_is_one_line_before_any_work(args, needle, tmp_path):
    r = _cli(*args, "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcit: error:") and needle in lines[0], r.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written before validation passes"


def test_compare_tabulates_and_reuses_finished_runs(small_base, cache_dir, tmp_path, monkeypatch):
    import fcit.compare as compare_mod
    from fcit.errors import FcitError

    cfg = smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 1})
    out, table = compare_mod.compare(cfg, ["zeroshot", "finetune"], [0, 1], out=tmp_path / "cmp", progress=False)
    assert "| zeroshot |" in table and "| finetune |" in table and "±" in table
    # zero-shot reports Last only: its Avg and Forgetting cells are "-"
    zs = next(ln for ln in table.splitlines() if ln.startswith("| zeroshot |")).split("|")
    assert "±" in zs[2] and zs[3].strip() == "-" and zs[4].strip() == "-"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["finetune-s0", "finetune-s1", "zeroshot-s0",
                                                                    "zeroshot-s1"]

    # A second call finds every run finished and trains nothing; the table is the same.
    def no_training(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(compare_mod, "run", no_training)
    _, again = compare_mod.compare(cfg, ["zeroshot", "finetune"], [0, 1], out=tmp_path / "cmp", progress=False)
    strip = lambda t: [ln.rsplit("|", 2)[0] for ln in t.splitlines()[1:]]  # noqa: E731 (wall times differ)
    assert strip(again) == strip(table)
    other = smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 1, "train.lr": 1e-3})
    with pytest.raises(FcitError, match="different config"):
        compare_mod.compare(other, ["finetune"], [0], out=tmp_path / "cmp", progress=False)


def test_compare_treats_explicit_default_method_params_as_the_same_run():
    from fcit.rundir import canonical as _canonical

    base = load_config(overrides={"method.name": "ewc"})
    explicit = load_config(overrides={"method.name": "ewc", "method.params.lambda": 1000, "threads": 1})
    other = load_config(overrides={"method.name": "ewc", "method.params.lambda": 10})
    assert _canonical(base) == _canonical(explicit) != _canonical(other)


def test_run_identity_leaves_out_defaults_threads_and_workers():
    from fcit.rundir import canonical as _canonical, config_hash

    base = load_config(overrides={"method.name": "disco", "model.compute_dtype": "float32"})
    # A setting left at its default is not part of the identity, so a later fcit that adds one (with a default
    # that computes what the run computed) still resumes and reuses the run; the base's own dtype is such a default.
    # The three settings whose defaults changed on 2026-12-07 are spelled against the old ones (rundir).
    from fcit.embedded import embedded_base_sha256
    from fcit.rundir import TWO_PHASE_BASE

    assert "train" not in _canonical(base)
    assert _canonical(base)["model"] == {"train_projector": False, "embedded_base": embedded_base_sha256()}
    assert _canonical(base)["data"] == {"synth": {"version": 5}}
    old = load_config(overrides={"method.name": "disco", "model.compute_dtype": "float32", "data.synth.version": 4,
                                 "model.train_projector": True})
    old.model.embedded_base = TWO_PHASE_BASE  # as read_config gives a config.json written before the key existed
    assert "model" not in _canonical(old) and "data" not in _canonical(old)
    faster = load_config(overrides={"method.name": "disco", "model.compute_dtype": "float32", "threads": 1,
                                    "federation.workers": 2, "train.compile": False})
    assert config_hash(faster) == config_hash(base)
    changed = load_config(overrides={"method.name": "disco", "model.compute_dtype": "bfloat16"})
    assert config_hash(changed) != config_hash(base)
    assert _canonical(base)["method"]["name"] == "disco"


def test_identities_of_runs_made_before_compute_dtype_auto_still_match():
    """The hashes fcit at commit 5663cf7 wrote into checkpoint manifests for these configs: an fp32 run of then
    resumes and is reused now when asked for fp32 (a bf16 run of then, when asked for bf16)."""
    from fcit.rundir import TWO_PHASE_BASE, config_hash

    old = {"304fdad1570fc1c9": {"method.name": "disco"},
           "390bf63761de6d5b": {"method.name": "finetune", "scenario.mode": "het", "scenario.beta": 0.5},
           "d71d31f8249dbf17": {"method.name": "finetune", "model.compute_dtype": "bfloat16"}}

    def on_two_phase_base(over):  # as read_config gives a config.json written before model.embedded_base existed
        cfg = load_config(overrides={"model.compute_dtype": "float32", **over})
        cfg.model.embedded_base = TWO_PHASE_BASE
        return cfg

    for digest, over in old.items():
        # the defaults of then (FCIT-Synth v4, the projector trained, the two-phase base) spelled out
        then = {"data.synth.version": 4, "model.train_projector": True, **over}
        assert config_hash(on_two_phase_base(then)).startswith(digest), over
        # today's defaults compute something else, and so do those settings on today's base
        assert not config_hash(load_config(overrides={"model.compute_dtype": "float32", **over})).startswith(digest)
        assert not config_hash(load_config(overrides={"model.compute_dtype": "float32", **then})).startswith(digest)
    # runs made at 5f0be66 with FCIT-Synth v5 and the projector frozen, on the base of then: the hashes fcit wrote
    # for them; today's defaults add today's base
    then = {"bf4f4fb2419f1916": {"method.name": "finetune"},
            "179f8cf9e4d27b83": {"method.name": "disco", "scenario.mode": "het"}}
    for digest, over in then.items():
        assert config_hash(on_two_phase_base(over)).startswith(digest), over
        assert not config_hash(load_config(overrides={"model.compute_dtype": "float32", **over})).startswith(digest)


def test_auto_compute_dtype_is_resolved_into_the_identity(monkeypatch, tmp_path):
    """``model.compute_dtype=auto`` depends on the machine, so load_config settles it: a run made in bf16 is not
    reused as an fp32 one, an fp32 run written before the setting existed (no key) keeps its identity, and
    ``float32`` is that run's spelling."""
    import json

    import fcit.hardware as device
    from fcit.rundir import canonical as _canonical, config_hash, read_config

    monkeypatch.setattr(device, "cpu_bf16_matmul", lambda: True)
    on_amx = load_config(overrides=["device=cpu"])
    assert on_amx.model.compute_dtype == "bfloat16" and _canonical(on_amx)["model"]["compute_dtype"] == "bfloat16"
    # a Config built in Python keeps "auto" until it runs; its identity is already what it will run as
    from fcit.config import Config

    assert config_hash(Config(device="cpu")) == config_hash(on_amx)
    monkeypatch.setattr(device, "cpu_bf16_matmul", lambda: False)
    plain = load_config(overrides=["device=cpu"])
    assert plain.model.compute_dtype is None
    assert config_hash(plain) != config_hash(on_amx)
    assert config_hash(load_config(overrides=["device=cpu", "model.compute_dtype=float32"])) == config_hash(plain)
    with pytest.raises(FcitError, match="compute_dtype float32 needs dtype float32"):
        load_config(overrides=["model.dtype=bfloat16", "model.compute_dtype=float32"])
    # a half-precision base computes in its own dtype whatever the CPU
    monkeypatch.setattr(device, "cpu_bf16_matmul", lambda: True)
    assert load_config(overrides=["device=cpu", "model.dtype=bfloat16"]).model.compute_dtype is None
    # config.json of an older fcit, without the key: read as the fp32 run it was
    old = plain.model_dump(mode="json")
    del old["model"]["compute_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert config_hash(read_config(tmp_path)) == config_hash(plain)


def test_a_run_records_which_embedded_base_it_ran_on(tmp_path, monkeypatch):
    """The embedded base changed on 2026-12-07 without a setting that says so: load_config records the shipped base's
    digest, a config.json written before (no key) reads as the two-phase base, and such a run is neither reused nor
    resumed on the base shipped now; a model.path run has no embedded base."""
    import hashlib
    import json

    from fcit.config import resolve_auto
    from fcit.embedded import EMBEDDED_DIR, embedded_base_sha256
    from fcit.rundir import TWO_PHASE_BASE, canonical, finished_result, read_config

    shipped = hashlib.sha256((EMBEDDED_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert shipped != TWO_PHASE_BASE
    cfg = load_config(overrides={"model.compute_dtype": "float32"})
    assert cfg.model.embedded_base == embedded_base_sha256() == shipped
    assert canonical(cfg)["model"]["embedded_base"] == shipped
    (tmp_path / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    assert read_config(tmp_path).model.embedded_base == shipped
    old = cfg.model_dump(mode="json")
    del old["model"]["embedded_base"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    then = read_config(tmp_path)
    assert then.model.embedded_base == TWO_PHASE_BASE and "embedded_base" not in canonical(then).get("model", {})
    with pytest.raises(FcitError, match="recorded on embedded base 9c46ff0a3632, this fcit ships " + shipped[:12]):
        resolve_auto(then)  # what --resume does first
    from fcit.runtime import Runtime

    with pytest.raises(FcitError, match="recorded on embedded base 9c46ff0a3632"):
        Runtime.build(then, progress=False)  # a Flower client handed a config settled on another fcit
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FcitError, match="different config, at model.embedded_base"):
        finished_result(tmp_path, cfg)
    assert load_config(overrides={"model.path": str(EMBEDDED_DIR)}).model.embedded_base is None
    with pytest.raises(FcitError, match="leave it unset with model.path"):
        load_config(overrides={"model.path": str(EMBEDDED_DIR), "model.embedded_base": shipped})
    with pytest.raises(FcitError, match="embedded_base"):
        load_config(overrides={"model.embedded_base": "9c46ff0a"})  # not a sha256
    import fcit.embedded

    monkeypatch.setattr(fcit.embedded, "EMBEDDED_DIR", tmp_path / "none")  # a checkout before `fcit pretrain`
    assert load_config().model.embedded_base is None


def test_instruction_phase_keeps_the_vision_tower_and_tunes_the_language_model(tmp_path, cache_dir):
    """Phase 2 starts from phase 1's weights (same seed), moves the LM and the projector, and leaves vision alone."""
    from safetensors.torch import load_file

    from fcit.pretrain import pretrain

    cfg = load_config(preset="smoke", overrides={"data.root": str(cache_dir), "data.synth.n_pretrain": 24,
                                                 "data.synth.n_instruct": 24})
    one = load_file(pretrain(cfg, tmp_path / "one", epochs=1, progress=False, instruct_epochs=0) / "model.safetensors")
    two = load_file(pretrain(cfg, tmp_path / "two", epochs=1, progress=False, instruct_epochs=1) / "model.safetensors")
    assert set(one) == set(two)
    vision = [k for k in one if "vision_tower" in k]
    lm = [k for k in one if "language_model" in k and "layers" in k]
    projector = [k for k in one if "projector" in k]
    assert vision and lm and projector
    assert all(torch.equal(one[k], two[k]) for k in vision)
    assert all(not torch.equal(one[k], two[k]) for k in projector)
    assert sum(not torch.equal(one[k], two[k]) for k in lm) == len(lm)
    meta = json.loads((tmp_path / "one" / "fcit_pretrain.json").read_text())
    assert meta["instruct"] is None


def test_binding_pairs_ask_one_question_kind_of_one_image_with_a_true_and_a_false_value():
    """Phase 3's data: the Yes question names what the image shows, the No question the same kind with another
    value, checked against the image spec for the bar charts and the tables."""
    import re

    from fcit.config import SynthConfig
    from fcit.data import synth

    cfg = SynthConfig()
    names = list(synth.FAMILIES)
    checked = 0
    for i in range(9 * 12):
        name, spec, q_yes, q_no, img = synth.make_binding_pair(cfg, i, render=False)
        assert name == names[i % len(names)] and img is None
        assert q_yes.endswith(synth.SHORT) and q_no.endswith(synth.SHORT) and q_yes != q_no
        # one template, two values: the questions differ in one place only
        a, b = q_yes.split(), q_no.split()
        assert len(a) == len(b) or name in ("object", "scene"), (q_yes, q_no)  # "a heart" / "an arrow"
        if name in ("bars", "labelled_bars"):
            for q, want in ((q_yes, True), (q_no, False)):
                m = re.match(r"Is the (leftmost|middle|rightmost) bar (\w+)\?", q)
                if m:
                    assert (spec.colors[("leftmost", "middle", "rightmost").index(m[1])] == m[2]) is want
                else:
                    m = re.match(r"Is there a (\w+) bar in the chart\?", q)
                    assert m and (m[1] in spec.colors) is want
                checked += 1
        if name == "table":
            for q, want in ((q_yes, True), (q_no, False)):
                m = (re.match(r"Does the table have a row for (\w+)\?", q)
                     or re.match(r"Is (\w+) written in the first", q))
                assert m and (m[1] in (spec.items if "row for" in q else spec.items[:1])) is want
                checked += 1
    assert checked == 2 * 12 * 3


def _assert_vision_kept_and_lm_trained(start, out) -> None:
    from safetensors.torch import load_file

    before, after = load_file(start / "model.safetensors"), load_file(out / "model.safetensors")
    vision = [k for k in before if "vision_tower" in k]
    lm = [k for k in before if "language_model" in k and "layers" in k]
    assert vision and lm
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert all(not torch.equal(before[k], after[k]) for k in lm)


def test_binding_phase_and_continuing_a_base_train_the_language_model_only(tmp_path, cache_dir, small_base,
                                                                            monkeypatch):
    """Phase 3 (minimal pairs with the instruction mixture) moves the LM and the projector, keeps the vision tower,
    and `--from` runs it alone on an existing base, recorded as the start."""
    import hashlib

    from fcit.data import synth
    from fcit.errors import FcitError
    from fcit.pretrain import pretrain

    monkeypatch.setattr(synth, "BINDING_PAIRS", 6)
    cfg = load_config(preset="smoke", overrides={"data.root": str(tmp_path / "cache"), "data.synth.n_pretrain": 24,
                                                 "data.synth.n_instruct": 18})
    full = pretrain(cfg, tmp_path / "full", epochs=1, progress=False, instruct_epochs=1, binding_epochs=1)
    meta = json.loads((full / "fcit_pretrain.json").read_text())
    assert meta["binding"]["pairs"] == 6 and meta["binding"]["with_instructions"] == 18
    assert meta["binding"]["frozen"] == "vision_tower" and meta["binding"]["train"]["lr"] == 3e-4
    records = json.loads((tmp_path / "cache").glob("*/binding/train.json").__next__().read_text())
    assert [r["conversations"][1]["value"] for r in records] == ["Yes", "No"] * 6
    assert all(records[k]["image"] == records[k + 1]["image"] for k in range(0, 12, 2))

    with pytest.raises(FcitError, match="--binding-epochs"):
        pretrain(cfg, tmp_path / "x", progress=False, start=small_base)
    with pytest.raises(FcitError, match="must differ"):
        pretrain(cfg, small_base, progress=False, start=small_base, binding_epochs=1)
    cont = pretrain(cfg, tmp_path / "cont", progress=False, start=small_base, binding_epochs=1)
    _assert_vision_kept_and_lm_trained(small_base, cont)
    meta = json.loads((cont / "fcit_pretrain.json").read_text())
    assert meta["start"]["model_sha256"] == hashlib.sha256((small_base / "model.safetensors").read_bytes()).hexdigest()
    assert meta["instruct"] == json.loads((small_base / "fcit_pretrain.json").read_text())["instruct"]
    assert meta["binding"]["pairs"] == 6 and meta["binding"]["epochs"] == 1
    few = pretrain(cfg, tmp_path / "few", progress=False, start=small_base, binding_epochs=1, binding_pairs=2)
    assert json.loads((few / "fcit_pretrain.json").read_text())["binding"]["pairs"] == 2
    with pytest.raises(FcitError, match="--binding-pairs must be 1..6"):
        pretrain(cfg, tmp_path / "x", progress=False, start=small_base, binding_epochs=1, binding_pairs=7)


def test_phase_2_mixes_in_phase_1_descriptions_and_continues_a_base(tmp_path, small_base, monkeypatch):
    """--instruct-descriptions N puts N of phase 1's descriptions (a seeded draw) into phase 2's mixture, in a full
    pre-training and when phase 2 continues an existing base (--from, vision tower kept, no phase 3)."""
    from collections import Counter

    from fcit import pretrain as pretrain_mod
    from fcit.errors import FcitError

    seen = []
    phase = pretrain_mod._phase

    def spy(model, processor, samples, train, epochs, seed, desc, progress, block=1):
        seen.append((desc, Counter(s.dataset for s in samples), [s.id for s in samples]))
        return phase(model, processor, samples, train, epochs, seed, desc, progress, block)

    monkeypatch.setattr(pretrain_mod, "_phase", spy)
    cfg = load_config(preset="smoke", overrides={"data.root": str(tmp_path / "cache"), "data.synth.n_pretrain": 24,
                                                 "data.synth.n_instruct": 18})
    full = pretrain_mod.pretrain(cfg, tmp_path / "full", epochs=1, progress=False, instruct_epochs=1,
                                 instruct_descriptions=5, replay_epochs=0)
    assert [d for d, _, _ in seen] == ["pretrain: descriptions", "pretrain: instructions"]
    assert seen[1][1] == Counter({"instruct": 18, "pretrain": 5})
    assert set(seen[1][2]) - set(seen[0][2]) and set(seen[1][2]) & set(seen[0][2])  # 5 of phase 1's 24
    meta = json.loads((full / "fcit_pretrain.json").read_text())
    assert meta["instruct"]["descriptions"] == 5 and meta["instruct"]["samples"] == 18

    seen.clear()
    cont = pretrain_mod.pretrain(cfg, tmp_path / "cont", progress=False, start=small_base, instruct_epochs=1,
                                 instruct_descriptions=5)
    assert [d for d, _, _ in seen] == ["pretrain: instructions"]
    assert seen[0][1] == Counter({"instruct": 18, "pretrain": 5})
    _assert_vision_kept_and_lm_trained(small_base, cont)
    meta = json.loads((cont / "fcit_pretrain.json").read_text())
    start_meta = json.loads((small_base / "fcit_pretrain.json").read_text())
    assert meta["instruct"]["descriptions"] == 5 and meta["instruct"]["epochs"] == 1
    assert meta["start"]["instruct"] == start_meta["instruct"] and meta["binding"] is None

    with pytest.raises(FcitError, match="--instruct-descriptions 5 needs phase 2"):
        pretrain_mod.pretrain(cfg, tmp_path / "x", progress=False, start=small_base, binding_epochs=1,
                              instruct_descriptions=5)
    with pytest.raises(FcitError, match="phase 1 has only 24 descriptions"):
        pretrain_mod.pretrain(cfg, tmp_path / "x", progress=False, start=small_base, instruct_epochs=1,
                              instruct_descriptions=25)



def test_the_replay_pass_is_phase_2_continued_with_descriptions(tmp_path, monkeypatch):
    """A new base ends with the replay by default (phase 2 again, half of phase 1's descriptions mixed in), and one
    `fcit pretrain` gives the same weights as the two-phase base continued with `--from --instruct-epochs 1
    --instruct-descriptions N`, the two commands the embedded base was built with."""
    from collections import Counter

    from safetensors.torch import load_file

    from fcit import pretrain as pretrain_mod
    from fcit.errors import FcitError

    seen = []
    phase = pretrain_mod._phase

    def spy(model, processor, samples, train, epochs, seed, desc, progress, block=1):
        seen.append((desc, Counter(s.dataset for s in samples)))
        return phase(model, processor, samples, train, epochs, seed, desc, progress, block)

    monkeypatch.setattr(pretrain_mod, "_phase", spy)
    cfg = load_config(preset="smoke", overrides={"data.root": str(tmp_path / "cache"), "data.synth.n_pretrain": 24,
                                                 "data.synth.n_instruct": 18})
    one = pretrain_mod.pretrain(cfg, tmp_path / "one", epochs=1, progress=False, instruct_epochs=1)
    assert seen == [("pretrain: descriptions", Counter({"pretrain": 24})),
                    ("pretrain: instructions", Counter({"instruct": 18})),
                    ("pretrain: replay", Counter({"instruct": 18, "pretrain": 12}))]
    meta = json.loads((one / "fcit_pretrain.json").read_text())
    assert meta["replay"]["descriptions"] == 12 and meta["replay"]["epochs"] == 1
    assert meta["instruct"]["descriptions"] == 0

    two_phase = pretrain_mod.pretrain(cfg, tmp_path / "two-phase", epochs=1, progress=False, instruct_epochs=1,
                                      replay_epochs=0)
    assert json.loads((two_phase / "fcit_pretrain.json").read_text())["replay"] is None
    cont = pretrain_mod.pretrain(cfg, tmp_path / "cont", progress=False, start=two_phase, instruct_epochs=1,
                                 instruct_descriptions=12)
    a, b = load_file(one / "model.safetensors"), load_file(cont / "model.safetensors")
    c = load_file(two_phase / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the replay trained

    for bad, match in [({"start": two_phase, "instruct_epochs": 1, "replay_epochs": 1}, "--replay-epochs 1"),
                       ({"instruct_epochs": 0, "replay_epochs": 1}, "--replay-epochs 1"),
                       ({"instruct_epochs": 1, "replay_descriptions": 25}, "phase 1 has 24 descriptions")]:
        seen.clear()
        with pytest.raises(FcitError, match=match):
            pretrain_mod.pretrain(cfg, tmp_path / "x", epochs=1, progress=False, **bad)
        assert seen == []  # found before any training

def test_pretrain_builds_a_resized_language_model_that_runs(tmp_path, cache_dir, capsys):
    """`fcit pretrain --lm-hidden/--lm-layers` builds the base at that size (the other widths in the default's
    proportions), records it, and `fcit run` tunes it; a size the model cannot take fails before any work."""
    from fcit.cli import main
    from fcit.models.backbone import load_backbone

    common = ["--preset", "smoke", "--set", f"data.root={cache_dir}", "--set", "data.synth.n_pretrain=24",
              "--set", "data.synth.n_instruct=24", "--quiet"]
    out = tmp_path / "wide"
    assert main(["pretrain", "--lm-hidden", "96", "--lm-layers", "2", "--epochs", "1", "--instruct-epochs", "1",
                 "--out", str(out), *common]) == 0
    text = load_backbone(str(out))[0].config.text_config
    sizes = (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads)
    assert sizes == (96, 256, 2, 2)
    spec = json.loads((out / "fcit_pretrain.json").read_text())["spec"]
    assert (spec["lm_hidden"], spec["lm_intermediate"], spec["lm_layers"], spec["lm_heads"]) == (96, 256, 2, 2)
    _, m = run(smoke_cfg(out, cache_dir, tmp_path, **{"scenario.stages": 1}), tmp_path / "r", progress=False)
    assert m["summary"]["last"] >= 0 and m["rounds"][0]["loss"] > 0

    for bad, needle in ((["--lm-hidden", "100", "--lm-heads", "3"], "heads of an even size"),
                        (["--lm-layers", "0"], "--lm-layers must be >= 1"),
                        (["--from", str(out), "--lm-hidden", "96", "--instruct-epochs", "1"], "at its own size")):
        target = tmp_path / "bad"
        capsys.readouterr()
        assert main(["pretrain", *bad, "--out", str(target), *common]) == 2
        assert needle in capsys.readouterr().err and not target.exists()
