"""One training step of the embedded model, with and without the last layer on the answer rows, by batch size.

    .venv/bin/python scripts/bench_step.py [--preset default] [--set KEY=VALUE ...] [--sizes 1,2,4,8,16]
                                           [--repeats 5] [--threads 1] [--out bench_step.json]

A whole run's wall time moves by several percent from one run to the next on a shared 2-core machine, more than a
change to the step saves. This script times the step itself: forward (answer-only loss) and backward on real
training batches of the run's datasets (8 batches per size, one per task), as local training runs them (compiled
layers and the compute dtype of the config, one thread like a pool worker), with the two variants timed in turn,
round-robin, so that the machine's drift hits both alike. Reported: the median ms per step of each variant and
their ratio. Compiling happens in the warm-up, outside the timing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sizes", default="1,2,4,8,16", help="batch sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fcit.config import load_config
    from fcit.experiment import Experiment
    from fcit.models import answer_loss
    from fcit.models.answer_loss import answer_forward
    from fcit.models.compiled import compiles, training_compiled
    from fcit.models.device import autocast_for, model_device

    cfg = load_config(None, args.preset, [*args.overrides, f"threads={args.threads}", "federation.workers=1"])
    with tempfile.TemporaryDirectory() as tmp:
        exp = Experiment(cfg, Path(tmp) / "run", progress=False)
    model, sc = exp.model, exp.scenario
    rows_usable = answer_loss._rows_usable
    variants = {"answer rows": rows_usable, "full last layer": lambda layer: None}

    def step(batch) -> None:
        with autocast_for(model):
            out = answer_forward(model, batch, full=not cfg.train.fused)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    rng = random.Random(0)
    results = []
    model.train()
    try:
        with training_compiled(model, compiles(cfg.train, model_device(model))):
            for bs in [int(x) for x in args.sizes.split(",")]:
                batches = []
                for k in range(sc.num_tasks):
                    pool = sc.task_train(k)
                    batches.append(exp.batcher.train_batch(rng.sample(list(pool), min(bs, len(pool)))))
                times: dict[str, list[float]] = {v: [] for v in variants}
                for rep in range(args.repeats + 1):  # the first round compiles and warms up
                    for name, fn in variants.items():
                        answer_loss._rows_usable = fn
                        t0 = time.perf_counter()
                        for b in batches:
                            step(b)
                        if rep:
                            times[name].append(1000 * (time.perf_counter() - t0) / len(batches))
                med = {v: round(statistics.median(t), 2) for v, t in times.items()}
                row = {"batch": bs, "ms_per_step": med,
                       "ratio": round(med["answer rows"] / med["full last layer"], 3)}
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        answer_loss._rows_usable = rows_usable
    out = {"preset": args.preset, "overrides": args.overrides, "threads": args.threads,
           "compute_dtype": cfg.model.compute_dtype, "compiled": compiles(cfg.train, model_device(model)),
           "rows": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
