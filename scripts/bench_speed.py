"""The embedded engine's speed: the default run, its FLOPs against the machine's matmul peaks, a step breakdown.

    .venv/bin/python scripts/bench_speed.py [--preset default] [--set KEY=VALUE ...] [--out bench_speed.json]
    .venv/bin/python scripts/bench_speed.py --scaling [--quick]      # wall time vs clients, samples, rounds

The default mode runs the experiment twice with the same config and seed, so both train the same steps:
  * **the run as `fcit run` runs it** (the worker pool, the compiled bf16 path where the machine has it): wall
    time, the run's own timing (setup, train, eval), Last; its achieved training FLOP/s;
  * **a probed run** with its clients in this process at one thread (``federation.workers=1``, ``threads=1``: what
    one pool worker does), whose probes see every step: the padded tokens, collation, forward (with the loss
    hooks), backward, optimizer (clip + AdamW), the rest of local training, and evaluation split into prefill (the
    first forward of each generate batch) and decode. The instrumentation wraps functions from this script only;
    the library runs unchanged.
Training FLOPs: FlopCounterMode over forward + backward of a sample of real training batches after the probed run
(the model as it trains), per padded token, times the padded tokens the run trained on. Matmul peaks are measured in
the same process at the model's shapes (tokens of a mean batch x hidden x intermediate), fp32 and bf16, at one
thread and at all threads; the machine's peak is the larger of (all threads) and (workers x one thread), which is
what the pool can use. ``bound_s`` is the training time at 60% of the fp32 peak (issue 13's bar: train faster).
``--scaling`` runs the default config at K = 50, 200, 1000 clients, data.synth.n_train 1000, 4000 and rounds 10, 20
(one factor at a time, as `fcit run` runs them); ``--quick`` adds scenario.stages=2 to every scaling run.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


class Probe:
    """Seconds and counts by name, plus the padded tokens and the (batch, length) shapes of the training batches."""

    def __init__(self):
        self.sec: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.tokens = 0
        self.shapes: set[tuple[int, int]] = set()

    def timed(self, name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sec[name] += time.perf_counter() - t0
                self.n[name] += 1
        return wrapper


PROBE = Probe()
_INSTALLED = []


def install(probe: Probe):
    """Wrap collation, the training forward, backward, the optimizer step and generation's forwards (once)."""
    if _INSTALLED:
        return
    _INSTALLED.append(True)
    import fcit.engines.loop as loop_mod  # noqa: F401  (the module local_train's callers import)
    import fcit.experiment as exp_mod
    import fcit.training.local as local
    from fcit.models.inputs import Batcher

    real_batch = Batcher.train_batch

    def train_batch(self, samples):
        t0 = time.perf_counter()
        b = real_batch(self, samples)
        probe.sec["collate"] += time.perf_counter() - t0
        probe.n["collate"] += 1
        probe.tokens += b["input_ids"].numel()
        probe.shapes.add(tuple(b["input_ids"].shape))
        return b

    Batcher.train_batch = train_batch
    local.answer_forward = probe.timed("forward", local.answer_forward)
    torch.Tensor.backward = probe.timed("backward", torch.Tensor.backward)
    torch.optim.AdamW.step = probe.timed("optimizer", torch.optim.AdamW.step)
    torch.nn.utils.clip_grad_norm_ = probe.timed("clip", torch.nn.utils.clip_grad_norm_)
    local._train = probe.timed("local_train", local._train)
    real_generate = exp_mod.generate

    def generate(model, *a, **k):
        top = model.get_base_model() if hasattr(model, "get_base_model") else model
        state = {}

        def pre(mod, args, kwargs):
            ids = kwargs.get("input_ids")
            state["kind"] = "prefill" if ids is None or ids.shape[1] > 1 else "decode"
            state["t0"] = time.perf_counter()

        def post(mod, args, kwargs, out):
            probe.sec["eval_" + state["kind"]] += time.perf_counter() - state["t0"]
            probe.n["eval_" + state["kind"]] += 1

        h1 = top.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = top.register_forward_hook(post, with_kwargs=True)
        try:
            return real_generate(model, *a, **k)
        finally:
            h1.remove(), h2.remove()

    exp_mod.generate = generate


