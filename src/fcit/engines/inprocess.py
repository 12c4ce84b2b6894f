"""The in-process transport: every simulated client in this process, on one shared model.

All clients share one frozen backbone; each loads the global trainable state, trains, and hands back a copy of its
trainable tensors, exactly what a real client would upload. Nothing is ever lost, so there are no failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from fcit.config import Config
from fcit.data.scenario import Assignment, Scenario
from fcit.engines.client import client_update
from fcit.engines.loop import TrainJob
from fcit.methods.base import Method, StageInfo
from fcit.models.inputs import Batcher
from fcit.models.lora import State
from fcit.training.guard import located
from fcit.training.local import LocalResult


@dataclass
class InProcessTransport:
    cfg: Config
    model: torch.nn.Module
    batcher: Batcher
    scenario: Scenario
    method: Method
    progress: bool = True

    def identities(self, info: StageInfo, clients: Sequence[Assignment]) -> dict[int, dict]:
        return {c.client_id: self.method.client_identity(self.model, self.scenario.client_data(c.task, c.client_id),
                                                         info) for c in clients}

    def train(self, info: StageInfo, jobs: Sequence[TrainJob], global_state: State,
              shared: dict[str, torch.Tensor]) -> dict[int, LocalResult]:
        # ``shared`` is the method's own state: this process's clients already see it.
        out = {}
        for job in tqdm(jobs, desc="clients", leave=False, disable=not self.progress):
            c = job.client
            with located(f"stage {info.stage + 1} round {info.round + 1} client {c.client_id}"):
                out[c.client_id] = client_update(self.method, self.model, self.batcher, self.cfg, info, global_state,
                                                 job.plan, self.scenario.client_data(c.task, c.client_id), job.seed)
        return out

    def stage_end(self, info: StageInfo, clients: Sequence[Assignment], global_state: State,
                  shared: dict[str, torch.Tensor]) -> dict[int, tuple[Optional[State], int]]:
        # The loop has loaded the final global state into the shared model.
        out = {}
        for c in clients:
            samples = self.scenario.client_data(c.task, c.client_id)
            out[c.client_id] = (self.method.client_after_stage(self.model, samples, info), len(samples))
        return out

    def take_failures(self) -> list[dict]:
        return []
