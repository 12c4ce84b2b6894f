"""The environment record: where and with what a run ran (not to be confused with ``fcit.env``, which sets the
process's environment variables).

``record()`` describes this process: fcit's version and git commit (and whether ``src/fcit`` had uncommitted
changes) when fcit runs from a git checkout, Python, the platform, the CPU model and core count, torch's threads and
the client worker pool, the run's device, the GPUs and CUDA version when torch sees any, the versions of the packages
that compute a run (torch, transformers, peft, numpy) or carry it (safetensors, flwr), and the UTC time. It is cheap
(no package is imported for its version, git is asked twice with a timeout) and never fails: anything it cannot read
is null.

A run directory's ``environment.json`` is a list of records, one per start (a resumed run, perhaps on another
machine, appends one). ``key()`` reduces a record to the fields that make two environments "different" for results
combined in one table (``COMPARED``); ``combined_note()`` words the differences between the runs of a table.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from fcit.errors import FcitError
from fcit.jsonio import read_json, write_json

FILE = "environment.json"

# Versions recorded; the first four can change what a run computes, safetensors and flwr only how it is stored and
# carried (the Flower engines reproduce the in-process results exactly).
PACKAGES = ("torch", "transformers", "peft", "numpy", "safetensors", "flwr")

# The fields that make two environments different, in the order a note names them: what can change a run's numbers
# or its wall time. Not compared: the time, the platform string (kernel), the core count (the threads are compared),
# Python's patch level, safetensors and flwr, and the fcit version when the commit is known (the commit implies it).
COMPARED = ("fcit", "python", "cpu", "gpu", "cuda", "device", "threads", "torch", "transformers", "peft", "numpy")


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a record never fails a run; what cannot be read is null
        return None


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def fcit_source() -> dict[str, Any]:
    """fcit's version, and its git commit and dirtiness when the imported package is a checkout's ``src/fcit``
    (an installed copy inside some other repository is not that repository's commit)."""
    import fcit

    out: dict[str, Any] = {"version": getattr(fcit, "__version__", None), "commit": None, "dirty": None}
    pkg = Path(fcit.__file__).resolve().parent
    root = pkg.parent.parent
    if pkg.parent.name != "src" or not (root / ".git").exists():  # .git is a file in a worktree
        return out
    head = _git(root, "rev-parse", "HEAD")
    if head and head.strip():
        out["commit"] = head.strip()
        status = _git(root, "status", "--porcelain", "--", str(pkg))
        out["dirty"] = None if status is None else bool(status.strip())
    return out


def cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _usable_cores() -> Optional[int]:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _gpu() -> Optional[dict[str, Any]]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return {"cuda": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def _torch_threads() -> Optional[int]:
    torch = sys.modules.get("torch")  # only where a run has imported it: a record never pays for the import
    return torch.get_num_threads() if torch is not None else None


def record(device: Optional[str] = None, workers: Optional[int] = None,
           worker_threads: Optional[int] = None, compiled: Optional[bool] = None) -> dict[str, Any]:
    """This process's environment. ``device`` is the run's (``cpu``, ``cuda:0``); ``workers`` and
    ``worker_threads`` the resolved client worker pool of the in-process engine (``federation.workers``; 1 = the
    clients train in this process, None = not in this process: Flower); ``compiled`` whether local training runs
    compiled decoder layers (``train.compile`` as resolved), which, like the threads, changes float rounding."""
    packages = {}
    for name in PACKAGES:
        packages[name] = _safe(lambda n=name: _version(n))
    return {
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fcit": _safe(fcit_source) or {"version": None, "commit": None, "dirty": None},
        "python": _safe(platform.python_version),
        "platform": _safe(platform.platform),
        "cpu": {"model": _safe(cpu_model), "cores": _safe(os.cpu_count), "usable_cores": _safe(_usable_cores)},
        "threads": {"torch": _safe(_torch_threads), "workers": workers, "worker_threads": worker_threads,
                    "compiled": compiled},
        "device": device,
        "gpu": _safe(_gpu),
        "packages": packages,
    }


# -- the run directory's list -------------------------------------------------------------------------------------
def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir`` (oldest first); none when the file is missing. A damaged file is an error."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return []
    data = read_json(path, "the run's environment records")
    if isinstance(data, dict):  # one bare record
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FcitError(f"{path}: damaged (expected a list of environment records)")
    return data


def append(run_dir: Path, rec: dict[str, Any], fresh: bool = False) -> tuple[list[dict[str, Any]], Optional[str]]:
    """Add ``rec`` to ``run_dir/environment.json`` (a new list when ``fresh``), atomically.

    Returns (every record, a warning or None). Never raises: an unreadable file is moved aside to
    ``environment.json.damaged`` and a new list started; a file that cannot be written is a warning."""
    path = Path(run_dir) / FILE
    warning = None
    records: list[dict[str, Any]] = []
    if not fresh:
        try:
            records = read_records(run_dir)
        except FcitError as err:
            warning = f"{err}; moved to {FILE}.damaged, its earlier records are not in the new list"
            _safe(lambda: os.replace(path, path.with_name(FILE + ".damaged")))
    records.append(rec)
    try:
        write_json(path, records)
    except FcitError as err:
        warning = f"the environment record was not written: {err}"
    return records, warning


# -- comparing environments -----------------------------------------------------------------------------------------
def _short(commit: Optional[str]) -> Optional[str]:
    return commit[:7] if commit else None


def key(rec: Mapping[str, Any]) -> dict[str, Optional[str]]:
    """The ``COMPARED`` fields of a record, each as one short string (None: not known)."""
    g = lambda *path: _get(rec, path)  # noqa: E731
    commit = _short(g("fcit", "commit"))
    if commit:
        fcit = commit + ("+dirty" if g("fcit", "dirty") else "")
    else:
        fcit = f"{g('fcit', 'version')} (not a git checkout)" if g("fcit", "version") else None
    py = g("python")
    gpu = g("gpu")
    threads = g("threads", "torch")
    workers, per = g("threads", "workers"), g("threads", "worker_threads")
    if threads is not None and workers and workers > 1:
        threads = f"{threads} (pool {workers}x{per})"
    if threads is not None and g("threads", "compiled"):
        threads = f"{threads}, compiled"
    return {
        "fcit": fcit,
        "python": ".".join(str(py).split(".")[:2]) if py else None,
        "cpu": g("cpu", "model"),
        "gpu": _gpus(gpu.get("devices") or []) if isinstance(gpu, dict) else "none",
        "cuda": gpu.get("cuda") if isinstance(gpu, dict) else "none",
        "device": g("device"),
        "threads": None if threads is None else str(threads),
        **{p: g("packages", p) for p in ("torch", "transformers", "peft", "numpy")},
    }


def _gpus(names: list[str]) -> str:
    """``2 x NVIDIA H200``, ``A100, V100``; ``none`` without devices."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{c} x {n}" if c > 1 else n for n, c in counts.items()) or "none"


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(p)
    return d


def distinct(keys: list[dict[str, Optional[str]]]) -> list[dict[str, Optional[str]]]:
    out: list[dict[str, Optional[str]]] = []
    for k in keys:
        if k not in out:
            out.append(k)
    return out


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``metrics.json`` carries: the file, how many starts it holds and the distinct compared environments."""
    return {"file": FILE, "starts": len(records), "environments": distinct([key(r) for r in records])}


def differences(keys: list[dict[str, Optional[str]]]) -> list[str]:
    """``torch 2.13.0 vs 2.11.0`` for every compared field on which the environments disagree."""
    out = []
    for f in COMPARED:
        vals = []
        for k in keys:
            v = k.get(f) or "unknown"
            if v not in vals:
                vals.append(v)
        if len(vals) > 1:
            out.append(f"{f} {' vs '.join(vals)}")
    return out


def resume_note(records: list[dict[str, Any]]) -> Optional[str]:
    """A warning when the latest start ran in another environment than the one before it, else None."""
    if len(records) < 2:
        return None
    before, now = key(records[-2]), key(records[-1])
    if before == now:
        return None
    return f"this run was resumed in another environment than its previous start: {'; '.join(differences([before, now]))}"


def combined_note(runs: Mapping[str, Optional[Mapping[str, Any]]]) -> list[str]:
    """Lines for under a table that combines ``runs`` (label -> its metrics' environment summary, None: no
    record); empty when every run ran in one and the same environment."""
    envs: list[dict[str, Optional[str]]] = []
    members: list[list[str]] = []
    missing = []
    for label, summ in runs.items():
        mine = (summ or {}).get("environments") or []
        if not mine:
            missing.append(label)
        for k in mine:
            if k not in envs:
                envs.append(dict(k))
                members.append([])
            if label not in members[envs.index(k)]:
                members[envs.index(k)].append(label)
    lines = []
    if len(envs) > 1:
        lines.append(f"runs come from {len(envs)} environments: {'; '.join(differences(envs))}")
        diff_fields = [f for f in COMPARED if len({k.get(f) for k in envs}) > 1]
        for i, (k, who) in enumerate(zip(envs, members), 1):
            what = ", ".join(f"{f} {k.get(f) or 'unknown'}" for f in diff_fields)
            lines.append(f"- environment {i} ({what}): {', '.join(who)}")
    if missing:
        lines.append(f"{len(missing)} of {len(runs)} runs have no environment record (made before fcit recorded "
                     f"one), so whether they share an environment is unknown: {', '.join(missing)}")
    return lines


def of_run_dir(run_dir: Path) -> Optional[dict]:
    """The environment summary of a run whose metrics.json has none (a run of an older fcit): its
    environment.json if it has one, else None (no record)."""
    try:
        records = read_records(run_dir)
    except FcitError:
        return None
    return summary(records) if records else None
