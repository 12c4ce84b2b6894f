"""``fcit matrix``: the paper's evaluation grid, methods x settings x scenarios x betas x seeds, in one folder.

Every cell is one run directory under the matrix folder, named ``<method>-<setting>-<scenario>-b<beta>-s<seed>``.
Reuse and resume are ``fcit compare``'s: a finished run of exactly the cell's config is read back
(``rundir.finished_result``, identity by ``rundir.canonical``, so threads and the worker pool may differ), a started
one is resumed from its checkpoint, a finished run of another config is refused before anything trains.

A method that never trains (``Kind.NONE``: zero-shot) computes the same numbers for every beta and seed of a
(setting, scenario): it runs once, in ``<method>-<setting>-<scenario>`` at the default beta and seed, and every cell
of that pair points at that run (``shared`` in ``matrix.json``). Nothing else is deduplicated: the centralized MTL
trains on the union of the clients' shares in client order, which beta changes.

``--jobs N`` runs independent runs in N spawned processes, each at one torch thread and one client worker so they
do not oversubscribe the cores; the run identity excludes both, so such runs and in-process ones reuse each other.
``--ray ADDRESS`` hands the same runs to a Ray cluster instead (``local``: one started on this machine with
``--jobs`` CPUs), one task per run holding one CPU, and one GPU when the runs use GPUs. Every node writes its run
directory itself, so on a multi-host cluster the matrix folder (and relative data and model paths, which start at the
driver's folder) must be on a filesystem all nodes mount at the same path, with fcit installed on each, as for a
Flower simulation; a run whose directory the driver cannot see is reported as failed.

Output: ``matrix.json`` / ``matrix.csv`` (one record per cell), ``matrix.md`` (per setting x scenario: Last and Avg
per beta, mean +- std over seeds), ``last_vs_beta.png``, ``avg_curves.png``, ``matrices.png``.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from fcit import environment
from fcit.config import Config, ScenarioConfig, one_line
from fcit.errors import FcitError
from fcit.jsonio import write_json
from fcit.launch import run
from fcit.methods.base import Kind
from fcit.results import RunResult
from fcit.rundir import Terminated, finished_result, raise_terminated
from fcit.runtime import Runtime

SETTINGS = ("task", "capability")
SCENARIOS = ("hom", "het")
BETAS = (0.5, 1.0, 5.0)
SETTING_TITLES = {"task": "Task-related", "capability": "Capability-related"}
SCENARIO_TITLES = {"hom": "Hom", "het": "Het"}


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    method: str
    setting: str
    scenario: str
    beta: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.setting}-{self.scenario}-b{self.beta:g}-s{self.seed}"


@dataclass
class PlannedRun:
    """One run directory to have finished, and the cells whose numbers it gives (several for a shared run)."""

    run_dir: Path
    cfg: Config
    cells: list[Cell]


@dataclass
class CellResult:
    """One row of matrix.json / matrix.csv: a cell and the numbers of the run that answers it."""

    method: str
    setting: str
    scenario: str
    beta: float
    seed: int
    last: float
    avg: Optional[float]
    forgetting: Optional[float]
    run_dir: str  # relative to the matrix folder
    shared: bool  # the run answers every beta and seed of its (setting, scenario): a method that never trains
    curve: list[float]  # mean over the datasets seen so far, after each stage (one value for a non-continual method)
    matrix: dict[str, Any]  # the run's accuracy matrix (AccuracyMatrix.to_dict)
    params: dict[str, Any]  # the method's resolved parameters: what tells ablation cells apart
    last_groups: Optional[float] = None
    avg_groups: Optional[float] = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # e.g. DISCO's subspaces_formed, routing_accuracy
    tasks: int = 0  # distinct tasks the run trained (DISCO's one-subspace-per-task check needs it)
    unseen: Optional[dict[str, float]] = None  # eval.unseen: scores on the datasets the setting never trains
    # eval.retention: the general set on the base and the final model (Retention.to_dict: before, after, per_format)
    retention: Optional[dict[str, Any]] = None
    seconds: float = 0.0

    CSV_FIELDS = ("method", "setting", "scenario", "beta", "seed", "last", "avg", "forgetting", "run_dir")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MatrixResult:
    out: Path
    cells: list[CellResult]
    executed: list[str]  # run directories this call trained (or resumed); empty when everything was reused
    markdown: str
    environment_note: list[str]


def _parse_list(text: str, kind: type, what: str) -> list:
    try:
        items = [kind(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise FcitError(f"--{what}: expected comma-separated {kind.__name__}s, got {text!r}") from None
    if not items:
        raise FcitError(f"--{what}: empty list")
    return list(dict.fromkeys(items))  # a repeated value would be the same run twice


def parse_axes(methods: str, settings: str, scenarios: str, betas: str, seeds: str) -> dict[str, list]:
    """The CLI's comma-separated axes, checked: one line naming the bad value, before any work."""
    from fcit.methods import REGISTRY

    axes = {"methods": _parse_list(methods, str, "methods"), "settings": _parse_list(settings, str, "settings"),
            "scenarios": _parse_list(scenarios, str, "scenarios"), "betas": _parse_list(betas, float, "betas"),
            "seeds": _parse_list(seeds, int, "seeds")}
    for what, known in (("methods", list(REGISTRY)), ("settings", SETTINGS), ("scenarios", SCENARIOS)):
        bad = [x for x in axes[what] if x not in known]
        if bad:
            raise FcitError(f"--{what}: unknown {', '.join(bad)}; known: {', '.join(known)}")
    bad_b = [b for b in axes["betas"] if not b > 0 or b != b or b == float("inf")]
    if bad_b:
        raise FcitError(f"--betas: Dirichlet beta must be a finite number > 0, got {bad_b[0]:g}")
    named: dict[str, float] = {}
    for b in axes["betas"]:  # run folders name beta with 6 significant digits: two betas must not share one
        if named.setdefault(f"{b:g}", b) != b:
            raise FcitError(f"--betas: {named[f'{b:g}']!r} and {b!r} would share the run folders '-b{b:g}-'; "
                            f"give betas that differ within 6 significant digits")
    return axes


