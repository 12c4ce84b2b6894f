"""Replay DISCO's server-side organization for a finished run without training, and compare it with the run's log.

With the text identity, a client's token depends only on its data, so the whole routing (which client trains which
subspace, in every round) can be recomputed in seconds from the run's config. Use it to check that a change to the
clustering leaves a run's routing as it was, or to try other ``tau`` / ``min_share`` values:

    .venv/bin/python scripts/disco_routing_replay.py runs/bench-disco-hom/disco-s2 [--set method.params.tau=0.85]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

from fcit.config import Config, parse_override
from fcit.data.loader import open_benchmark
from fcit.data.scenario import Scenario
from fcit.methods import build_method
from fcit.methods.base import StageInfo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    raw = json.loads((args.run_dir / "config.json").read_text())
    # Runs before 2026-12-01 named Reddi et al.'s tau federation.tau.
    if "tau" in raw.get("federation", {}):
        raw["federation"]["adaptivity"] = raw["federation"].pop("tau")
    for item in args.overrides:
        key, value = parse_override(item)
        *path, last = key.split(".")
        d = raw
        for k in path:
            d = d[k]
        d[last] = value
    cfg = Config.model_validate(raw)
    disco = build_method(cfg)
    if disco.name != "disco" or disco.params.identity != "text":
        raise SystemExit("replay needs a DISCO run with the text identity (image tokens need the model)")
    sc = Scenario(cfg.scenario, cfg.seed, open_benchmark(cfg, progress=False), partitions_root=cfg.data.partitions)
    for t in range(sc.num_stages):
        info = StageInfo(stage=t, num_stages=sc.num_stages, tasks=sc.stage_tasks(t))
        for r in range(cfg.scenario.rounds):
            clients = sc.assignments(t, r)
            info = dataclasses.replace(info, round=r, assigned=[list(sc.tasks[c.task]) for c in clients])
            ids = [disco.client_identity(None, sc.client_data(c.task, c.client_id), info) for c in clients]
            plan = disco.plan_round(info, ids, {})
            groups = defaultdict(list)
            for i, p in enumerate(plan.clients):
                groups[p["subspace"]].append(i)
            # What aggregation does to the global tokens once every planned client has uploaded.
            disco.update_tokens(plan, dict(groups))
    slots = defaultdict(set)
    for e in disco.routing_log:
        for d in e["datasets"]:
            slots[d].add(e["subspace"])
    print(f"subspaces used: {int(disco.used.sum())}")
    print("dataset -> subspaces:", {d: sorted(v) for d, v in slots.items()})
    log = args.run_dir / "disco" / "routing.json"
    if log.exists():
        old = [(e["stage"], e["round"], e["position"], e["subspace"]) for e in json.loads(log.read_text())["routing"]]
        new = [(e["stage"], e["round"], e["position"], e["subspace"]) for e in disco.routing_log]
        diff = [(a, b) for a, b in zip(old, new) if a != b]
        print("same routing as the run" if old == new else
              f"routing differs from the run for {len(diff)} of {len(old)} clients, first: {diff[:3]}")


if __name__ == "__main__":
    main()
