"""``fcit compare``: several methods (and server optimizers) on one setting with shared seeds, in one process.

The benchmark and the base model are loaded once; every (method, optimizer, seed) gets its own run directory under
the comparison folder, and the paper-style table (Last / Avg, mean +- std over seeds) is written beside them.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from fcit.config import Config
from fcit.errors import FcitError
from fcit.experiment import write_json
from fcit.launch import run
from fcit.methods.base import Kind
from fcit.results import RunResult
from fcit.runtime import Runtime


def _canonical(cfg: Config) -> dict:
    """What a run computes from: the config without where and how fast it ran, with the method's parameters
    resolved (so ``lambda: 1000`` given explicitly equals the default 1000)."""
    from fcit.methods import REGISTRY

    d = cfg.model_dump(exclude={"out_dir", "run_name", "threads"})
    method = REGISTRY.get(cfg.method.name)
    if method is not None:
        d["method"]["params"] = method.Params.model_validate(cfg.method.params).model_dump()
    return d


def _finished(run_dir: Path, cfg: Config) -> RunResult | None:
    """The metrics of a finished run of exactly this config in ``run_dir`` (an interrupted comparison, or one
    assembled from runs made elsewhere), else None. A finished run of another config is an error, not a reuse."""
    import json

    m, c = run_dir / "metrics.json", run_dir / "config.json"
    if not m.exists():
        return None
    if not c.exists() or _canonical(Config.model_validate(json.loads(c.read_text()))) != _canonical(cfg):
        raise FcitError(f"compare: {run_dir} holds a finished run of a different config; remove it or pick --out")
    return RunResult.load(run_dir)


def compare(cfg: Config, methods: list[str], seeds: list[int], aggregators: list[str] | None = None,
            out: Path | None = None, progress: bool = True) -> tuple[Path, str]:
    from fcit.eval.metrics import mean_std
    from fcit.methods import REGISTRY
    from fcit.report.tables import results_markdown

    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise FcitError(f"compare: unknown method(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    aggregators = aggregators or [cfg.federation.aggregator]
    sc = cfg.scenario
    out = Path(out) if out else Path(cfg.out_dir) / (
        f"compare-{sc.setting}-{sc.mode}-b{sc.beta:g}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    # Validate every combination before the first (long) run starts.
    combos = []
    for m in methods:
        for agg in aggregators if REGISTRY[m].kind == Kind.FEDERATED else [aggregators[0]]:
            for seed in seeds:
                c = cfg.model_copy(deep=True)
                c = Config.model_validate({**c.model_dump(), "seed": seed,
                                           "method": {**c.method.model_dump(), "name": m},
                                           "federation": {**c.federation.model_dump(), "aggregator": agg}})
                REGISTRY[m](c)
                combos.append((m, agg, seed, c))
    rt = Runtime.build(cfg, progress=progress)
    results: dict[tuple[str, str], list[RunResult]] = {}
    t0 = time.perf_counter()
    for i, (m, agg, seed, c) in enumerate(combos):
        label = m if len(aggregators) == 1 else f"{m}+{agg}"
        if progress:
            print(f"[{i + 1}/{len(combos)}] {label} seed {seed}", flush=True)
        run_dir = out / f"{label}-s{seed}"
        metrics = _finished(run_dir, c)
        if metrics is None:
            # Not finished (``_finished`` returned None): a checkpoint means an interrupted run to continue.
            _, metrics = run(c, run_dir, runtime=rt, progress=progress, resume=(run_dir / "checkpoint").exists())
        elif progress:
            print(f"  reusing the finished run in {run_dir}", flush=True)
        results.setdefault((m, agg), []).append(metrics)
    rows = []
    for (m, agg), ms in results.items():
        label = m if len(aggregators) == 1 else f"{m} ({agg})"
        row = {"method": label}
        for key in ("last", "avg", "forgetting"):
            vals = [getattr(x.summary, key) for x in ms if getattr(x.summary, key) is not None]
            if vals:
                row[key] = mean_std(vals) if len(vals) > 1 else vals[0]
        row["seconds"] = sum(x.timing["total"] for x in ms) / len(ms)
        rows.append(row)
    title = (f"### {sc.setting}-{sc.mode}, beta={sc.beta:g}, seeds {','.join(map(str, seeds))}"
             f" ({len(combos)} runs, {time.perf_counter() - t0:.0f}s)\n\n")
    table = title + results_markdown(rows, ["last", "avg", "forgetting"])
    (out / "table.md").write_text(table)
    write_json(out / "results.json", {"rows": rows, "seeds": seeds, "methods": methods, "aggregators": aggregators})
    return out, table