def _cell_config(base: Config, cell: Cell, one_thread: bool) -> Config:
    d = base.model_dump()
    d["seed"] = cell.seed
    d["scenario"] = {**d["scenario"], "setting": cell.setting, "mode": cell.scenario, "beta": cell.beta}
    d["method"] = {**d["method"], "name": cell.method}
    if one_thread:
        # N runs at once on the cores: one thread each, clients in the run's own process (no nested pools).
        d["threads"] = 1
        d["federation"] = {**d["federation"], "workers": 1}
    try:
        return Config.model_validate(d)
    except ValidationError as err:
        raise FcitError(f"matrix: {cell.name}: {one_line(err)}") from None


def plan(base: Config, methods: list[str], settings: list[str], scenarios: list[str], betas: list[float],
         seeds: list[int], out: Path, one_thread: bool = False) -> list[PlannedRun]:
    """Every run the grid needs, each config validated (method params, the Het table of each setting) now."""
    from fcit.data.scenario import Scenario
    from fcit.methods import REGISTRY

    default_beta = ScenarioConfig.model_fields["beta"].default
    default_seed = Config.model_fields["seed"].default
    runs: dict[str, PlannedRun] = {}
    for m in methods:
        shared = REGISTRY[m].kind == Kind.NONE
        for setting in settings:
            for scenario in scenarios:
                for beta in betas:
                    for seed in seeds:
                        cell = Cell(m, setting, scenario, beta, seed)
                        if shared:
                            name = f"{m}-{setting}-{scenario}"
                            source = Cell(m, setting, scenario, default_beta, default_seed)
                        else:
                            name, source = cell.name, cell
                        if name not in runs:
                            c = _cell_config(base, source, one_thread)
                            try:
                                REGISTRY[m](c)
                                Scenario(c.scenario, c.seed, None)  # the Het table against this setting
                            except FcitError as err:
                                raise FcitError(f"matrix: {cell.name}: {err}") from None
                            runs[name] = PlannedRun(out / name, c, [])
                        runs[name].cells.append(cell)
    return list(runs.values())


def _run_in_child(cfg_json: dict, run_dir: str, resume: bool, cwd: Optional[str] = None) -> float:
    """One run in a spawned worker process; returns its wall time (the parent reads the results from disk).

    ``cwd``: the driver's folder, where the config's relative paths (data root, model path) start; a Ray worker
    starts in the folder its node was started from.
    """
    if cwd is not None:
        os.chdir(cwd)
    t0 = time.perf_counter()
    run(Config.model_validate(cfg_json), Path(run_dir), progress=False, resume=resume)
    return time.perf_counter() - t0


