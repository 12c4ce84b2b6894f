"""Overhead of the Flower engines against the in-process engine on the smoke setting (the equivalence setting:
2 stages, 3 rounds, 4 clients of which 2 per round, the embedded base).

For each engine it runs the same experiment and reports
* the wall time of the stage loop (``timing.total``: after set-up, so after Ray's start-up for flower-sim),
* the mean wall time of a round, also without each stage's first round (where Ray actors build their model),
* the bytes sent per round (server -> clients and clients -> server, tensor payloads),
and the ratio flower-sim / in-process. ``--deployment`` adds a SuperLink with 4 SuperNodes on 127.0.0.1.

    .venv/bin/python scripts/bench_flower.py [--method finetune] [--deployment] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fcit.config import load_config
from fcit.launch import run


def measure(engine: str, args, work: Path, extra: dict | None = None) -> dict:
    over = {"method.name": args.method, "scenario.rounds": 3, "threads": args.threads, "federation.engine": engine,
            "out_dir": str(work), "flower.cpus": args.cpus}
    over.update(extra or {})
    if args.data_root:
        over["data.root"] = args.data_root
    cfg = load_config(preset="smoke", overrides=over)
    t0 = time.perf_counter()
    _, result = run(cfg, work / engine, progress=False)
    m = result.to_dict()
    wall = time.perf_counter() - t0
    rounds = m["rounds"]
    later = [r["seconds"] for r in rounds if r["round"] > 0]
    return {
        "engine": engine,
        "end_to_end_s": wall,
        "stage_loop_s": m["timing"]["total"],
        "round_s": statistics.mean(r["seconds"] for r in rounds),
        "round_s_after_first": statistics.mean(later) if later else float("nan"),
        "bytes_down_per_round": statistics.mean(r["bytes_down"] for r in rounds),
        "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in rounds),
        "matrix": m["matrix"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="finetune")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every client and of the server")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (one per client actor)")
    ap.add_argument("--deployment", action="store_true", help="also run a local SuperLink + 4 SuperNodes")
    ap.add_argument("--data-root", help="FCIT-Synth cache folder (default: the user cache)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [measure("inprocess", args, work), measure("flower-sim", args, work)]
        if args.deployment:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
            from local_deployment import LocalDeployment

            with LocalDeployment(4, work / "federation", node_threads=args.threads) as fed:
                rows.append(measure("flower", args, work, {"flower.superlink": fed.address,
                                                           "flower.insecure": True}))
    base = rows[0]
    print(f"method {args.method}, smoke setting (2 stages x 3 rounds, 2 of 4 clients per round), "
          f"{args.threads} thread(s) per client\n")
    print("| engine | stage loop (s) | round (s) | round after the first of a stage (s) | ratio to in-process "
          "(after first) | down / up per round (KB) | same matrix |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["round_s_after_first"] / base["round_s_after_first"]
        print(f"| {r['engine']} | {r['stage_loop_s']:.1f} | {r['round_s']:.2f} | {r['round_s_after_first']:.2f} | "
              f"{ratio:.2f}x | {r['bytes_down_per_round'] / 1024:.0f} / {r['bytes_up_per_round'] / 1024:.0f} | "
              f"{'yes' if r['matrix'] == base['matrix'] else 'NO'} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
