"""Where a run's clients run: this process (in-process engine), Flower's simulation (Ray) or a Flower deployment.

The top of the package: the CLI and ``fcit compare`` start runs through ``run``; the Flower ServerApp
(``launch.server_app``) wraps the same ``Experiment`` around a Grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fcit import rundir
from fcit.config import Config, resolve_auto
from fcit.experiment import Experiment, default_run_dir
from fcit.methods import build_method
from fcit.methods.base import Kind
from fcit.results import RunResult
from fcit.runtime import Runtime


def run(cfg: Config, run_dir: Path | None = None, runtime: Optional[Runtime] = None, progress: bool = True,
        resume: bool = False) -> tuple[Path, RunResult]:
    """One run in ``run_dir`` (default: a new folder under ``cfg.out_dir``), held for this process alone (a lock,
    ``status.json``; with ``resume`` the checkpoint is verified against ``cfg`` first)."""
    resolve_auto(cfg)  # before the resume check compares it and an engine sends it to clients
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg, cfg.method.name)
    method = build_method(cfg)  # method params are checked before the run directory is touched
    with rundir.open_run(run_dir, cfg, resume):
        engine = cfg.federation.engine
        # Only the stage x round loop has clients to place; centralized and untrained methods run here.
        if engine != "inprocess" and method.kind == Kind.FEDERATED:
            from fcit.launch.flower import run_deployment, run_simulation

            launch = run_simulation if engine == "flower-sim" else run_deployment
            return run_dir, launch(cfg, run_dir, resume=resume, progress=progress)
        exp = Experiment(cfg, run_dir, runtime=runtime, progress=progress)
        return run_dir, exp.run(resume=resume)
