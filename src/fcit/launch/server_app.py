"""The Flower ServerApp: the same ``Experiment`` as in-process, its rounds carried by a ``FlowerTransport``.

The simulation engine runs ``make_server_app``'s app in this process; the deployment engine loads ``app`` by name
(``fcit.launch.server_app:app``) next to the SuperLink, with the run's config and directory in the run config
written by ``fcit run --engine flower``.
"""

from __future__ import annotations

import json
from typing import Optional

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fcit.config import Config, resolve_auto
from fcit.engines.flower.transport import FlowerTransport
from fcit.experiment import Experiment
from fcit.results import RunResult


def serve(grid: Grid, cfg: Config, run_dir: str, resume: bool = False, progress: bool = True,
          client_threads: Optional[int] = None) -> RunResult:
    resolve_auto(cfg)  # the clients get the settled config, so every node computes as config.json says
    exp = Experiment(cfg, run_dir, progress=progress,
                     transport=FlowerTransport(grid, cfg, client_threads=client_threads))
    return exp.run(resume=resume)


def make_server_app(cfg: Config, run_dir: str, resume: bool, progress: bool, outcome: dict,
                    client_threads: Optional[int] = None) -> ServerApp:
    """A ServerApp bound to a config; ``outcome`` receives the result or the exception, which the simulation
    runtime would otherwise only log."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["metrics"] = serve(grid, cfg, run_dir, resume, progress, client_threads)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, re-raised there
            outcome["error"] = exc

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = Config.model_validate(json.loads(str(rc["fcit-config"])))
    serve(grid, cfg, str(rc["fcit-run-dir"]), resume=bool(rc.get("fcit-resume", False)), progress=False)
