"""The in-process engine: one stage's rounds of client updates and server aggregation on one machine.

All simulated clients share one frozen backbone; each loads the global trainable state, trains, and hands back a
copy of its trainable tensors, exactly what a real client would upload.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from fcit.config import Config
from fcit.federated.client import client_update
from fcit.methods.base import Method, StageInfo
from fcit.models.inputs import Batcher
from fcit.models.lora import State, set_state, state_bytes
from fcit.training.guard import check_stage_progress, check_update, in_round, located


def client_seed(seed: int, stage: int, rnd: int, client: int) -> int:
    return int(np.random.SeedSequence([seed, stage, rnd, client]).generate_state(1)[0])


@dataclass
class Timer:
    """Wall-clock breakdown reported in metrics.json."""

    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "eval": 0.0, "aggregation": 0.0})

    def add(self, key: str, dt: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + dt


class InProcessEngine:
    def __init__(self, cfg: Config, model, batcher: Batcher, scenario, method: Method, timer: Timer):
        self.cfg, self.model, self.batcher = cfg, model, batcher
        self.scenario, self.method, self.timer = scenario, method, timer

    def run_stage(self, info: StageInfo, global_state: State, bar: Optional[bool] = True) -> tuple[State, list[dict]]:
        logs = []
        rounds = tqdm(range(self.cfg.scenario.rounds), desc=f"stage {info.stage + 1} rounds", leave=False, disable=not bar)
        for r in rounds:
            t_round = time.perf_counter()
            info.round = r
            shards = self.scenario.round_shards(info.stage, r)
            identities = [self.method.client_identity(self.model, s.samples, info) for s in shards]
            plans = self.method.plan_round(info, identities, global_state)
            down = state_bytes(global_state)
            results = []
            for shard, plan in zip(tqdm(shards, desc="clients", leave=False, disable=not bar), plans):
                t0 = time.perf_counter()
                where = f"stage {info.stage + 1} round {r + 1} client {shard.client_id}"
                with located(where):
                    res = client_update(self.method, self.model, self.batcher, self.cfg, info, global_state, plan,
                                        shard.samples, client_seed(self.cfg.seed, info.stage, r, shard.client_id))
                check_update(res.loss, res.state, where)
                self.timer.add("train", time.perf_counter() - t0)
                results.append(res)
            t0 = time.perf_counter()
            with in_round(info.stage, r, shards):
                global_state = self.method.aggregate(info, results, plans, global_state)
            self.timer.add("aggregation", time.perf_counter() - t0)
            log = {
                "stage": info.stage,
                "round": r,
                "clients": [s.client_id for s in shards],
                "tasks": [s.task for s in shards],
                "samples": [res.num_samples for res in results],
                "loss": float(np.average([res.loss for res in results], weights=[res.num_samples for res in results])),
                "bytes_up": int(sum(state_bytes(res.state) for res in results)),
                "bytes_down": int(down * len(results)),
                "seconds": time.perf_counter() - t_round,
            }
            logs.append(log)
            check_update(log["loss"], global_state, f"stage {info.stage + 1} round {r + 1} (aggregated)")
            rounds.set_postfix(loss=f"{log['loss']:.3f}")
        check_stage_progress([x["loss"] for x in logs], f"stage {info.stage + 1}")
        return self._finish_stage(info, global_state, shards), logs

    def _finish_stage(self, info: StageInfo, global_state: State, shards) -> State:
        """The stage-end exchange: the last round's clients report on the final global model (e.g. EWC's Fisher)."""
        set_state(self.model, global_state)
        payloads = []
        for shard in shards:
            p = self.method.client_after_stage(self.model, shard.samples, info)
            if p is not None:
                payloads.append((p, len(shard.samples)))
        global_state = self.method.after_stage(self.model, info, global_state, payloads)
        set_state(self.model, global_state)
        return global_state