def matmul_peak(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """GFLOP/s of (m x k) @ (k x n) in ``dtype``, best of a few timed blocks."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * m * k * n / (time.perf_counter() - t0))
    return best / 1e9


def flops_per_token(exp, n_batches: int = 12, answer_rows: bool = True) -> tuple[float, dict]:
    """Forward + backward FLOPs per padded token over real batches of the run's first stage's clients;
    ``answer_rows=False`` counts the last decoder layer at every position, as training did before it ran on the
    answer rows alone (the count of the README's earlier tables)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fcit.models import answer_loss
    from fcit.models.answer_loss import answer_forward

    if not answer_rows:
        real = answer_loss._rows_usable
        answer_loss._rows_usable = lambda layer: None
        try:
            return flops_per_token(exp, n_batches)
        finally:
            answer_loss._rows_usable = real

    sc = exp.scenario
    samples = [s for k in sc.stage_tasks(0) for s in sc.task_train(k)]
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(samples), generator=g).tolist()
    bs = exp.cfg.train.batch_size
    model, total, tokens = exp.model, 0, 0
    model.train()
    shapes = []
    n_batches = min(n_batches, max(1, len(samples) // bs))
    for i in range(n_batches):
        batch = exp.batcher.train_batch([samples[j] for j in idx[i * bs : (i + 1) * bs]])
        with FlopCounterMode(display=False) as fc:
            out = answer_forward(model, batch, full=not exp.cfg.train.fused)
            out.loss.backward()
        model.zero_grad(set_to_none=True)
        total += fc.get_total_flops()
        tokens += batch["input_ids"].numel()
        shapes.append(tuple(batch["input_ids"].shape))
    model.eval()
    return total / tokens, {"batches": n_batches, "mean_batch": [statistics.mean(s[0] for s in shapes),
                                                                 statistics.mean(s[1] for s in shapes)]}


def _run(cfg) -> tuple[float, object, object]:
    from fcit.experiment import Experiment

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        exp = Experiment(cfg, Path(tmp) / "run", progress=False)
        res = exp.run()
    return time.perf_counter() - t0, res, exp


def _summary(wall: float, res) -> dict:
    return {"wall_s": round(wall, 2), "timing": {k: round(v, 2) for k, v in res.timing.items()},
            "last": res.summary.last, "avg": res.summary.avg, "round_losses": [round(r.loss, 6) for r in res.rounds]}


def probed_run(preset: str, overrides: list[str], flops: bool = True) -> tuple[dict, object]:
    """The run with its clients in this process at one thread, every step probed; (report, experiment)."""
    from fcit.config import load_config

    probe = PROBE
    probe.__init__()
    install(probe)
    cfg = load_config(None, preset, [*overrides, "federation.workers=1", "threads=1"])
    wall, res, exp = _run(cfg)
    out = _summary(wall, res)
    out.update({"steps": probe.n["clip"], "local_runs": probe.n["local_train"], "padded_tokens": probe.tokens,
                "distinct_shapes": len(probe.shapes),
                "breakdown_s": {k: round(v, 2) for k, v in sorted(probe.sec.items())}})
    bd = out["breakdown_s"]
    bd["optimizer"] = round(bd.get("optimizer", 0.0) + bd.pop("clip", 0.0), 2)
    counted = sum(bd.get(k, 0.0) for k in ("collate", "forward", "backward", "optimizer"))
    bd["train_other"] = round(bd.get("local_train", 0.0) - counted, 2)
    if out["steps"]:
        out["per_step_ms"] = {k: round(1000 * bd.get(k, 0.0) / out["steps"], 2)
                              for k in ("collate", "forward", "backward", "optimizer", "train_other")}
    return out, exp


def peaks(exp, mean_batch: list[float], workers: int) -> dict:
    """fp32 and bf16 matmul peaks at the model's shapes: one thread, all threads, and what the pool can use."""
    text = exp.model.config.get_text_config()
    m = int(mean_batch[0] * mean_batch[1])
    h, inter = text.hidden_size, text.intermediate_size
    threads = torch.get_num_threads()
    out = {"shape_mkn": [m, h, inter], "threads": threads, "workers": workers}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            out[f"{name}_{n}t_gflops"] = round(max(matmul_peak(m, h, inter, dt), matmul_peak(m, inter, h, dt)), 1)
        torch.set_num_threads(threads)
        out[f"peak_{name}_gflops"] = max(out[f"{name}_{threads}t_gflops"], workers * out[f"{name}_1t_gflops"])
    return out


def one_run(preset: str, overrides: list[str], flops: bool = True) -> dict:
    from fcit.config import load_config
    from fcit.engines.pool import worker_plan
    from fcit.experiment import Experiment  # noqa: F401  (imported before the timed run)
    from fcit.models.compiled import compiles
    from fcit.models.device import resolve_device

    cfg = load_config(None, preset, overrides)
    device = resolve_device(cfg.device)
    workers, _ = worker_plan(cfg.federation.workers, cfg.threads, device, cfg.scenario.clients_per_round)
    wall, res, _ = _run(cfg)
    out = {"preset": preset, "overrides": overrides, "run": _summary(wall, res),
           "compute": {"compute_dtype": cfg.model.compute_dtype or cfg.model.dtype,
                       "compiled": compiles(cfg.train, device), "workers": workers}}
    probe, exp = probed_run(preset, overrides, flops)
    out["probed"] = probe
    if flops:
        torch.set_num_threads(cfg.threads or max(1, os.cpu_count() or 1))
        fpt, info = flops_per_token(exp)
        fpt_full, _ = flops_per_token(exp, answer_rows=False)
        pk = peaks(exp, info["mean_batch"], workers)
        train_flops = fpt * probe["padded_tokens"]
        full_flops = fpt_full * probe["padded_tokens"]
        train_s = res.timing["train"]
        achieved = train_flops / train_s / 1e9
        bound = train_flops / (0.6 * pk["peak_fp32_gflops"] * 1e9)
        # The same bound for the computation with the full last layer: what the run would need to beat had it not
        # dropped that work (the earlier tables' count).
        bound_full = full_flops / (0.6 * pk["peak_fp32_gflops"] * 1e9)
        out["flops"] = {"train_flops": float(f"{train_flops:.4g}"), "flops_per_padded_token": round(fpt),
                        "train_flops_full_last_layer": float(f"{full_flops:.4g}"),
                        "sample": info, "achieved_gflops": round(achieved, 1), **pk,
                        "fraction_of_fp32_peak": round(achieved / pk["peak_fp32_gflops"], 3),
                        "bound_s": round(bound, 1), "bound_full_last_layer_s": round(bound_full, 1),
                        "train_s": round(train_s, 1), "faster_than_bound": train_s < bound}
    return out


def table(r: dict) -> str:
    run, p, c = r["run"], r["probed"], r["compute"]
    lines = [f"default run ({c['workers']} workers, matmuls {c['compute_dtype']}, compiled {c['compiled']}): wall "
             f"{run['wall_s']} s, Last {run['last']:.2f}, Avg {run['avg']:.2f}",
             "  timing: " + ", ".join(f"{k} {v}" for k, v in run["timing"].items()),
             f"probed run (one process, one thread): wall {p['wall_s']} s, Last {p['last']:.2f}, steps {p['steps']}, "
             f"local runs {p['local_runs']}, distinct batch shapes {p.get('distinct_shapes', '-')}",
             "  timing: " + ", ".join(f"{k} {v}" for k, v in p["timing"].items())]
    if "per_step_ms" in p:
        lines.append("  per step (ms): " + ", ".join(f"{k} {v}" for k, v in p["per_step_ms"].items()))
    bd = p["breakdown_s"]
    lines.append(f"  eval: prefill {bd.get('eval_prefill', 0)} s, decode {bd.get('eval_decode', 0)} s")
    if "flops" in r:
        f = r["flops"]
        n = f["threads"]
        lines.append(f"training {f['train_flops']:.3g} FLOPs in {f['train_s']} s: {f['achieved_gflops']} GFLOP/s; "
                     f"matmul peaks at {f['shape_mkn']}: fp32 {f['fp32_1t_gflops']} (1 thread) / "
                     f"{f[f'fp32_{n}t_gflops']} ({n} threads), bf16 {f['bf16_1t_gflops']} / "
                     f"{f[f'bf16_{n}t_gflops']} GFLOP/s")
        lines.append(f"machine fp32 peak {f['peak_fp32_gflops']} GFLOP/s: {100 * f['fraction_of_fp32_peak']:.0f}% of "
                     f"it; at 60% of it training would take {f['bound_s']} s, the run took {f['train_s']} s "
                     f"({'faster' if f['faster_than_bound'] else 'slower'})")
        if "train_flops_full_last_layer" in f:
            lines.append(f"with the last layer at every position the run would do "
                         f"{f['train_flops_full_last_layer']:.3g} FLOPs; at 60% of the fp32 peak: "
                         f"{f['bound_full_last_layer_s']} s")
    return "\n".join(lines)


SCALING = [("clients", "scenario.num_clients", [50, 200, 1000]), ("n_train", "data.synth.n_train", [1000, 4000]),
           ("rounds", "scenario.rounds", [10, 20])]


def scaling(preset: str, base: list[str], quick: bool) -> dict:
    """Each value as `fcit run` runs it (wall, train, eval) and probed at one thread (per step, per local run)."""
    extra = ["scenario.stages=2"] if quick else []
    rows = []
    for factor, key, values in SCALING:
        for v in values:
            r = one_run(preset, base + extra + [f"{key}={v}"], flops=False)
            t, p = r["run"]["timing"], r["probed"]
            bd = p["breakdown_s"]
            per_step = 1000 * bd.get("local_train", 0.0) / max(1, p["steps"])
            stepping = sum(bd.get(k, 0.0) for k in ("forward", "backward", "optimizer", "collate"))
            rows.append({"factor": factor, "value": v, "wall_s": r["run"]["wall_s"], "setup_s": t.get("setup"),
                         "train_s": t.get("train"), "eval_s": t.get("eval"), "steps": p["steps"],
                         "local_runs": p["local_runs"], "probed_train_s": p["timing"].get("train"),
                         "ms_per_step": round(per_step, 1),
                         "fixed_ms_per_local_run": round(1000 * (bd.get("local_train", 0.0) - stepping)
                                                         / max(1, p["local_runs"]), 1)})
            print(json.dumps(rows[-1]), flush=True)
    return {"quick": quick, "extra_overrides": extra, "rows": rows}


def scaling_table(s: dict) -> str:
    head = ("factor", "value", "wall_s", "setup_s", "train_s", "eval_s", "steps", "local_runs", "probed_train_s",
            "ms_per_step", "fixed_ms_per_local_run")
    lines = [f"scaling ({'--quick: ' + ' '.join(s['extra_overrides']) if s['quick'] else 'full runs'})",
             " | ".join(head)]
    lines += [" | ".join(str(r[h]) for h in head) for r in s["rows"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--quick", action="store_true", help="scaling runs with scenario.stages=2")
    ap.add_argument("--out", default="bench_speed.json")
    args = ap.parse_args()
    if args.scaling:
        report = {"scaling": scaling(args.preset, args.overrides, args.quick)}
        text = scaling_table(report["scaling"])
    else:
        report = one_run(args.preset, args.overrides)
        text = table(report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(text)
    print(f"(written to {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
