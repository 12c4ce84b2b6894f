"""``fcit compare``: several methods (and server optimizers) on one setting with shared seeds, in one process.

The benchmark and the base model are loaded once; every (method, optimizer, seed) gets its own run directory under
the comparison folder, and the paper-style table (Last / Avg, mean +- std over seeds) is written beside them. When
the runs of the table come from different environments (``fcit.environment.COMPARED``), a one-line warning goes to
stderr and the differences are written under the table.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from fcit import environment
from fcit.config import Config, one_line
from fcit.errors import FcitError
from fcit.jsonio import write_json
from fcit.launch import run
from fcit.methods.base import Kind
from fcit.results import RunResult
from fcit.rundir import finished_result
from fcit.runtime import Runtime


def _label(method: str, agg: str, aggregators: list[str]) -> str:
    return method if len(aggregators) == 1 else f"{method}+{agg}"


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
                try:
                    c = Config.model_validate({**c.model_dump(), "seed": seed,
                                               "method": {**c.method.model_dump(), "name": m},
                                               "federation": {**c.federation.model_dump(), "aggregator": agg}})
                except ValidationError as err:
                    raise FcitError(f"compare: {m} seed {seed} aggregator {agg}: {one_line(err)}") from None
                REGISTRY[m](c)
                combos.append((m, agg, seed, c))
    # Damaged or foreign finished runs are reported now, not after hours of the runs before them.
    for m, agg, seed, c in combos:
        finished_result(out / f"{_label(m, agg, aggregators)}-s{seed}", c)
    rt = None  # built on the first run to train: a comparison of finished runs loads no model
    results: dict[tuple[str, str], list[RunResult]] = {}
    envs: dict[str, dict | None] = {}
    t0 = time.perf_counter()
    for i, (m, agg, seed, c) in enumerate(combos):
        label = _label(m, agg, aggregators)
        if progress:
            print(f"[{i + 1}/{len(combos)}] {label} seed {seed}", flush=True)
        run_dir = out / f"{label}-s{seed}"
        metrics = finished_result(run_dir, c)
        if metrics is None:
            # Not finished (``_finished`` returned None): a checkpoint means an interrupted run to continue.
            # Any trace of an earlier attempt (config.json) means continue it: a fresh run would be refused there.
            rt = rt or Runtime.build(cfg, progress=progress)
            _, metrics = run(c, run_dir, runtime=rt, progress=progress, resume=(run_dir / "config.json").exists())
        elif progress:
            print(f"  reusing the finished run in {run_dir}", flush=True)
        results.setdefault((m, agg), []).append(metrics)
        envs[run_dir.name] = metrics.environment or environment.of_run_dir(run_dir)
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
    note = environment.combined_note(envs)
    if note:
        print(f"warning: compare: {note[0]} (see {out / 'table.md'})", file=sys.stderr)
        table = table.rstrip("\n") + "\n\n" + "\n".join(f"Note: {ln}" if i == 0 else ln
                                                     for i, ln in enumerate(note)) + "\n"
    (out / "table.md").write_text(table)
    write_json(out / "results.json", {"rows": rows, "seeds": seeds, "methods": methods, "aggregators": aggregators,
                                      "environments": envs, "environment_note": note})
    return out, table
