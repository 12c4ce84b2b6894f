"""The ServerApp: the FCIT stage x round loop over a Flower Grid, with the method's own hooks for planning and
aggregation, so a run on Flower computes what the in-process engine computes.

One round (``FlowerEngine.run_round``):
1. the round's clients are drawn exactly as in-process (``Scenario.selected``) and addressed by client id;
2. methods that need it ask those clients for their identity (``query.identity``) and plan the round (DISCO: which
   subspace each client trains);
3. ``train`` messages carry the global state, the method's client state and the plan; replies carry only the
   trainable tensors and the sample count;
4. the method aggregates the replies with the project's aggregation code and server optimizer.
A client that errors or misses ``federation.round_timeout`` is left out of the round with a warning; the round goes on
while at least ``federation.min_replies`` clients replied, else the run stops with an error and the checkpoint of
the last finished stage (``fcit run --resume``). Evaluation runs on the server after every stage, as in-process.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from typing import Any, Optional

import fcit.federated.flower  # noqa: F401  (Flower's environment switches, before flwr loads)
import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fcit.config import Config
from fcit.errors import FcitError
from fcit.federated.engine import client_seed
from fcit.federated.flower.records import decode, encode, payload_bytes
from fcit.methods.base import Method, StageInfo
from fcit.models.lora import State, set_state


def _overrides(method: Method, hook: str) -> bool:
    return getattr(type(method), hook) is not getattr(Method, hook)


class FlowerEngine:
    """``run_stage`` for an ``Experiment`` whose clients are Flower nodes."""

    def __init__(self, grid: Grid, exp, client_threads: Optional[int] = None):
        self.grid, self.exp = grid, exp
        self.cfg: Config = exp.cfg
        self.method: Method = exp.method
        self.scenario = exp.scenario
        self.timer = exp.timer
        self.client_threads = client_threads
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.config_json = self.cfg.model_dump_json()
        self.run_key = hashlib.sha256(self.config_json.encode()).hexdigest()[:16]
        self.failures: list[dict] = []  # every dropped client with the reason; each round log holds its own
        self._no_id: set[int] = set()  # nodes that answered hello with an error (no partition-id): not asked again

    # -- addressing ---------------------------------------------------------------------------------------------
    def _discover(self) -> None:
        """Ask nodes we have not met yet for their client id (a SuperNode may join, or re-join, at any time)."""
        known = set(self.nodes.values()) | self._no_id
        new = [n for n in self.grid.get_node_ids() if n not in known]
        if not new:
            return
        msgs = [Message(encode({}), dst_node_id=n, message_type="query.hello") for n in new]
        for rep in self.grid.send_and_receive(msgs, timeout=min(120.0, self.cfg.federation.round_timeout)):
            if rep.has_error():
                self._no_id.add(rep.metadata.src_node_id)
                warnings.warn(f"Flower: node {rep.metadata.src_node_id} has no client id: {rep.error.reason}",
                              RuntimeWarning, stacklevel=2)
                continue
            meta, _ = decode(rep.content)
            self.nodes[int(meta["client_id"])] = rep.metadata.src_node_id

    def _meta(self, info: StageInfo, **extra) -> dict[str, Any]:
        return {"config": self.config_json, "run_key": self.run_key, "stage": info.stage, "round": info.round,
                "num_stages": info.num_stages, "tasks": list(info.tasks), "client_threads": self.client_threads,
                **extra}

    def _exchange(self, kind: str, requests: dict[int, Any], what: str) -> dict[int, Any]:
        """Send one message per client id, wait for the replies; returns client id -> reply (failures dropped)."""
        msgs, by_node = [], {}
        online = set(self.grid.get_node_ids())
        if any(self.nodes.get(c) not in online for c in requests):
            # A client never seen, or whose node went away: it may have (re)joined under a new node id.
            self._discover()
            online = set(self.grid.get_node_ids())
        for c, content in requests.items():
            node = self.nodes.get(c)
            if node is None or node not in online:
                self._fail(c, what, "no connected node has this client id" if node is None else "its node is offline")
                continue
            by_node[node] = c
            msgs.append(Message(content, dst_node_id=node, message_type=kind))
        replies: dict[int, Any] = {}
        errored: set[int] = set()
        for rep in self.grid.send_and_receive(msgs, timeout=self.cfg.federation.round_timeout) if msgs else []:
            c = by_node.get(rep.metadata.src_node_id)
            if c is None:
                continue
            if rep.has_error():
                errored.add(c)
                self._fail(c, what, f"error {rep.error.code}: {rep.error.reason}")
                continue
            replies[c] = rep
        for c in by_node.values():
            if c not in replies and c not in errored:
                self._fail(c, what, f"no reply within {self.cfg.federation.round_timeout:g} s")
        return replies

    def _fail(self, client: int, what: str, why: str) -> None:
        self.failures.append({"client": client, "what": what, "why": why})
        warnings.warn(f"Flower: client {client} dropped from {what}: {why}", RuntimeWarning, stacklevel=3)

    def _check(self, n: int, of: int, what: str) -> None:
        need = self.cfg.federation.min_replies
        if n < need:
            raise FcitError(
                f"{what}: {n} of {of} clients replied, fewer than federation.min_replies={need}; the run stopped "
                f"and `fcit run --resume {self.exp.run_dir}` continues it from the last finished stage"
            )

    # -- one stage ----------------------------------------------------------------------------------------------
    def run_stage(self, info: StageInfo, global_state: State, bar: Optional[bool] = True) -> tuple[State, list[dict]]:
        logs = []
        rounds = tqdm(range(self.cfg.scenario.rounds), desc=f"stage {info.stage + 1} rounds", leave=False,
                      disable=not bar)
        last: list[tuple[int, int]] = []
        for r in rounds:
            info.round = r
            t0 = time.perf_counter()
            global_state, log, last = self.run_round(info, global_state)
            log["seconds"] = time.perf_counter() - t0
            logs.append(log)
            rounds.set_postfix(loss=f"{log['loss']:.3f}")
        return self._finish_stage(info, global_state, last), logs

    def run_round(self, info: StageInfo, global_state: State) -> tuple[State, dict, list[tuple[int, int]]]:
        t, r = info.stage, info.round
        sc = self.scenario
        clients = sc.selected(t, r)
        tasks = sc.table[t] if sc.table is not None else [t] * len(clients)
        task_of = dict(zip(clients, tasks))
        where = f"stage {t + 1} round {r + 1}"
        n_failures = len(self.failures)

        t0 = time.perf_counter()
        identities: dict[int, dict] = {}
        if _overrides(self.method, "client_identity"):
            reqs = {c: encode(self._meta(info, task=task_of[c])) for c in clients}
            for c, rep in self._exchange("query.identity", reqs, f"{where} (identity)").items():
                meta, tensors = decode(rep.content)
                identities[c] = {**meta["identity"], **tensors["identity"]}
        else:
            identities = {c: {} for c in clients}
        active = [c for c in clients if c in identities]  # in the order of the round's positions
        self._check(len(active), len(clients), where)
        plans = self.method.plan_round(info, [identities[c] for c in active], global_state)
        plan_of = dict(zip(active, plans))

        client_state = self.method.client_state()
        reqs = {}
        for c in active:
            meta = self._meta(info, task=task_of[c], plan=plan_of[c],
                              seed=client_seed(self.cfg.seed, t, r, c))
            reqs[c] = encode(meta, {"global": global_state, "client_state": client_state})
        down = sum(payload_bytes(m) for m in reqs.values())
        replies = self._exchange("train", reqs, f"{where} (train)")
        self.timer.add("train", time.perf_counter() - t0)
        done = [c for c in active if c in replies]
        self._check(len(done), len(clients), where)

        from fcit.federated.client import LocalResult

        results = []
        for c in done:
            meta, tensors = decode(replies[c].content)
            results.append(LocalResult(state=tensors["state"], num_samples=int(meta["num_samples"]),
                                       loss=float(meta["loss"]), steps=int(meta["steps"]),
                                       seconds=float(meta["seconds"])))
        t0 = time.perf_counter()
        global_state = self.method.aggregate(info, results, [plan_of[c] for c in done], global_state)
        self.timer.add("aggregation", time.perf_counter() - t0)
        log = {
            "stage": t,
            "round": r,
            "clients": done,
            "tasks": [task_of[c] for c in done],
            "samples": [res.num_samples for res in results],
            "loss": float(np.average([res.loss for res in results],
                                     weights=[max(1, res.num_samples) for res in results])),
            "bytes_up": int(sum(payload_bytes(replies[c].content) for c in done)),
            "bytes_down": int(down),
            "dropped": [c for c in clients if c not in done],
            "failures": self.failures[n_failures:],
        }
        return global_state, log, [(c, task_of[c]) for c in done]

    def _finish_stage(self, info: StageInfo, global_state: State, last: list[tuple[int, int]]) -> State:
        """As in-process: the last round's clients report on the final global model (EWC's Fisher)."""
        model = self.exp.model
        set_state(model, global_state)
        payloads = []
        if _overrides(self.method, "client_after_stage") and last:
            client_state = self.method.client_state()
            reqs = {c: encode(self._meta(info, task=k), {"global": global_state, "client_state": client_state})
                    for c, k in last}
            replies = self._exchange("query.stage_end", reqs, f"stage {info.stage + 1} (stage end)")
            for c, _ in last:
                if c in replies:
                    meta, tensors = decode(replies[c].content)
                    if meta["has_payload"]:
                        payloads.append((tensors["payload"], int(meta["num_samples"])))
        global_state = self.method.after_stage(model, info, global_state, payloads)
        set_state(model, global_state)
        return global_state


def serve(grid: Grid, cfg: Config, run_dir: str, resume: bool = False, progress: bool = True,
          client_threads: Optional[int] = None) -> dict:
    """The whole run on the server: the same ``Experiment`` as in-process, with the Grid-backed engine."""
    from fcit.experiment import Experiment

    exp = Experiment(cfg, run_dir, progress=progress,
                     engine_factory=lambda e: FlowerEngine(grid, e, client_threads=client_threads))
    metrics = exp.run(resume=resume)
    return metrics


def make_server_app(cfg: Config, run_dir: str, resume: bool, progress: bool, outcome: dict,
                    client_threads: Optional[int] = None) -> ServerApp:
    """A ServerApp bound to a config (the simulation engine runs it in this process); ``outcome`` receives the
    metrics or the exception, which the simulation runtime would otherwise only log."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["metrics"] = serve(grid, cfg, run_dir, resume, progress, client_threads)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, re-raised there
            outcome["error"] = exc

    return server


# The deployment engine loads this object by name (``fcit.federated.flower.server_app:app``); the run's config and
# run directory arrive in the run config written by ``fcit run --engine flower``.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = Config.model_validate(json.loads(str(rc["fcit-config"])))
    serve(grid, cfg, str(rc["fcit-run-dir"]), resume=bool(rc.get("fcit-resume", False)), progress=False)
