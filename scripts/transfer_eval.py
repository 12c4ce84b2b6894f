"""Zero-shot transfer and general-ability retention of finished runs, without retraining.

    .venv/bin/python scripts/transfer_eval.py RUN_DIR [RUN_DIR ...] --matrix-out DIR

What ``eval.unseen`` and ``eval.retention`` compute during a run, computed afterwards from a run's final global
state (checkpoint/): the datasets its setting never trains, scored after the last stage, and the general set
(``fcit.eval.general``) scored on the base and on the final model. Neither changes training, so a run finished
without them gets the same numbers as a run with them (``tests/test_matrix.py`` holds the two equal). A run with no
checkpoint (Zero-shot, whose final model is the base; the centralized MTL, which keeps none) is scored on the base,
and the MTL is skipped with a note.

DIR/matrix.json holds one cell per run in ``fcit matrix``'s format (method, setting, scenario, beta, seed, params,
Last from the run's own metrics, which the final state must reproduce, ``unseen``, ``retention``), so that
``scripts/findings.py MAIN DIR`` judges findings (8) and (9) on them; each cell also goes into the run's
``transfer.json``, which a later call reuses while the run's metrics are unchanged (``--force`` scores again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def final_experiment(run_dir: Path, general=None):
    """The run's Experiment with its final global state loaded, the general set's score on the base taken first
    (every adapter is still zero then), and the run's summary (Last, Avg, forgetting). None for a run that keeps no final state."""
    from fcit.config import Config
    from fcit.experiment import Experiment
    from fcit.methods.base import Kind
    from fcit.results import RunResult

    if not (run_dir / "metrics.json").is_file():  # started, not finished: nothing final to score yet
        print(f"{run_dir.name}: skipped (not finished)", file=sys.stderr)
        return None
    cfg = Config.model_validate(json.loads((run_dir / "config.json").read_text()))
    summary = RunResult.load(run_dir).summary
    exp = Experiment(cfg, run_dir, progress=False)
    if exp.method.kind == Kind.CENTRALIZED:
        print(f"{run_dir.name}: skipped (the centralized MTL keeps no final state)", file=sys.stderr)
        return None
    exp._general = general if general is not None else _general(cfg)
    before = exp.score_general(None)
    if exp.method.kind == Kind.FEDERATED:
        exp.load_final()
    return exp, summary, before


class Mismatch(Exception):
    """A run's final state does not reproduce its recorded Last: its numbers would not be that run's."""


def scored_on(cfg, general) -> dict:
    """What a cell is scored on: the setting's unseen datasets and the general set's samples (a fingerprint). A
    transfer.json is reused only while both are what the code gives now."""
    from fcit.data.scenario import Scenario

    blob = json.dumps([(s.id, s.prompt, s.answer, list(s.refs)) for s in general])
    return {"unseen": Scenario(cfg.scenario, cfg.seed, None).unseen,
            "general": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def _general(cfg):
    from fcit.data.loader import open_general

    return open_general(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"retention": True})}),
                        progress=False)


def reused(run_dir: Path, cfg, general) -> dict | None:
    """The run's earlier transfer.json, when it was written for the run as it now stands (same Last, written after
    the run's metrics) and on the same datasets: scoring again would give the same numbers, decoding is greedy."""
    from fcit.results import RunResult

    out, metrics = run_dir / "transfer.json", run_dir / "metrics.json"
    if not (out.is_file() and metrics.is_file()) or out.stat().st_mtime < metrics.stat().st_mtime:
        return None
    cell = json.loads(out.read_text())
    if cell.get("last") != RunResult.load(run_dir).summary.last or cell.get("scored") != scored_on(cfg, general):
        return None
    print(f"{run_dir.name}: {out.name} reused", file=sys.stderr)
    return {**cell, "run_dir": str(run_dir.resolve())}


def transfer(run_dir: Path, force: bool = False) -> dict | None:
    from fcit.methods.base import Kind
    from fcit.results import Retention

    from fcit.config import Config

    general = None
    if not force and (run_dir / "transfer.json").is_file():
        cfg = Config.model_validate(json.loads((run_dir / "config.json").read_text()))
        general = _general(cfg)  # loaded once: the reuse check's fingerprint and, if stale, the scoring
        if (cell := reused(run_dir, cfg, general)) is not None:
            return cell
    loaded = final_experiment(run_dir, general)
    if loaded is None:
        return None
    exp, summary, before = loaded
    cfg, last = exp.cfg, exp.scenario.num_stages - 1
    # Zero-shot's final model is the base
    after = exp.score_general(last) if exp.method.kind == Kind.FEDERATED else before
    # The final state must reproduce the run's own Last, or the numbers below are not that run's.
    seen = exp.evaluate(exp.scenario.seen_datasets(last), last)
    recomputed = sum(r["score"] for r in seen.values()) / len(seen)
    if abs(recomputed - summary.last) > 1e-6:
        raise Mismatch(f"{run_dir}: its final state scores Last {recomputed:.4f}, the run recorded "
                       f"{summary.last:.4f}; not that run's final model")
    unseen = {d: r["score"] for d, r in exp.evaluate(exp.scenario.unseen, last).items()}
    cell = {"method": cfg.method.name, "setting": cfg.scenario.setting, "scenario": cfg.scenario.mode,
            "beta": cfg.scenario.beta, "seed": cfg.seed, "last": summary.last, "avg": summary.avg,
            "forgetting": summary.forgetting, "run_dir": str(run_dir.resolve()), "shared": False,
            "params": exp.method.params.model_dump(mode="json"), "unseen": unseen,
            "retention": Retention(before=before, after=after).to_dict(), "last_recomputed": recomputed,
            "scored": scored_on(cfg, exp._general)}
    (run_dir / "transfer.json").write_text(json.dumps({k: v for k, v in cell.items() if k != "run_dir"}, indent=2))
    return cell


def main(argv: list[str] | None = None) -> list[dict]:
    from fcit.jsonio import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories (fcit run / compare / matrix)")
    ap.add_argument("--matrix-out", type=Path, required=True, help="write the cells as DIR/matrix.json")
    ap.add_argument("--force", action="store_true", help="score every run again, even one with a current transfer.json")
    args = ap.parse_args(argv)
    cells, failed = [], []
    for d in args.runs:
        try:
            c = transfer(d, args.force)
        except Mismatch as err:  # the other runs' cells are still written
            print(err, file=sys.stderr)
            failed.append(d.name)
            continue
        if c is not None:
            cells.append(c)
            r = c["retention"]
            print(f"{d.name}: unseen {sum(c['unseen'].values()) / max(1, len(c['unseen'])):.1f} "
                  f"({', '.join(f'{k} {v:.1f}' for k, v in c['unseen'].items())}); general set "
                  f"{r['before']:.1f} -> {r['after']:.1f}", flush=True)
    args.matrix_out.mkdir(parents=True, exist_ok=True)
    for c in cells:  # relative, as fcit matrix writes them: the folders move together (results/, another host)
        c["run_dir"] = os.path.relpath(c["run_dir"], args.matrix_out.resolve())
    write_json(args.matrix_out / "matrix.json", {"cells": cells, "source": "transfer_eval.py"})
    if failed:
        sys.exit(f"transfer_eval.py: error: {len(failed)} run(s) left out, their final state does not reproduce "
                 f"their Last: {', '.join(failed)}")
    return cells


if __name__ == "__main__":
    from fcit.errors import FcitError

    try:
        main()
    except FcitError as err:  # one line, as the CLI prints it
        sys.exit(f"{Path(__file__).name}: error: {err}")