def _run_in_job(cfg_json: dict, run_dir: str, resume: bool) -> float:
    """``_run_in_child`` in a ``--jobs`` process: SIGTERM (which the driver forwards when it is stopped) ends the run
    as it ends ``fcit run``: status.json says ``interrupted (SIGTERM)`` and the finished stages are kept."""
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return _run_in_child(cfg_json, run_dir, resume)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated): the run has recorded how it ended
        # Leave the pool: its worker loop would take the next run already queued for this process and train it to
        # the end while the stopped driver waits for the pool to shut down.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT))


def _resume(run_dir: Path) -> bool:
    # Any trace of an earlier attempt (config.json) means continue it: a fresh run would be refused there.
    return (run_dir / "config.json").exists()


def _prepare_data(base: Config, progress: bool) -> None:
    if base.data.kind == "synth":
        # Generate (or verify) the benchmark cache once here: N children generating it at once would race.
        from fcit.data.loader import open_benchmark

        open_benchmark(base, progress=progress)


def _failed(failures: list[str], total: int) -> FcitError:
    return FcitError(f"matrix: {len(failures)} of {total} runs failed ({'; '.join(failures)}); "
                     f"the finished ones are kept and the same command continues the rest")


def _wants_gpu(base: Config, cluster_gpus: float) -> bool:
    return base.device.startswith("cuda") or (base.device == "auto" and cluster_gpus > 0)


