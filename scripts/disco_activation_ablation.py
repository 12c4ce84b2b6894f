"""DISCO activation ablation without retraining: re-evaluate finished DISCO runs under every SSA gate variant.

    .venv/bin/python scripts/disco_activation_ablation.py RUN_DIR [RUN_DIR ...]

The gate variant only changes inference, so each run's final global state (checkpoint/) is evaluated on every
dataset it has seen with softmax(cos/eps), concat (all ones), raw cosine and argmax gates. Prints a Markdown table
of Last (mean +- std over the given runs) and writes it to activation_ablation.md beside the first run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VARIANTS = ["softmax", "concat", "cosine", "argmax"]


def main(run_dirs: list[str]) -> None:
    from fcit.config import Config
    from fcit.eval.metrics import mean_std
    from fcit.experiment import Experiment
    from fcit.models.lora import set_state
    from fcit.report.tables import results_markdown

    if not run_dirs:
        sys.exit(__doc__)
    last: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for d in map(Path, run_dirs):
        cfg = Config.model_validate(json.loads((d / "config.json").read_text()))
        if cfg.method.name != "disco":
            sys.exit(f"{d}: not a DISCO run")
        exp = Experiment(cfg, d, progress=False)
        state, _ = exp.load_checkpoint()
        set_state(exp.model, state)
        datasets = exp.scenario.seen_datasets(exp.scenario.num_stages - 1)
        for v in VARIANTS:
            exp.method.params.variant = v
            res = exp.evaluate(datasets, exp.scenario.num_stages - 1)
            last[v].append(sum(r["score"] for r in res.values()) / len(res))
            print(f"{d.name} {v}: Last {last[v][-1]:.1f}", flush=True)
    rows = [{"method": f"DISCO, {v} activation", "last": mean_std(x) if len(x) > 1 else x[0]} for v, x in last.items()]
    table = results_markdown(rows, ["last"])
    Path(run_dirs[0]).parent.joinpath("activation_ablation.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
