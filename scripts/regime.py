"""Is the embedded benchmark in the paper's regime? Issue 16's bars, read off a `fcit compare` folder.

    python scripts/regime.py runs/bench-hom [--markdown] [--per-dataset] [--interference [METHOD]]

The folder holds `<method>-s<seed>/` run directories (what `scripts/benchmark.sh` writes). Every figure is a mean
over the seeds found for that method; a bar whose runs are missing is "not measured", never guessed. Per dataset,
MTL's final score is set against a constant answer's score on the same test set: the most frequent test answer
(for captions, the most frequent training caption) scored by the run's own scorer, which is the chance level a
model reaches without looking at the image. The ratio bars are given against both upper bounds: the centralized MTL
(``mtl``) and the federated one (``mtl-fed``, one stage over the union with the continual run's sample budget). The
issue's targets come from the paper's ratios to its MTL row, which the reference code most likely produced with the
federated run (reference section 6), so ``mtl-fed`` is the like-for-like denominator; both are printed, neither is
dropped. ``--interference`` prints, for one method (Finetune by default), what each stage took from each dataset
seen before it, as a mean over seeds (``fcit.eval.metrics.stage_drops``): which tasks overwrite which. Not computed
here: the server-optimizer bar (DISCO under each optimizer within 5 points of FedAvg; the `optimizers` part of
`scripts/benchmark.sh` writes those runs elsewhere).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional
from statistics import fmean as mean

from fcit.eval.metrics import new_datasets, stage_drops
from fcit.eval.scorers import score_dataset
from fcit.results import RunResult
from fcit.rundir import read_config

BASELINES = ["ewc", "lwf", "olora", "mlora", "moelora"]
NAMES = {"zeroshot": "Zero-shot", "finetune": "Finetune", "ewc": "EWC", "lwf": "LwF", "olora": "O-LoRA",
         "mlora": "M-LoRA", "moelora": "MoELoRA", "disco": "DISCO", "mtl": "MTL", "mtl-fed": "MTL-fed"}
UPPER = {"mtl": "centralized MTL", "mtl-fed": "federated MTL"}


def load_runs(folder: Path) -> dict[str, list[tuple[Path, RunResult]]]:
    runs: dict[str, list[tuple[Path, RunResult]]] = defaultdict(list)
    for d in sorted(folder.iterdir()):
        if d.is_dir() and (d / "metrics.json").is_file() and "-s" in d.name:
            runs[d.name.rsplit("-s", 1)[0]].append((d, RunResult.load(d)))
    return runs


def constant_scores(run_dir: Path, datasets: list[str]) -> dict[str, float]:
    """Each dataset's score when every test sample gets the same, most frequent, answer."""
    from fcit.data.loader import open_benchmark

    cfg = read_config(run_dir)
    bench = open_benchmark(cfg, progress=False)
    out = {}
    for d in datasets:
        test = bench.test(d)
        if test[0].refs and len(test[0].refs) > 1:  # captions: the most frequent training caption
            answer = Counter(s.answer for s in bench.train(d)).most_common(1)[0][0]
        else:
            answer = Counter(s.answer for s in test).most_common(1)[0][0]
        out[d] = float(score_dataset(d, [answer] * len(test), test, cfg.eval.scoring)["score"])
    return out


def report(folder: Path) -> list[tuple[str, str, str, str]]:
    """(bar, target, measured, verdict) rows."""
    runs = load_runs(folder)
    last = {m: mean([r.summary.last for _, r in rs]) for m, rs in runs.items()}
    seeds = {m: len(rs) for m, rs in runs.items()}
    rows: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    def ratio_row(method: str, lo: float, hi: Optional[float], ref: str):
        target = f"{lo:.2f}-{hi:.2f}" if hi is not None else f">= {lo:.2f}"
        bar = f"{NAMES[method]} Last / {UPPER[ref]} Last"
        if method in last and ref in last:
            r = last[method] / last[ref]
            rows.append((bar, target, f"{last[method]:.1f} / {last[ref]:.1f} = {r:.2f}",
                         verdict(lo <= r and (hi is None or r <= hi))))
        else:
            rows.append((bar, target, "-", "not measured"))

    for ref in UPPER:
        ratio_row("zeroshot", 0.25, 0.55, ref)
        ratio_row("finetune", 0.55, 0.80, ref)
    have = [b for b in BASELINES if b in last]
    if "finetune" in last and len(have) == len(BASELINES):
        above = [NAMES[b] for b in have if last[b] > last["finetune"]]
        rows.append(("continual baselines above Finetune on Last", ">= 3 of 5",
                     f"{len(above)} ({', '.join(above) or 'none'})", verdict(len(above) >= 3)))
    else:
        rows.append(("continual baselines above Finetune on Last", ">= 3 of 5", f"{len(have)} of 5 run",
                     "not measured"))
    for ref in UPPER:
        ratio_row("disco", 0.85, None, ref)
    if "disco" in last and have:
        best = max(have, key=lambda b: last[b])
        gap = last["disco"] - last[best]
        rows.append(("DISCO Last - best baseline", ">= +5", f"{gap:+.1f} (best: {NAMES[best]} {last[best]:.1f})",
                     verdict(gap >= 5 and len(have) == len(BASELINES)) if len(have) == len(BASELINES)
                     else "not measured"))
    if "disco" in runs:
        arts = [r.method_artifacts for _, r in runs["disco"]]
        cross = [a.get("max_cross_cosine") for a in arts if a.get("max_cross_cosine") is not None]
        formed = [a.get("subspaces_formed") for a in arts]
        gate = [a.get("routing_accuracy") for a in arts if a.get("routing_accuracy") is not None]
        tasks = len(runs["disco"][0][1].matrix.rows)  # one stage per task in Hom
        rows.append(("highest cross-task cosine of DISCO's identity tokens", ">= 0.75",
                     " / ".join(f"{c:.2f}" for c in cross) or "-",
                     verdict(bool(cross) and min(cross) >= 0.75) if cross else "not measured"))
        # One per task: as many subspaces as tasks, and no two tasks on the same one (a task split over two
        # subspaces leaves another without one of its own).
        own = [len(set(a.get("slot_of_dataset", {}).values())) for a in arts]
        rows.append(("DISCO subspaces, one per task (formed; tasks on a subspace of their own)", f"{tasks}",
                     " / ".join(f"{f}; {o}" for f, o in zip(formed, own)),
                     verdict(all(f == tasks and o == tasks for f, o in zip(formed, own)))))
        rows.append(("test samples with the largest gate on their own task's subspace", ">= 90%",
                     " / ".join(f"{100 * g:.0f}%" for g in gate) or "-",
                     verdict(bool(gate) and min(gate) >= 0.9) if gate else "not measured"))
    if "mtl" in runs:
        run_dir, res = runs["mtl"][0]
        final = res.matrix.rows[-1]
        chance = constant_scores(run_dir, list(final))
        per = {d: mean([r.matrix.rows[-1][d] for _, r in runs["mtl"]]) for d in final}
        for d in sorted(final):
            rows.append((f"learnable: MTL {d} - constant answer", ">= +20",
                         f"{per[d]:.1f} - {chance[d]:.1f} = {per[d] - chance[d]:+.1f}",
                         verdict(per[d] - chance[d] >= 20)))
    rows.append(("seeds per method", "3", ", ".join(f"{NAMES.get(m, m)} {n}" for m, n in sorted(seeds.items())),
                 verdict(all(n >= 3 for n in seeds.values()))))
    return rows