def _appears(path: Path, seconds: float = 10.0) -> bool:
    # A network filesystem may answer from a cached "missing" for a few seconds after another node wrote the file.
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _execute_ray(todo: list[PlannedRun], base: Config, address: str, jobs: int, progress: bool) -> None:
    import ray

    own = not ray.is_initialized()
    if own:
        try:
            if address == "local":  # a new cluster here, even where RAY_ADDRESS or a `ray start` names another
                ray.init(address="local", num_cpus=jobs, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise FcitError(f"--ray {address}: cannot reach a Ray cluster ({str(err).splitlines()[0]})") from None
    failures: list[str] = []
    pending: dict = {}
    try:
        _prepare_data(base, progress)  # the driver's node; other nodes build their own (atomically)
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = 1 if _wants_gpu(base, cluster_gpus) else 0
        if gpus and not cluster_gpus:  # Ray would wait forever for a GPU that no node has
            raise FcitError(f"--ray {address}: device {base.device} asks for a GPU per run, but the cluster has none")
        task = ray.remote(_run_in_child).options(num_cpus=1, num_gpus=gpus, max_retries=0)
        for p in todo:
            pending[task.remote(p.cfg.model_dump(mode="json"), str(p.run_dir.resolve()), _resume(p.run_dir),
                                os.getcwd())] = p
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            p = pending.pop(ready[0])
            done += 1
            try:
                what = f"finished in {ray.get(ready[0]):.0f}s"
                if not _appears(p.run_dir / "metrics.json"):
                    what = "failed"
                    failures.append(f"{p.run_dir.name}: finished on a Ray node, but its run directory is not visible "
                                    f"here (put the matrix folder on a filesystem every node shares)")
            except ray.exceptions.RayError as err:
                what = "failed"
                cause = getattr(err, "cause", None) or err
                failures.append(f"{p.run_dir.name}: {cause}".splitlines()[0])
            if progress:
                print(f"[{done}/{len(todo)}] {p.run_dir.name} {what}", flush=True)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if own:
            ray.shutdown()
    if failures:
        raise _failed(failures, len(todo))


def _execute(todo: list[PlannedRun], base: Config, jobs: int, progress: bool, ray_address: Optional[str] = None
             ) -> None:
    if not todo:
        return
    if ray_address is not None:
        return _execute_ray(todo, base, ray_address, jobs, progress)
    if jobs == 1:
        rt = None  # built on the first run to train, shared by all (as compare does)
        for i, p in enumerate(todo):
            if progress:
                print(f"[{i + 1}/{len(todo)}] {p.run_dir.name}" + (" (resuming)" if _resume(p.run_dir) else ""),
                      flush=True)
            rt = rt or Runtime.build(base, progress=progress)
            run(p.cfg, p.run_dir, runtime=rt, progress=progress, resume=_resume(p.run_dir))
        return
    _prepare_data(base, progress)
    failures: list[str] = []
    done = 0
    # spawn, not fork: a forked child would inherit this process's torch thread pools and any open model.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        pending: dict[Future, PlannedRun] = {}
        try:
            for p in todo:
                fut = pool.submit(_run_in_job, p.cfg.model_dump(mode="json"), str(p.run_dir), _resume(p.run_dir))
                pending[fut] = p
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    p = pending.pop(fut)
                    done += 1
                    err = fut.exception()
                    if err is not None:
                        # The other runs go on: each is independent, and what finished is kept for the next call.
                        failures.append(f"{p.run_dir.name}: {err}".splitlines()[0])
                    if progress:
                        what = "failed" if err is not None else f"finished in {fut.result():.0f}s"
                        print(f"[{done}/{len(todo)}] {p.run_dir.name} {what}", flush=True)
        except KeyboardInterrupt as err:
            for fut in pending:
                fut.cancel()
            if isinstance(err, Terminated):
                # SIGTERM reached this process alone (Ctrl-C reaches the whole process group): without it the
                # children would train to the end of their runs while the executor's shutdown waits for them.
                # The executor keeps its processes in a private dict; there is no public way to signal them.
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.terminate()
            raise
    if failures:
        raise _failed(failures, len(todo))


def _tasks_trained(cfg: Config) -> int:
    from fcit.data.scenario import Scenario

    sc = Scenario(cfg.scenario, cfg.seed, None)
    return len({k for t in range(sc.num_stages) for k in sc.stage_tasks(t)})


def _cell_result(cell: Cell, p: PlannedRun, r: RunResult, out: Path) -> CellResult:
    from fcit.methods import REGISTRY

    params = REGISTRY[cell.method].Params.model_validate(p.cfg.method.params).model_dump(mode="json")
    art = {k: v for k, v in r.method_artifacts.items() if k in ("subspaces_formed", "routing_accuracy")}
    s = r.summary
    return CellResult(method=cell.method, setting=cell.setting, scenario=cell.scenario, beta=cell.beta,
                      seed=cell.seed, last=s.last, avg=s.avg, forgetting=s.forgetting,
                      run_dir=str(p.run_dir.relative_to(out)), shared=p.run_dir.name != cell.name,
                      curve=[sum(row.values()) / len(row) for row in r.matrix.rows], matrix=r.matrix.to_dict(),
                      params=params, last_groups=s.last_groups, avg_groups=s.avg_groups, artifacts=art,
                      tasks=_tasks_trained(p.cfg), unseen=r.unseen,
                      retention=None if r.retention is None else r.retention.to_dict(),
                      seconds=float(r.timing.get("total", 0.0)))


def matrix(base: Config, methods: list[str], settings: list[str], scenarios: list[str], betas: list[float],
           seeds: list[int], out: Path | None = None, jobs: int = 1, progress: bool = True,
           ray_address: Optional[str] = None, report_only: bool = False) -> MatrixResult:
    """Every cell of the grid run (or reused) and reported. ``report_only``: nothing trains; the tables and plots
    cover the cells whose runs have finished, and the others are listed as missing (a long matrix's state so far)."""
    if jobs < 1:
        raise FcitError(f"--jobs: expected a number >= 1, got {jobs}")
    if ray_address is not None and not ray_address.strip():
        raise FcitError("--ray: expected an address (local, auto, ray://host:port), got an empty one")
    if ray_address is not None and base.device.startswith("cuda:") and base.device != "cuda:0":
        # Ray gives each GPU task one device, renumbered cuda:0 inside the task.
        raise FcitError(f"--ray: device {base.device}: Ray assigns each run its GPU; use device=cuda or auto")
    out = Path(out) if out else Path(base.out_dir) / f"matrix-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    # On Ray as with --jobs > 1: one thread and one client worker per run, whatever the cluster's size.
    runs = plan(base, methods, settings, scenarios, betas, seeds, out, one_thread=jobs > 1 or ray_address is not None)
    # Damaged or foreign finished runs are reported now, not after hours of the runs before them.
    finished = {p.run_dir.name: finished_result(p.run_dir, p.cfg) for p in runs}
    todo = [p for p in runs if finished[p.run_dir.name] is None]
    missing = [p.run_dir.name for p in todo] if report_only else []
    if report_only:
        runs, todo = [p for p in runs if finished[p.run_dir.name] is not None], []
    out.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"matrix: {len(runs)} runs for {sum(len(p.cells) for p in runs)} cells, "
              f"{len(runs) - len(todo)} already finished, {len(todo)} to run", flush=True)
    t0 = time.perf_counter()
    _execute(todo, base, min(jobs, max(1, len(todo))), progress, ray_address)
    cells: list[CellResult] = []
    envs: dict[str, dict | None] = {}
    walls: list[tuple[str, float, Optional[dict]]] = []
    for p in runs:
        r = finished[p.run_dir.name] or RunResult.load(p.run_dir)
        envs[p.run_dir.name] = r.environment or environment.of_run_dir(p.run_dir)
        cells += [_cell_result(c, p, r, out) for c in p.cells]
        walls.append((p.cells[0].setting, float(r.timing.get("total", 0.0)), envs[p.run_dir.name]))
    note = environment.combined_note(envs)
    md = markdown(cells)
    times = run_time_note(walls)
    if times:
        md = md.rstrip("\n") + f"\n\n{times}\n"
    if missing:
        names = ", ".join(missing) if len(missing) <= 12 else "listed under \"missing\" in matrix.json"
        md = md.rstrip("\n") + f"\n\nNot run yet ({len(missing)} runs): {names}\n"
    if note:
        print(f"warning: matrix: {note[0]} (see {out / 'matrix.md'})", file=sys.stderr)
        md = md.rstrip("\n") + "\n\n" + "\n".join(f"Note: {ln}" if i == 0 else ln for i, ln in enumerate(note)) + "\n"
    (out / "matrix.md").write_text(md)
    (out / "matrix.csv").write_text(to_csv(cells))
    write_json(out / "matrix.json", {
        "axes": {"methods": methods, "settings": settings, "scenarios": scenarios, "betas": betas, "seeds": seeds},
        "cells": [c.to_dict() for c in cells], "environments": envs, "environment_note": note,
        "executed": [p.run_dir.name for p in todo], "missing": missing, "seconds": time.perf_counter() - t0})
    plots(cells, out)
    return MatrixResult(out, cells, [p.run_dir.name for p in todo], md, note)


