"""DISCO activation ablation without retraining: re-evaluate finished DISCO runs under every SSA gate variant.

    .venv/bin/python scripts/disco_activation_ablation.py RUN_DIR [RUN_DIR ...] [--matrix-out DIR]

The gate variant only changes inference, so each run's final global state (checkpoint/) is evaluated on every
dataset it has seen with softmax(cos/eps), concat (all ones), raw cosine and argmax gates. Prints a Markdown table
of Last (mean +- std over the given runs) and writes it to activation_ablation.md beside the first run.

``--matrix-out DIR`` also writes DIR/matrix.json in ``fcit matrix``'s cell format, one ablation cell per run and
non-default gate (the run's own softmax cell is the main matrix's), so that ``scripts/findings.py MAIN DIR`` judges
finding (6) on these re-evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

VARIANTS = ["softmax", "concat", "cosine", "argmax"]


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    from fcit.config import Config
    from fcit.eval.metrics import mean_std
    from fcit.experiment import Experiment
    from fcit.jsonio import write_json
    from fcit.report.tables import results_markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished DISCO run directories")
    ap.add_argument("--matrix-out", type=Path, help="also write the gate cells as DIR/matrix.json")
    args = ap.parse_args(argv)
    last: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cells = []
    for d in args.runs:
        cfg = Config.model_validate(json.loads((d / "config.json").read_text()))
        if cfg.method.name != "disco":
            sys.exit(f"{d}: not a DISCO run")
        exp = Experiment(cfg, d, progress=False)
        exp.load_final()
        datasets = exp.scenario.seen_datasets(exp.scenario.num_stages - 1)
        params = exp.method.params.model_dump(mode="json")
        for v in VARIANTS:
            exp.method.params.variant = v
            res = exp.evaluate(datasets, exp.scenario.num_stages - 1)
            last[v].append(sum(r["score"] for r in res.values()) / len(res))
            print(f"{d.name} {v}: Last {last[v][-1]:.1f}", flush=True)
            if v != params["variant"]:
                cells.append({"method": "disco", "setting": cfg.scenario.setting, "scenario": cfg.scenario.mode,
                              "beta": cfg.scenario.beta, "seed": cfg.seed, "last": last[v][-1], "avg": None,
                              "forgetting": None, "shared": False,
                              "run_dir": os.path.relpath(d.resolve(), (args.matrix_out or d).resolve()),
                              "params": {**params, "variant": v}, "scores": {k: r["score"] for k, r in res.items()}})
    rows = [{"method": f"DISCO, {v} activation", "last": mean_std(x) if len(x) > 1 else x[0]} for v, x in last.items()]
    table = results_markdown(rows, ["last"])
    args.runs[0].parent.joinpath("activation_ablation.md").write_text(table)
    if args.matrix_out is not None:
        args.matrix_out.mkdir(parents=True, exist_ok=True)
        write_json(args.matrix_out / "matrix.json", {"cells": cells, "source": "disco_activation_ablation.py"})
    print(table)
    return last


if __name__ == "__main__":
    from fcit.errors import FcitError

    try:
        main()
    except FcitError as err:  # one line, as the CLI prints it
        sys.exit(f"{Path(__file__).name}: error: {err}")
