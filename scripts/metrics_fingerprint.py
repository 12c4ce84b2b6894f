"""Record what a set of fcit runs computes, without their timings, and compare two such records.

A refactoring must not change results: record before (``run --out before.json``), change the code, record after,
then ``diff before.json after.json`` (exit 1 on any difference in a value both records hold; keys only the newer
record has are listed, not counted as differences).

    python scripts/metrics_fingerprint.py run --out before.json [--only smoke] [--with-default]
    python scripts/metrics_fingerprint.py diff before.json after.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SMOKE = {
    **{f"smoke-{m}": ["--preset", "smoke", "--method", m]
       for m in ("zeroshot", "finetune", "ewc", "lwf", "olora", "mlora", "moelora", "disco", "mtl")},
    **{f"smoke-het-{m}": ["--preset", "smoke", "--method", m, "--set", "scenario.mode=het", "--set",
                          "scenario.num_clients=6", "--set", "scenario.clients_per_round=5"]
       for m in ("finetune", "disco")},
    "smoke-disco-fedadam": ["--preset", "smoke", "--method", "disco", "--set", "federation.aggregator=fedadam"],
    "smoke-finetune-fedavgm-prox": ["--preset", "smoke", "--method", "finetune", "--set",
                                    "federation.aggregator=fedavgm", "--set", "federation.prox_mu=0.01"],
}
DEFAULT = {"default-finetune": ["--method", "finetune"]}
# Wall-clock fields and the environment summary (commit, versions): the only things a rerun may change.
TIMING_KEYS = {"timing", "seconds", "environment"}


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def record(names: dict[str, list[str]], threads: int, dest: Path) -> None:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in names.items():
            cmd = [sys.executable, "-m", "fcit.cli", "run", *args, "--set", f"threads={threads}",
                   "--out", tmp, "--name", name, "--quiet"]
            print(f"[fingerprint] {name}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            out[name] = strip(json.loads((Path(tmp) / name / "metrics.json").read_text()))
            dest.write_text(json.dumps(out, indent=1, sort_keys=True))


def diff(a, b, path="") -> tuple[list[str], list[str]]:
    """(differences, keys only in b)."""
    if isinstance(a, dict) and isinstance(b, dict):
        d, added = [], [f"{path}.{k}" for k in b if k not in a]
        for k in a:
            if k not in b:
                d.append(f"{path}.{k}: missing in the second record")
                continue
            dd, aa = diff(a[k], b[k], f"{path}.{k}")
            d += dd
            added += aa
        return d, added
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"], []
        d, added = [], []
        for i, (x, y) in enumerate(zip(a, b)):
            dd, aa = diff(x, y, f"{path}[{i}]")
            d += dd
            added += aa
        return d, sorted(set(added))
    return ([] if a == b else [f"{path}: {a!r} vs {b!r}"]), []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--with-default", action="store_true", help="also the default run (about 3-4 minutes)")
    r.add_argument("--only", help="comma-separated run names")
    r.add_argument("--threads", type=int, default=2)
    d = sub.add_parser("diff")
    d.add_argument("a")
    d.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "run":
        names = {**SMOKE, **(DEFAULT if args.with_default else {})}
        if args.only:
            names = {k: v for k, v in names.items() if k in args.only.split(",")}
        record(names, args.threads, Path(args.out))
        return 0
    a, b = json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())
    diffs, added = diff(a, b)
    for line in diffs[:50]:
        print("DIFF", line)
    for line in sorted(set(k.split("[")[0] for k in added))[:50]:
        print("ADDED", line)
    print(f"{len(diffs)} differences over {len(a)} runs")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