# -- tables and figures ------------------------------------------------------------------------------------------------
def run_time_note(runs: list[tuple[str, float, Optional[dict]]]) -> str:
    """One line on what the finished runs cost: per machine, the runs and the sum of their wall times, with each
    setting's range. ``runs``: (setting, wall seconds from metrics.json, its environment summary as
    ``environment.summary`` gives it, ``{"environments": [one per start]}``)."""

    def machine(e: dict) -> str:
        gpu = e.get("gpu")
        cuda = str(e.get("device") or "").startswith("cuda") and gpu not in (None, "none")
        return str((gpu if cuda else e.get("cpu")) or "unrecorded machine")

    by_machine: dict[str, dict[str, list[float]]] = {}
    for setting, secs, summary in runs:
        # A resumed run lists each start's environment; one that moved between machines is labelled with all.
        names = sorted({machine(e) for e in (summary or {}).get("environments") or [{}]})
        by_machine.setdefault(" + ".join(names), {}).setdefault(setting, []).append(float(secs))
    parts = []
    for label, per in sorted(by_machine.items()):
        total = sum(sum(v) for v in per.values())
        n = sum(len(v) for v in per.values())
        ranges = ", ".join(f"{s} {min(v):.0f}-{max(v):.0f} s" for s, v in sorted(per.items()))
        parts.append(f"{label}: {n} runs, {total / 3600:.1f} h ({ranges})")
    if not parts:
        return ""
    return ("Run time, the sum of the runs' own wall times (metrics.json; runs made side by side with --jobs N "
            "overlap, so the wall clock is about this sum over N): " + "; ".join(parts) + ".")


