"""One training step of the embedded model, with and without the last layer on the answer rows, by batch size.

    .venv/bin/python scripts/bench_step.py [--preset default] [--set KEY=VALUE ...] [--sizes 1,2,4,8,16]
                                           [--repeats 5] [--threads 1] [--out bench_step.json]
                                           [--new-shapes | --profile]

A whole run's wall time moves by several percent from one run to the next on a shared 2-core machine, more than a
change to the step saves. This script times the step itself: forward (answer-only loss) and backward on real
training batches of the run's datasets (8 batches per size, one per task), as local training runs them (compiled
layers and the compute dtype of the config, one thread like a pool worker), with the two variants timed in turn,
round-robin, so that the machine's drift hits both alike. Reported: the median ms per step of each variant and
their ratio. Compiling happens in the warm-up, outside the timing.

``--new-shapes`` times instead what a batch shape costs the first time a process runs it: for each batch size (of
one task's samples, after a warm-up at another size), one step on a batch of a shape the process has not run, then
one on new samples of that same shape (so both pay the vision tower for images not seen yet), then that batch again.
The difference of the first two is the per-shape setup; on the bf16 path, oneDNN builds its matmul kernels for
every new shape (the fp32 path calls MKL, which builds none). A run meets each distinct (batch, length) once per
worker process (`bench_speed.py` counts them).

``--profile`` splits the step of the default path (answer rows) by what runs it: ``torch.profiler`` over
``--repeats`` steps per batch size (the 8 batches in turn, after the warm-up), self CPU time per step in ms for the
matmuls (``aten::mm``/``addmm``/``bmm``: what the matmul peaks bound), the CPU attention kernels (forward and
backward), the kernels Inductor generated for the compiled layers (norms, rotary embeddings, activations, casts:
memory-bound), and everything else (autograd, dispatch, the eager code around the layers). The matmuls' achieved
rate follows from their FLOPs (FlopCounterMode on the same batches).
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
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--new-shapes", action="store_true", help="time a step at a batch shape the process has not run")
    mode.add_argument("--profile", action="store_true", help="split the step into matmuls, attention, fused kernels, rest")
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
    header = {"preset": args.preset, "overrides": args.overrides, "threads": args.threads,
              "compute_dtype": cfg.model.compute_dtype, "compiled": compiles(cfg.train, model_device(model))}
    if args.new_shapes:
        results = new_shapes(exp, cfg, step, [int(x) for x in args.sizes.split(",")], rng)
        if not results:
            raise SystemExit("bench_step: no batch size gave two batches of one shape; try other --sizes")
        out = {**header, "new_shapes": results,
               "mean_extra_ms": round(statistics.mean(r["extra_ms"] for r in results), 1)}
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"mean extra ms for a new shape: {out['mean_extra_ms']} (written to {args.out})")
        return
    if args.profile:
        out = {**header, "profile": profile(exp, cfg, step, [int(x) for x in args.sizes.split(",")], args.repeats, rng)}
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"(written to {args.out})")
        return
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
    out = {**header, "rows": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"(written to {args.out})")


def new_shapes(exp, cfg, step, sizes: list[int], rng: random.Random) -> list[dict]:
    """Per batch size: a step at a new shape, one at the same shape with new samples, and a repeat; ms each."""
    from fcit.models.compiled import compiles, training_compiled
    from fcit.models.device import model_device

    model = exp.model
    pool = list(exp.scenario.task_train(0))
    rows = []
    with training_compiled(model, compiles(cfg.train, model_device(model))):
        warm = exp.batcher.train_batch(rng.sample(pool, max(sizes) + 1))  # compiles, at a size not measured
        step(warm), step(warm)
        for bs in sizes:
            first, second = (exp.batcher.train_batch(rng.sample(pool, bs)) for _ in range(2))
            if tuple(first["input_ids"].shape) != tuple(second["input_ids"].shape):
                continue  # padded to another length: not the same shape
            ms = []
            for b in (first, second, second):
                t0 = time.perf_counter()
                step(b)
                ms.append(1000 * (time.perf_counter() - t0))
            row = {"batch": list(first["input_ids"].shape), "new_shape_ms": round(ms[0], 1),
                   "new_samples_ms": round(ms[1], 1), "repeat_ms": round(ms[2], 1),
                   "extra_ms": round(ms[0] - ms[1], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def _kind(name: str) -> str:
    if name in MATMULS or ("mkldnn" in name and "linear" in name):  # oneDNN's fused linear, where Inductor uses it
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name.startswith("## Call CompiledFxGraph"):  # self time of a compiled graph: its generated kernels
        return "fused kernels"
    return "rest"


def profile(exp, cfg, step, sizes: list[int], repeats: int, rng: random.Random) -> list[dict]:
    """Per batch size: ms per step by kind (self CPU time under torch.profiler), and the matmuls' GFLOP/s."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from torch.utils.flop_counter import FlopCounterMode

    from fcit.models.compiled import compiles, training_compiled
    from fcit.models.device import model_device

    model, sc = exp.model, exp.scenario
    by_size = {bs: [exp.batcher.train_batch(rng.sample(list(sc.task_train(k)), min(bs, len(sc.task_train(k)))))
                    for k in range(sc.num_tasks)] for bs in sizes}
    mm_flops = {}
    for bs, batches in by_size.items():  # eager, before compiling: the counter sees every op
        counter = FlopCounterMode(display=False)
        with counter:
            for b in batches:
                step(b)
        mm_flops[bs] = sum(v for k, v in counter.get_flop_counts()["Global"].items()
                           if ".".join(str(k).split(".")[:2]) in ("aten.mm", "aten.addmm", "aten.bmm")) / len(batches)
    rows = []
    with training_compiled(model, compiles(cfg.train, model_device(model))):
        for bs, batches in by_size.items():
            for b in batches:  # compiles, warms up
                step(b)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(repeats):
                    for b in batches:
                        step(b)
            n = repeats * len(batches)
            ms: dict[str, float] = {"matmul": 0.0, "attention": 0.0, "fused kernels": 0.0, "rest": 0.0}
            for ev in prof.key_averages():
                ms[_kind(ev.key)] += ev.self_cpu_time_total / 1000 / n
            total = sum(ms.values())
            row = {"batch": bs, "tokens": round(statistics.mean(b["input_ids"].numel() for b in batches)),
                   "ms_per_step": {k: round(v, 2) for k, v in ms.items()}, "total_ms": round(total, 2),
                   "share": {k: round(v / total, 3) for k, v in ms.items()},
                   "matmul_gflops": round(mm_flops[bs] / (ms["matmul"] / 1000) / 1e9, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
