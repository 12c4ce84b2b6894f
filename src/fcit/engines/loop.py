"""The one round loop of a stage, written once for every engine.

A round: the scenario names the selected clients and their tasks; clients new to this stage are asked for their
identity (methods that route by it); the method plans the round; the clients train; the method aggregates whatever
came back. After the last round, the last round's clients report on the final global model (EWC's Fisher) and the
method closes the stage. Engines differ only in how those messages travel, which is the ``Transport``:

* ``fcit.engines.inprocess.InProcessTransport``: every client in this process, on one shared model;
* ``fcit.engines.flower.transport.FlowerTransport``: every client a Flower node (simulation or deployment).

A transport may lose clients (a crashed node, a timeout): it leaves them out of its reply and reports why in
``take_failures``; the round goes on while ``min_replies`` clients answered. Training that goes wrong is never a
lost client: a non-finite loss or update, or a stage whose loss never moves, stops the run
(``fcit.training.guard.TrainingDiverged``) naming stage, round and client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fcit.data.scenario import Assignment, Scenario
from fcit.errors import FcitError
from fcit.methods.base import Method, RoundPlan, StageInfo, Upload
from fcit.models.lora import State, set_state, state_bytes
from fcit.results import RoundLog
from fcit.training.guard import check_stage_progress, check_update, in_round
from fcit.training.local import LocalResult


def client_seed(seed: int, stage: int, rnd: int, client: int) -> int:
    """A client's local-training seed: a function of who trains when, never of the engine or the order."""
    return int(np.random.SeedSequence([seed, stage, rnd, client]).generate_state(1)[0])


@dataclass
class Timer:
    """Wall-clock breakdown reported in metrics.json."""

    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "eval": 0.0, "aggregation": 0.0})

    def add(self, key: str, dt: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + dt


@dataclass
class TrainJob:
    client: Assignment
    plan: dict
    seed: int


class RoundFailed(FcitError):
    """Fewer clients than ``federation.min_replies`` answered a round."""


class Transport(Protocol):
    """How a round's messages reach the clients and come back; keyed by client id, missing entries are lost."""

    def identities(self, info: StageInfo, clients: Sequence[Assignment]) -> dict[int, dict]: ...

    def train(self, info: StageInfo, jobs: Sequence[TrainJob], global_state: State,
              shared: dict[str, torch.Tensor]) -> dict[int, LocalResult]: ...

    def stage_end(self, info: StageInfo, clients: Sequence[Assignment], global_state: State,
                  shared: dict[str, torch.Tensor]) -> dict[int, tuple[Optional[State], int]]: ...

    def take_failures(self) -> list[dict]: ...


def implements(method: Method, hook: str) -> bool:
    """Whether the method has its own ``hook`` (the base one does nothing, so its message need not be sent)."""
    return getattr(type(method), hook) is not getattr(Method, hook)


@dataclass
class StageLoop:
    """Runs one stage's rounds for a method over a transport; the server's model is ``model``."""

    method: Method
    model: torch.nn.Module
    scenario: Scenario
    transport: Transport
    rounds: int
    seed: int
    min_replies: int = 1
    timer: Timer = field(default_factory=Timer)

    def run(self, info: StageInfo, global_state: State, bar: bool = True) -> tuple[State, list[RoundLog]]:
        logs: list[RoundLog] = []
        known: dict[tuple[int, int], dict] = {}  # (client, task) -> identity, for this stage
        last: list[Assignment] = []
        rounds = tqdm(range(self.rounds), desc=f"stage {info.stage + 1} rounds", leave=False, disable=not bar)
        for r in rounds:
            global_state, log, last = self.run_round(replace(info, round=r), global_state, known)
            logs.append(log)
            rounds.set_postfix(loss=f"{log.loss:.3f}")
        check_stage_progress([log.loss for log in logs], f"stage {info.stage + 1}")
        return self.finish_stage(info, global_state, last), logs

    def run_round(self, info: StageInfo, global_state: State,
                  known: dict[tuple[int, int], dict]) -> tuple[State, RoundLog, list[Assignment]]:
        t_round = time.perf_counter()
        where = f"stage {info.stage + 1} round {info.round + 1}"
        clients = self.scenario.assignments(info.stage, info.round)
        if self.method.uses_identity:
            ask = [c for c in clients if (c.client_id, c.task) not in known]
            task_of = {c.client_id: c.task for c in ask}  # a client trains one task per round
            for cid, idt in self.transport.identities(info, ask).items():
                known[(cid, task_of[cid])] = idt
            active = [c for c in clients if (c.client_id, c.task) in known]
        else:
            active = list(clients)
        self._check(len(active), len(clients), where)
        assigned = [list(self.scenario.tasks[c.task]) for c in active]
        plan: RoundPlan = self.method.plan_round(
            replace(info, assigned=assigned), [known.get((c.client_id, c.task), {}) for c in active], global_state)
        jobs = [TrainJob(c, p, client_seed(self.seed, info.stage, info.round, c.client_id))
                for c, p in zip(active, plan.clients)]
        t0 = time.perf_counter()
        replies = self.transport.train(info, jobs, global_state, self.method.shared_with_clients())
        self.timer.add("train", time.perf_counter() - t0)
        uploads = [Upload(i, replies[c.client_id]) for i, c in enumerate(active) if c.client_id in replies]
        self._check(len(uploads), len(clients), where)
        done = [active[u.index] for u in uploads]
        results = [u.result for u in uploads]
        for c, res in zip(done, results):
            check_update(res.loss, res.state, f"{where} client {c.client_id}")
        t0 = time.perf_counter()
        down = state_bytes(global_state) * len(jobs)
        with in_round(info.stage, info.round, [(c.client_id, r.num_samples) for c, r in zip(done, results)]):
            global_state = self.method.aggregate(info, plan, uploads, global_state)
        self.timer.add("aggregation", time.perf_counter() - t0)
        samples = [res.num_samples for res in results]
        log = RoundLog(
            stage=info.stage,
            round=info.round,
            clients=[c.client_id for c in done],
            tasks=[c.task for c in done],
            samples=samples,
            loss=float(np.average([res.loss for res in results], weights=samples)),
            bytes_up=int(sum(state_bytes(res.state) for res in results)),
            bytes_down=int(down),
            seconds=time.perf_counter() - t_round,
            dropped=[c.client_id for c in clients if c not in done],
            failures=self.transport.take_failures(),
        )
        check_update(log.loss, global_state, f"{where} (aggregated)")
        return global_state, log, done

    def finish_stage(self, info: StageInfo, global_state: State, last: list[Assignment]) -> State:
        """The stage-end exchange: the last round's clients report on the final global model (e.g. EWC's Fisher),
        then the method closes the stage on the server."""
        set_state(self.model, global_state)
        payloads = []
        if last and implements(self.method, "client_after_stage"):
            replies = self.transport.stage_end(info, last, global_state, self.method.shared_with_clients())
            payloads = [replies[c.client_id] for c in last
                        if c.client_id in replies and replies[c.client_id][0] is not None]
        global_state = self.method.after_stage(self.model, info, global_state, payloads)
        set_state(self.model, global_state)
        return global_state

    def _check(self, n: int, of: int, where: str) -> None:
        if n < self.min_replies:
            raise RoundFailed(f"{where}: {n} of {of} clients replied, fewer than federation.min_replies="
                              f"{self.min_replies}")
