"""``fcit data show``: what a setting trains stage by stage, how its clients are sized, what its samples look like."""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from fcit.config import Config
from fcit.data import registry
from fcit.data.loader import Benchmark, open_benchmark
from fcit.data.partition import size_stats
from fcit.data.records import Sample
from fcit.data.scenario import Scenario
from fcit.errors import FcitError

SETTINGS = {
    "task-hom": ("task", "hom"),
    "task-het": ("task", "het"),
    "cap-hom": ("capability", "hom"),
    "cap-het": ("capability", "het"),
}
SAMPLES_PER_DATASET = 3
_BAR = 40


def histogram(sizes: np.ndarray, bins: int = 8) -> list[str]:
    """Client sizes as text bars; integer bin edges so every line reads as 'clients holding a..b samples'."""
    lo, hi = int(sizes.min()), int(sizes.max())
    bins = max(1, min(bins, len(sizes), hi - lo + 1))
    edges = np.unique(np.linspace(lo, hi + 1, bins + 1).round().astype(int))
    counts, _ = np.histogram(sizes, bins=edges)
    width = len(str(hi))
    peak = max(int(counts.max()), 1)
    lines = []
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        bar = "#" * int(round(_BAR * c / peak)) if c else ""
        lines.append(f"{a:>{width}}..{b - 1:<{width}} | {bar} {c}")
    return lines


def scenario_for(cfg: Config, setting: str, beta: Optional[float], bench: Benchmark) -> Scenario:
    if setting not in SETTINGS:
        raise FcitError(f"data show: unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    kind, mode = SETTINGS[setting]
    update = {"setting": kind, "mode": mode}
    if beta is not None:
        if not beta > 0:
            raise FcitError(f"data show: beta must be > 0 (got {beta})")
        update["beta"] = float(beta)
    return Scenario(cfg.scenario.model_copy(update=update), cfg.seed, bench, partitions_root=cfg.data.partitions)


def _generator(root: Path) -> str:
    """" (FCIT-Synth vN)" for a generated benchmark (its manifest says which generator wrote it), else ""."""
    import json

    try:
        version = json.loads((Path(root) / "manifest.json").read_text())["generator_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f" (FCIT-Synth v{version})"


def report(sc: Scenario) -> str:
    c = sc.cfg
    source = f"released partitions {sc.partitions_root}" if sc.partitions_root else f"Dirichlet draw, seed {sc.seed}"
    out = [
        f"Scenario {sc.name}: {sc.num_stages} stages, {c.num_clients} clients, {c.clients_per_round} per round, "
        f"{c.rounds} rounds per stage, beta {c.beta:g}, min_size {c.min_size} ({source})",
        f"Benchmark: {sc.bench.root}{_generator(sc.bench.root)}",
        "",
        "Tasks:",
    ]
    for k, (name, ds) in enumerate(zip(sc.task_names, sc.tasks)):
        parts = ", ".join(f"{d} ({registry.get(d).answer_type}, {len(sc.bench.train(d))} train / "
                          f"{len(sc.bench.test(d))} test)" for d in ds)
        out.append(f"  task {k}: {name}: {parts}")
    out += ["", "Stages:"]
    for t in range(sc.num_stages):
        row = f"  stage {t + 1}: tasks {sc.stage_tasks(t)} = {', '.join(sc.stage_datasets(t))}"
        if sc.table is not None:
            row += f"; positions -> tasks {sc.table[t]}"
        out.append(row)
        out.append(f"           evaluated after it: {', '.join(sc.seen_datasets(t))}")
    out += ["", "Client sizes per task (samples per client):"]
    used = sorted({k for t in range(sc.num_stages) for k in sc.stage_tasks(t)})
    for k in used:
        sizes = sc.client_sizes(k)
        st = size_stats(sizes)
        out.append(
            f"  task {k} {sc.task_names[k]}: n={int(sizes.sum())} min {st['min']} median {st['median']:g} "
            f"max {st['max']} mean {st['mean']:.1f} Gini {st['gini']:.3f}"
        )
        out += ["      " + line for line in histogram(sizes)]
    return "\n".join(out)


def templates(bench: Benchmark, datasets: list[str], top: int = 2) -> list[str]:
    """How each dataset's instructions end (LLaVA-style suffixes), with their share of the training samples: on a
    real release this shows how much the tasks' instructions overlap, to set beside FCIT-Synth's."""
    out = ["", "Instruction endings (last line of the instruction, share of training samples):"]
    for d in datasets:
        train = bench.train(d)
        ends = Counter(s.prompt.strip().split("\n")[-1] for s in train)
        shown = "; ".join(f'"{textwrap.shorten(t, 80, placeholder="...")}" {100 * n / len(train):.0f}%'
                          for t, n in ends.most_common(top))
        more = f" (+{len(ends) - top} more)" if len(ends) > top else ""
        out.append(f"  {d}: {shown}{more}")
    return out


def task_samples(sc: Scenario, limit: int, seed: int = 0) -> dict[str, list[Sample]]:
    """Up to ``limit`` training samples of each task, a seeded draw (the same on every call)."""
    out = {}
    for k, name in enumerate(sc.task_names):
        pool = sc.task_train(k)
        out[name] = random.Random(seed).sample(pool, min(limit, len(pool)))
    return out


def overlap_report(pairs: list[tuple[float, str, str]], encoder: str, per_task: int, top: int = 5) -> str:
    """The most similar task pairs by identity token, to set beside DISCO's tau (0.9), the cosine at which two
    tasks' clients would share a subspace: how hard routing is on this data."""
    if not pairs:
        return "\nIdentity-token overlap: fewer than two tasks."
    out = ["", f"Identity-token overlap ({encoder}; each task's token the mean of up to {per_task} training "
               "instructions; cosine between tasks, highest first):"]
    out += [f"  {c:.3f}  {a} / {b}" for c, a, b in pairs[:top]]
    return "\n".join(out)


def render_samples(bench: Benchmark, datasets: list[str], path: Path, per_dataset: int = SAMPLES_PER_DATASET) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows, cols = len(datasets), per_dataset
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for i, d in enumerate(datasets):
        samples = bench.test(d, limit=per_dataset)
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(samples):
                ax.axis("off")
                continue
            s = samples[j]
            if s.image is not None:
                with Image.open(s.image) as im:
                    im = im.convert("RGB")
                    im.thumbnail((256, 256))
                    ax.imshow(np.asarray(im))
            q = textwrap.shorten(s.prompt.replace("\n", " "), 110, placeholder="...")
            a = textwrap.shorten(s.answer.replace("\n", " "), 50, placeholder="...")
            ax.set_xlabel("\n".join(textwrap.wrap(f"Q: {q}", 40) + textwrap.wrap(f"A: {a}", 40)), fontsize=6.5)
            if j == 0:
                ax.set_ylabel(d, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def show(cfg: Config, setting: str, beta: float | None, out: Path, bench: Optional[Benchmark] = None) -> str:
    """Text report of ``setting`` under ``cfg`` (beta overridden when given); writes ``out/samples.png``."""
    bench = bench or open_benchmark(cfg)
    return show_scenario(scenario_for(cfg, setting, beta, bench), bench, out)


def show_scenario(sc: Scenario, bench: Benchmark, out: Path) -> str:
    """``show`` for a scenario already built (``fcit data show --identity`` reuses it for the task samples)."""
    datasets = [d for ds in sc.tasks for d in ds]
    text = "\n".join([report(sc), *templates(bench, datasets)])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    render_samples(bench, datasets, out / "samples.png")
    return text + f"\n\nwrote {out / 'samples.png'}"