def to_csv(cells: list[CellResult]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CellResult.CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for c in cells:
        row = {k: getattr(c, k) for k in CellResult.CSV_FIELDS}
        w.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _groups(cells: list[CellResult]) -> dict[tuple[str, str], list[CellResult]]:
    out: dict[tuple[str, str], list[CellResult]] = {}
    for c in cells:
        out.setdefault((c.setting, c.scenario), []).append(c)
    return out


def _seeds_title(group: list[CellResult]) -> str:
    """The seeds a table's numbers come from, per beta where the betas differ (a matrix reported before it is whole)."""
    by_beta = {b: sorted({c.seed for c in group if c.beta == b and not c.shared})
               for b in dict.fromkeys(c.beta for c in group)}
    seeds = [s for s in by_beta.values() if s] or [sorted({c.seed for c in group})]  # a shared run has every seed
    if all(s == seeds[0] for s in seeds):
        return f"seeds {','.join(map(str, seeds[0]))}"
    return "seeds " + "; ".join(f"β={b:g}: {','.join(map(str, s))}" for b, s in by_beta.items() if s)


def markdown(cells: list[CellResult]) -> str:
    """One paper-style table per setting x scenario: a row per method, Last and Avg per beta (mean +- std over
    seeds; a run shared by every seed counts once, so it shows no spread it does not have)."""
    from fcit.report.tables import results_markdown, seed_cell

    parts = []
    for (setting, scenario), group in _groups(cells).items():
        betas = list(dict.fromkeys(c.beta for c in group))
        columns = [f"{k} β={b:g}" for b in betas for k in ("Last", "Avg")]
        rows = []
        for m in dict.fromkeys(c.method for c in group):
            row: dict[str, Any] = {"method": m}
            for b in betas:
                mine = [c for c in group if c.method == m and c.beta == b]
                runs = {c.run_dir: c for c in mine}.values()
                for key, col in (("last", f"Last β={b:g}"), ("avg", f"Avg β={b:g}")):
                    vals = [getattr(c, key) for c in runs if getattr(c, key) is not None]
                    row[col] = seed_cell(vals) if vals else None
            rows.append(row)
        title = f"### {SETTING_TITLES[setting]}, {SCENARIO_TITLES[scenario]} ({_seeds_title(group)})\n\n"
        parts.append(title + results_markdown(rows, columns))
    return "\n".join(parts)


def _mean_std(vals: list[float]) -> tuple[float, float]:
    from fcit.eval.metrics import mean_std

    mu, sd = mean_std(vals)
    return mu, (sd or 0.0)


def plots(cells: list[CellResult], out: Path) -> list[Path]:
    """Last vs beta, the seen-so-far curves over stages, and every accuracy matrix (first seed) in one figure."""
    from fcit.eval.metrics import AccuracyMatrix
    from fcit.report.plots import Series, line_panels, matrix_grid

    groups = _groups(cells)
    methods = list(dict.fromkeys(c.method for c in cells))
    betas = sorted(dict.fromkeys(c.beta for c in cells))
    beta_panels, curve_panels = [], []
    for (setting, scenario), group in groups.items():
        title = f"{SETTING_TITLES[setting]}, {SCENARIO_TITLES[scenario]}"
        series = []
        for m in methods:
            pts = []
            for b in betas:
                runs = {c.run_dir: c.last for c in group if c.method == m and c.beta == b}
                if runs:
                    pts.append((b, *_mean_std(list(runs.values()))))
            if pts:
                series.append(Series(m, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]))
        beta_panels.append((title, series))
        for b in betas:
            series = []
            for m in methods:
                runs = {c.run_dir: c.curve for c in group if c.method == m and c.beta == b}
                if not runs:
                    continue
                curves = list(runs.values())
                n = min(len(cv) for cv in curves)
                if n == 1:  # a reference point (zero-shot, MTL): one final model, drawn as a level
                    series.append(Series(m, [], [_mean_std([cv[-1] for cv in curves])[0]], None, level=True))
                else:
                    stats = [_mean_std([cv[t] for cv in curves]) for t in range(n)]
                    series.append(Series(m, list(range(1, n + 1)), [s[0] for s in stats], [s[1] for s in stats]))
            if any(not s.level for s in series):  # reference levels alone (zero-shot at every beta) are no curve
                curve_panels.append((f"{title}, β={b:g}", series))
    paths = [
        line_panels(beta_panels, out / "last_vs_beta.png", "Last vs beta (mean ± std over seeds)", "beta", "Last",
                    log_x=True),
        line_panels(curve_panels, out / "avg_curves.png", "Mean over seen datasets after each stage", "stage",
                    "accuracy"),
    ]
    first_seed: dict[str, CellResult] = {}  # a shared run is drawn once, not once per beta
    for c in cells:
        first_seed.setdefault(c.run_dir if c.shared else f"{c.method} {c.setting} {c.scenario} {c.beta}", c)
    panels = [(f"{c.method} {c.setting}-{c.scenario} " + ("(every β)" if c.shared else f"β={c.beta:g}"),
               AccuracyMatrix.from_dict(c.matrix)) for c in first_seed.values()]
    paths.append(matrix_grid(panels, out / "matrices.png", ncols=4))
    return paths
