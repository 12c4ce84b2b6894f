"""General-ability retention (eval.retention): the held-out split of the generic instruction mixture, its scoring per
answer format, the before/after scores of a run, the matrix cell and finding (9)."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

import fcit.matrix as matrix_mod
from fcit.config import SynthConfig, load_config
from fcit.data import registry, synth
from fcit.data.loader import GENERAL, load_general_test, open_general
from fcit.data.records import Sample
from fcit.errors import FcitError
from fcit.eval.general import ACCURACY_FORMATS, score_general
from fcit.methods import REGISTRY
from script_loader import load_script
from test_experiment import cache_dir, small_base, smoke_cfg  # noqa: F401 (fixtures)

SMALL = SynthConfig(seed=0, n_train=20, n_test=6, n_pretrain=30, n_instruct=45)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the held-out split -------------------------------------------------------------------------------------------
def test_training_mixture_is_unchanged_by_the_test_split():
    # The first questions and answers of the mixture the committed base was trained on: the held-out split has its
    # own seed stream and must leave them alone (a change to INSTRUCT needs a new base, `fcit pretrain`).
    h = hashlib.sha256()
    for i in range(90):
        q, a, _ = synth.make_instruct_sample(SynthConfig(), i, render=False)
        h.update((q + "\0" + a + "\0").encode())
    assert h.hexdigest() == "5a61c2203f683c56f9710e4989450def74da6bc218413309e339494abd15bf9a"


def test_general_split_is_held_out_balanced_and_in_the_test_layout(tmp_path):
    root = synth.build_pretrain(SMALL, tmp_path, progress=False)
    assert synth.build_general(SMALL, tmp_path, progress=False) == root  # the benchmark's root, same cache key
    records = json.loads((root / synth.GENERAL_TEST_FILE).read_text())
    n = synth.GENERAL_PER_FAMILY * len(synth.FAMILIES)
    assert len(records) == n == 270
    # family-major, GENERAL_PER_FAMILY each: an evenly spaced subset stays balanced
    assert [r["family"] for r in records] == [f for f in synth.FAMILIES for _ in range(synth.GENERAL_PER_FAMILY)]
    assert set(Counter(r["format"] for r in records)) == set(registry.FORMATS)  # every answer format
    for r in records:
        assert {"question_id", "image", "text", "answer"} <= set(r) and (root / r["image"]).is_file()
        assert r["format"] == synth.instruct_format(r["text"], r["answer"])
        if r["format"] == "box":
            assert r["answer_bbox"] == r["answer"] and r["size"] == [SMALL.image_size] * 2
    # No test item is a training item: neither the same question on the same image file content ...
    train = json.loads((root / "pretrain" / "instruct.json").read_text())
    pairs = {(_sha(root / t["image"]), t["conversations"][0]["value"].removeprefix("<image>\n")) for t in train}
    assert not pairs & {(_sha(root / r["image"]), r["text"]) for r in records}
    samples = load_general_test(root / synth.GENERAL_TEST_FILE, root)
    assert len(samples) == n and all(s.dataset == GENERAL and s.meta["format"] for s in samples)
    assert [s.meta["family"] for s in samples] == [r["family"] for r in records]  # per-family scores need it


def test_general_split_skips_what_the_training_mixture_holds(monkeypatch):
    # ... nor the same question on the same image spec (equal up to pixel noise). At the default mixture size the
    # discrete families (bar charts, tables) draw such twins from the test stream (bars: one within the first 60
    # draws); at 60 per family it falls inside the split and must be skipped.
    cfg = SynthConfig()
    names = list(synth.FAMILIES)
    train = set()
    for i in range(cfg.n_instruct):
        spec, q, _, _ = synth._instruct(cfg, names[i % len(names)], synth._rng(cfg.seed, synth._INSTRUCT_STREAM, i),
                                        render=False)
        train.add(synth._instruct_key(names[i % len(names)], spec, q))
    raw = [synth._instruct(cfg, "bars", synth._rng(cfg.seed, synth._INSTRUCT_TEST_STREAM, names.index("bars"), j),
                           render=False)[:2] for j in range(60)]
    assert sum(synth._instruct_key("bars", s, q) in train for s, q in raw) >= 1  # a twin in the raw stream
    monkeypatch.setattr(synth, "GENERAL_PER_FAMILY", 60)
    kept = list(synth.make_general_test(cfg, render=False))
    assert len(kept) == 60 * len(names) and Counter(f for f, *_ in kept) == {f: 60 for f in names}
    assert not {synth._instruct_key(f, s, q) for f, s, q, _, _ in kept} & train


def test_general_build_is_its_own_atomic_part_of_the_cache(tmp_path):
    # Built first, then the benchmark and the pre-training mixture: neither removes it, and it rebuilds nothing.
    root = synth.build_general(SMALL, tmp_path, progress=False)
    test_file = root / synth.GENERAL_TEST_FILE
    before = test_file.read_bytes()
    synth.build(SMALL, tmp_path, progress=False)
    synth.build_pretrain(SMALL, tmp_path, progress=False)
    assert test_file.read_bytes() == before and (root / "manifest.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.json")}
    synth.build_general(SMALL, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.json")} == stamps


def test_real_benchmark_has_no_general_set(tmp_path):
    cfg = load_config(overrides={"data.kind": "real", "data.root": str(tmp_path), "eval.retention": True})
    with pytest.raises(FcitError, match="eval.retention: needs FCIT-Synth"):
        open_general(cfg)


# -- scoring per format -------------------------------------------------------------------------------------------
def _s(fmt: str, answer: str, i: int) -> Sample:
    meta = {"format": fmt, **({"answer_bbox": (0.1, 0.1, 0.5, 0.5)} if fmt == "box" else {})}
    return Sample(GENERAL, str(i), None, "q", answer, (answer,), meta)


def test_score_is_the_mean_over_accuracy_formats_with_caption_apart():
    samples = ([_s("word", "red", 0), _s("word", "blue", 1), _s("number", "3", 2), _s("yesno", "Yes", 3),
                _s("letter", "B", 4), _s("box", "[0.10, 0.10, 0.50, 0.50]", 5)]
               + [_s("caption", f"A table with {w} rows.", 6 + k) for k, w in enumerate(("two", "three", "four"))])
    preds = ["red", "green", "3", "Yes", "C", "[0.12, 0.1, 0.5, 0.52]", "A table with two rows.",
             "A table with three rows.", "A bar chart."]
    g = score_general(preds, samples)
    assert g.per_format["word"] == 50.0 and g.per_format["letter"] == 0.0 and g.per_format["box"] == 100.0
    # each format weighs the same (not each sample), and the uncapped CIDEr stays out of the mean
    assert g.score == pytest.approx(sum(g.per_format[f] for f in ACCURACY_FORMATS) / 5) == pytest.approx(70.0)
    assert g.per_format["caption"] > 0 and g.n == {"word": 2, "number": 1, "yesno": 1, "letter": 1, "box": 1,
                                                   "caption": 3}
    # the run's eval.scoring applies: lenient reads the letter out of "B) cube"
    assert score_general(["red", "red", "3", "Yes", "B) cube"] + preds[5:], samples, "lenient").per_format[
        "letter"] == 100.0
    with pytest.raises(FcitError, match="no sample of an accuracy format"):
        score_general(preds[6:], samples[6:])


# -- a run with eval.retention ------------------------------------------------------------------------------------
def _base_on_general(base, cfg):
    """The base checkpoint on the general set directly: loaded alone, no method, no adapter."""
    from fcit.eval.evaluate import generate
    from fcit.models.backbone import load_backbone
    from fcit.models.device import set_compute_dtype
    from fcit.models.inputs import Batcher

    model, processor = load_backbone(str(base), "float32", "cpu")
    set_compute_dtype(model, cfg.model.compute_dtype)  # as the run computes (bf16 matmuls on a CPU with bf16 units)
    samples = open_general(cfg, progress=False)
    preds = generate(model, Batcher(model, processor), samples, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    return preds, score_general(preds, samples, cfg.eval.scoring)


def test_retention_scores_the_base_before_and_the_final_model_after(small_base, cache_dir, tmp_path, monkeypatch):
    import fcit.eval.general as general

    # 45 general samples (every family, evenly spaced) keep the smoke run short.
    cfg = smoke_cfg(small_base, cache_dir, tmp_path, **{"scenario.stages": 1, "eval.retention": True,
                                                        "eval.max_test": 45})
    seen = []  # the predictions of each general-set scoring, in order: before, after
    orig = general.score_general
    monkeypatch.setattr(general, "score_general", lambda preds, *a: seen.append(list(preds)) or orig(preds, *a))
    res = matrix_mod.matrix(cfg, ["finetune"], ["task"], ["hom"], [1.0], [0], out=tmp_path / "mx", jobs=1,
                            progress=False)
    monkeypatch.setattr(general, "score_general", orig)
    assert len(seen) == 2
    (cell,) = res.cells
    run_dir = tmp_path / "mx" / cell.run_dir
    m = json.loads((run_dir / "metrics.json").read_text())
    r = m["retention"]
    assert set(r) == {"before", "after", "drop", "per_format", "n"} and sum(r["n"].values()) == 45
    assert set(r["per_format"]) == set(r["n"]) and all(set(v) == {"before", "after"} for v in r["per_format"].values())
    assert r["drop"] == pytest.approx(r["before"] - r["after"]) and 0 <= r["after"] <= 100
    # zero adapters at init: the run's "before" is the base checkpoint itself, prediction for prediction (the smoke
    # base scores about 0, so the scores alone would prove little; its predictions are not empty)
    preds, direct = _base_on_general(small_base, cfg)
    assert seen[0] == preds and any(p.strip() for p in preds)
    assert seen[1] != seen[0]  # the stage changed the model: "before" taken after training would differ
    assert r["before"] == direct.score
    assert {f: v["before"] for f, v in r["per_format"].items()} == direct.per_format
    assert "- **General ability** (held-out generic instructions, mean over formats): base" in \
        (run_dir / "results.md").read_text()
    assert cell.retention == r and json.loads((tmp_path / "mx" / "matrix.json").read_text())["cells"][0][
        "retention"] == r
    # Off by default: no key, and the identity of earlier runs is unchanged (a default is left out of it).
    from fcit.rundir import canonical

    assert "retention" not in canonical(smoke_cfg(small_base, cache_dir, tmp_path)).get("eval", {})
    assert canonical(cfg)["eval"]["retention"] is True


@pytest.fixture(scope="module")
def base_predictions(small_base, cache_dir, tmp_path_factory):
    cfg = smoke_cfg(small_base, cache_dir, tmp_path_factory.mktemp("bp"), **{"eval.retention": True,
                                                                              "eval.max_test": 18})
    return _base_on_general(small_base, cfg)[0]


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_starts_from_the_base_on_the_general_set(small_base, cache_dir, tmp_path, base_predictions,
                                                               method, monkeypatch):
    # "before" is the run's own model before stage 1, outside any gate: the base only if every method's adapters
    # start at zero, which this checks prediction for prediction.
    import fcit.eval.general as general
    from fcit.experiment import Experiment

    cfg = smoke_cfg(small_base, cache_dir, tmp_path, **{"method.name": method, "eval.retention": True,
                                                        "eval.max_test": 18})
    exp = Experiment(cfg, tmp_path / "r", progress=False)
    exp.method.initial_state(exp.model)  # what run() does before scoring the base
    seen = []
    monkeypatch.setattr(general, "score_general", lambda preds, *a: seen.append(list(preds)))
    exp.score_general(None)
    assert seen == [base_predictions]


def test_a_resumed_run_keeps_the_base_score_of_its_checkpoint(small_base, cache_dir, tmp_path, monkeypatch):
    from fcit.experiment import Experiment
    from fcit.launch import run

    over = {"eval.retention": True, "eval.max_test": 18}
    cfg = smoke_cfg(small_base, cache_dir, tmp_path, **over)
    _, first = run(smoke_cfg(small_base, cache_dir, tmp_path, **over, **{"scenario.stages": 1}), tmp_path / "r",
                   progress=False)
    progress = json.loads((tmp_path / "r" / "checkpoint" / "progress.json").read_text())
    assert progress["retention_before"]["score"] == first.retention.before.score
    (tmp_path / "r" / "metrics.json").unlink()
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    calls = []
    orig = Experiment.score_general
    monkeypatch.setattr(Experiment, "score_general", lambda self, stage: calls.append(stage) or orig(self, stage))
    _, resumed = run(cfg, tmp_path / "r", progress=False, resume=True)
    assert calls == [1]  # the final model only: the trained model is not the base any more
    assert resumed.retention.before == first.retention.before


# -- finding (9) ----------------------------------------------------------------------------------------------------
def _disco(scenario, before, after, **params):
    p = {"tau": 0.9, "variant": "softmax", "identity": "text", **params}
    return {"method": "disco", "setting": "task", "scenario": scenario, "beta": 1.0, "seed": 0, "last": 50.0,
            "avg": 55.0, "forgetting": None, "run_dir": f"disco-{scenario}-{p['variant']}", "shared": False,
            "params": p, "retention": {"before": before, "after": after, "drop": before - after,
                                       "per_format": {}, "n": {}}}


@pytest.mark.parametrize("after_het, verdict", [(57.0, "yes"), (50.0, "no")])
def test_finding_9_reads_the_cells_retention(tmp_path, after_het, verdict):
    f = load_script("findings")
    # An ablation cell's retention does not count: its drop of 40 would make the verdict "no" every time.
    cells = [_disco("hom", 60.0, 58.0), _disco("het", 60.0, after_het), _disco("hom", 60.0, 20.0, variant="argmax")]
    (tmp_path / "matrix.json").write_text(json.dumps({"cells": cells}))
    (got,) = [x for x in f.findings(f.load([tmp_path])) if x.number == 9]
    assert got.verdict == verdict and "over 2 runs" in got.evidence
    assert f"max {60.0 - after_het:.1f}" in got.evidence
