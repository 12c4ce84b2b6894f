"""The four FCIT settings: {Task-related, Capability-related} x {Hom, Het} (reference sections 1.3, 1.4 and 4).

A *task* is one Hom stage's data: one dataset (Task setting) or a capability group's datasets concatenated and
shuffled (Capability setting). Task k is partitioned once over the K clients (``partition(..., stage=k)``), or read
from the released partition files. Stages and tasks coincide in Hom. In Het, stage s has a row of a position -> task
table: position p of every round of stage s trains task ``table[s][p]`` on the selected client's share of that task.
The clients of a round are m of K drawn without replacement from a generator seeded by (seed, stage, round), sorted,
and paired with the positions in that order (reference 4 [rec]).

``union=True`` turns the scenario into the federated multi-task one (``mtl-fed``): one stage whose one task is the
union of every task the continual run would train, partitioned over the K clients like any task, for one stage's
rounds. A union client holds every task's share, so those rounds see as many samples as the continual run's
stages x rounds do (and as the centralized ``mtl`` sees): the same sample budget, as the reference's one-stage
multi-task run has. Running stages x rounds rounds over the union would train on 8x the samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from fcit.config import ScenarioConfig
from fcit.data import registry
from fcit.data.loader import Benchmark, released_partition
from fcit.data.partition import STREAM_HET_TABLE, STREAM_SELECTION, STREAM_SHUFFLE, partition, seeded_rng
from fcit.data.records import Sample
from fcit.errors import FcitError

# Reference section 4: hand-picked constants of the reference code (indices into the task order).
SEQ_DYN_LIST = [
    [1, 2, 4, 5, 6],
    [3, 4, 5, 7, 7],
    [0, 2, 3, 4, 5],
    [0, 0, 1, 3, 7],
    [1, 2, 4, 4, 5],
    [0, 3, 5, 7, 7],
    [2, 2, 5, 7, 7],
    [5, 5, 5, 6, 6],
]
CAP_DYN_LIST = [
    [0, 1, 1, 3, 3],
    [0, 2, 2, 2, 3],
    [1, 2, 2, 3, 3],
    [0, 0, 0, 1, 1],
]

_MAX_TABLE_DRAWS = 10_000


def het_table(num_tasks: int, num_stages: int, positions: int, seed: int) -> list[list[int]]:
    """A seeded Het table: row s = sorted(choice(num_tasks, positions, replace=True)), drawn by a generator seeded
    by (seed, s).

    Like the reference's tables, every task must have appeared by stage ceil(num_stages / 3), so that most of the
    run is spent on revisiting tasks rather than on tasks arriving late. Draws that miss a task are redrawn from the
    same per-row generators, so the table stays a pure function of its arguments.
    """
    horizon = math.ceil(num_stages / 3)
    if horizon * positions < num_tasks:
        raise FcitError(
            f"scenario: cannot draw a Het table: {num_tasks} tasks cannot all appear in the first {horizon} stages "
            f"with {positions} positions per stage; give scenario.het_table explicitly"
        )
    gens = [seeded_rng(seed, s, STREAM_HET_TABLE) for s in range(num_stages)]
    for _ in range(_MAX_TABLE_DRAWS):
        table = [sorted(int(x) for x in g.choice(num_tasks, positions, replace=True)) for g in gens]
        if {k for row in table[:horizon] for k in row} == set(range(num_tasks)):
            return table
    raise FcitError(
        f"scenario: no Het table with every one of {num_tasks} tasks in the first {horizon} stages after "
        f"{_MAX_TABLE_DRAWS} draws (seed {seed}); give scenario.het_table explicitly"
    )


@dataclass(frozen=True)
class Assignment:
    """Who trains what in a round: the selected client, its position in the round, and the task it trains."""

    client_id: int
    position: int
    task: int


def _group_name(datasets: list[str], k: int) -> str:
    groups = {registry.get(d).group for d in datasets}
    return groups.pop() if len(groups) == 1 else f"Capability{k + 1}"


class Scenario:
    def __init__(self, cfg: ScenarioConfig, seed: int, bench: Benchmark, partitions_root: Optional[str] = None,
                 union: bool = False):
        self.cfg = cfg
        self.seed = seed
        self.bench = bench
        self.partitions_root = partitions_root
        self.het = cfg.mode == "het"
        self.name = f"{'task' if cfg.setting == 'task' else 'cap'}-{cfg.mode}"
        # ScenarioConfig checks this too, but a config built with model_copy(update=...) skips validation.
        if cfg.clients_per_round > cfg.num_clients:
            raise FcitError(
                f"config: scenario.clients_per_round ({cfg.clients_per_round}) must be <= "
                f"num_clients ({cfg.num_clients})"
            )

        if cfg.setting == "task":
            order = cfg.task_order or registry.TASK_ORDER
            self.tasks = [[registry.get(d).name] for d in order]
            self.task_names = [t[0] for t in self.tasks]
        else:
            groups = cfg.capability_order or registry.CAPABILITY_ORDER
            self.tasks = [[registry.get(d).name for d in g] for g in groups]
            self.task_names = [_group_name(g, k) for k, g in enumerate(self.tasks)]
        seen = [d for t in self.tasks for d in t]
        # Before a union rewrites the tasks: what the setting trains, whichever stages this run reaches.
        self.unseen = [d for d in registry.DATASETS if d not in seen]
        if len(set(seen)) != len(seen) or not all(self.tasks):
            key = "task_order" if cfg.setting == "task" else "capability_order"
            raise FcitError(f"config: scenario.{key}: every dataset at most once and no empty group (got {self.tasks})")
        self.num_tasks = len(self.tasks)

        self.table: Optional[list[list[int]]] = self._het_table() if self.het else None
        total = len(self.table) if self.table is not None else self.num_tasks
        self.num_stages = min(total, cfg.stages) if cfg.stages else total
        self.rounds = cfg.rounds  # communication rounds per stage
        self._parts: dict[int, list[list[Sample]]] = {}
        # union: the continual run's tasks (task index -> datasets), all trained in one stage.
        self.union_of: Optional[dict[int, list[str]]] = None
        if union:
            members = sorted({k for t in range(self.num_stages) for k in self.stage_tasks(t)})
            self.union_of = {k: self.tasks[k] for k in members}
            self.tasks = [[d for t in self.union_of.values() for d in t]]
            self.task_names = ["union"]
            self.num_tasks, self.num_stages, self.table = 1, 1, None
            self.name += "-union"

    def _het_table(self) -> list[list[int]]:
        cfg, m = self.cfg, self.cfg.clients_per_round
        if cfg.het_table is not None and cfg.het_table_seed is not None:
            raise FcitError("config: scenario.het_table and scenario.het_table_seed: set at most one")
        if cfg.het_table_seed is not None:
            return het_table(self.num_tasks, self.num_tasks, m, cfg.het_table_seed)
        table = cfg.het_table
        if table is None:
            table = SEQ_DYN_LIST if cfg.setting == "task" else CAP_DYN_LIST
        # One row per stage so that Het runs as many stages as Hom and the two are compared stage for stage.
        if len(table) != self.num_tasks:
            raise FcitError(
                f"config: scenario.het_table: needs one row per stage ({self.num_tasks}), got {len(table)} rows"
            )
        for s, row in enumerate(table):
            if len(row) != m:
                raise FcitError(
                    f"config: scenario.het_table: row {s} has {len(row)} positions but clients_per_round is {m}; "
                    f"give scenario.het_table or scenario.het_table_seed for this round size"
                )
            bad = [k for k in row if not 0 <= k < self.num_tasks]
            if bad:
                raise FcitError(f"config: scenario.het_table: row {s}: task {bad[0]} not in 0..{self.num_tasks - 1}")
        return [list(map(int, row)) for row in table]

    def _check_stage(self, t: int) -> None:
        if not 0 <= t < self.num_stages:
            raise FcitError(f"scenario {self.name}: stage {t} out of range 0..{self.num_stages - 1}")

    def _task_data(self, k: int) -> list[Sample]:
        data = [s for d in self.tasks[k] for s in self.bench.train(d)]
        if len(self.tasks[k]) > 1:
            # The reference shuffles a group's concatenation (unseeded); a seeded shuffle keeps it reproducible.
            order = seeded_rng(self.seed, k, STREAM_SHUFFLE).permutation(len(data))
            data = [data[i] for i in order]
        return data

    def shares(self, k: int) -> list[list[Sample]]:
        """Task k's training data split over the K clients (drawn once, or read from the release)."""
        if not 0 <= k < self.num_tasks:
            raise FcitError(f"scenario {self.name}: task {k} out of range 0..{self.num_tasks - 1}")
        if k not in self._parts:
            cfg = self.cfg
            if self.partitions_root is not None:
                setting, kind = ("Task-related", "seq") if cfg.setting == "task" else ("Capability-related", "cap")
                # A release partitions each stage, not the union: a client's union share is its shares of every task.
                released = [(k, self.tasks[k])] if self.union_of is None else list(self.union_of.items())
                per_task = [released_partition(self.partitions_root, setting, kind, cfg.beta, j + 1, cfg.num_clients,
                                               self.bench, t) for j, t in released]
                self._parts[k] = [[s for shares in per_task for s in shares[c]] for c in range(cfg.num_clients)]
            else:
                data = self._task_data(k)
                try:
                    idx = partition(len(data), cfg.num_clients, cfg.beta, self.seed, k, cfg.min_size)
                except FcitError as e:
                    raise FcitError(f"task {self.task_names[k]}: {e}") from None
                self._parts[k] = [[data[i] for i in ix] for ix in idx]
        return self._parts[k]

    def stage_tasks(self, t: int) -> list[int]:
        self._check_stage(t)
        return sorted(set(self.table[t])) if self.table is not None else [t]

    def seen_datasets(self, t: int) -> list[str]:
        out: list[str] = []
        for s in range(t + 1):
            for k in self.stage_tasks(s):
                out += [d for d in self.tasks[k] if d not in out]
        return out

    def stage_datasets(self, t: int) -> list[str]:
        return [d for k in self.stage_tasks(t) for d in self.tasks[k]]

    def selected(self, t: int, r: int) -> list[int]:
        self._check_stage(t)
        m, K = self.cfg.clients_per_round, self.cfg.num_clients
        rng = seeded_rng(self.seed, t, r, STREAM_SELECTION)
        return sorted(int(c) for c in rng.choice(K, m, replace=False))

    def assignments(self, t: int, r: int) -> list[Assignment]:
        """Round r of stage t: each selected client with the task it trains (Hom: the stage's; Het: its position's
        entry in the table). Needs no training data, so a server that holds none (Flower) asks it too."""
        clients = self.selected(t, r)
        tasks = self.table[t] if self.table is not None else [t] * len(clients)
        return [Assignment(client_id=c, position=p, task=int(k)) for p, (c, k) in enumerate(zip(clients, tasks))]

    def client_data(self, task: int, client_id: int) -> list[Sample]:
        """Client ``client_id``'s training share of ``task``: what it trains on whenever it is asked to train it."""
        return self.shares(task)[client_id]

    def task_train(self, k: int) -> list[Sample]:
        """All training data the federation holds for task k (the union of its client shares)."""
        return [s for share in self.shares(k) for s in share]

    def client_sizes(self, k: int) -> np.ndarray:
        return np.array([len(share) for share in self.shares(k)], dtype=np.int64)