def per_dataset(folder: Path) -> str:
    """Markdown: each method's final score per dataset (mean over its seeds), under the constant answer's."""
    runs = load_runs(folder)
    if not runs:
        return ""
    order = [m for m in NAMES if m in runs] + sorted(m for m in runs if m not in NAMES)
    datasets: list[str] = []  # in stage order
    for m in order:
        for _, r in runs[m]:
            datasets += [d for d in r.matrix.datasets if d in r.matrix.rows[-1] and d not in datasets]
    chance = constant_scores(runs[order[0]][0][0], datasets)
    lines = ["| | seeds | " + " | ".join(datasets) + " |", "|---|---:|" + "---:|" * len(datasets),
             "| constant answer (the most frequent test answer) | | "
             + " | ".join(f"{chance[d]:.1f}" for d in datasets) + " |"]
    for m in order:
        finals = [r.matrix.rows[-1] for _, r in runs[m]]
        cells = [f"{mean([f[d] for f in finals]):.1f}" if all(d in f for f in finals) else "-" for d in datasets]
        lines.append(f"| {NAMES.get(m, m)} | {len(finals)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def interference(folder: Path, method: str = "finetune", top: int = 5) -> str:
    """Markdown: the score each stage took from each earlier dataset (mean over the method's seeds), stages named by
    the datasets they bring; then the ``top`` largest losses."""
    runs = [r for _, r in load_runs(folder).get(method, [])]
    if not runs:
        return f"(no {method} runs in {folder})\n"
    stages = [" + ".join(ds) for ds in new_datasets(runs[0].matrix)]
    if any([" + ".join(ds) for ds in new_datasets(r.matrix)] != stages for r in runs):
        raise SystemExit(f"regime: the {method} runs in {folder} do not share one stage order")
    drops = [stage_drops(r.matrix) for r in runs]
    datasets = runs[0].matrix.datasets
    cell: dict[tuple[str, int], float] = {}
    for t in range(len(stages) - 1):
        for d in datasets:
            if all(d in run[t] for run in drops):
                cell[(d, t)] = mean([run[t][d] for run in drops])
    lines = [f"Score taken by each stage from each dataset seen before it, {NAMES.get(method, method)}, mean of "
             f"{len(runs)} seed(s) (negative: it rose)", "",
             "| dataset \\ stage | " + " | ".join(stages[1:]) + " |", "|---|" + "---:|" * (len(stages) - 1)]
    for d in datasets:
        if any((d, t) in cell for t in range(len(stages) - 1)):
            lines.append(f"| {d} | " + " | ".join(f"{round(cell[(d, t)], 1) + 0.0:.1f}" if (d, t) in cell else ""
                                                   for t in range(len(stages) - 1)) + " |")
    worst = sorted(cell.items(), key=lambda kv: -kv[1])[:top]
    lines += ["", "Largest: " + "; ".join(f"{d} loses {v:.1f} in the {stages[t + 1]} stage" for (d, t), v in worst)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--markdown", action="store_true", help="a markdown table instead of aligned text")
    ap.add_argument("--per-dataset", action="store_true",
                    help="also print each method's final score per dataset (mean over seeds), markdown")
    ap.add_argument("--interference", nargs="?", const="finetune", metavar="METHOD",
                    help="also print what each stage took from each earlier dataset, for METHOD (default finetune)")
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        print(f"regime: {args.folder}: no such folder", file=sys.stderr)
        return 2
    rows = report(args.folder)
    if args.markdown:
        print("| bar | target | measured | verdict |\n|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        w = max(len(r[0]) for r in rows)
        for r in rows:
            print(f"{r[0]:<{w}}  {r[1]:>10}  {r[2]:<40}  {r[3]}")
    if args.per_dataset:
        print("\n" + per_dataset(args.folder), end="")
    if args.interference:
        print("\n" + interference(args.folder, args.interference), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
