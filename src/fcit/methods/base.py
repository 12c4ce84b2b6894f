"""The small interface a continual method plugs into, with hook names in the spirit of Avalanche's callbacks.

A method is one file: a subclass of ``Method`` overriding only the hooks it needs, plus a line in
``fcit.methods.REGISTRY``. The engines (in-process, Flower) call these hooks and nothing else, so a method runs
unchanged on every engine. The defaults implement Finetune: one LoRA, FedAvg of all trainable tensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fcit.config import Config
from fcit.errors import FcitError
from fcit.federated.aggregation import fedavg
from fcit.federated.client import LocalResult, LossHook
from fcit.models.lora import State, attach_lora


class Params(BaseModel):
    """A method's own hyper-parameters (``method.params`` in the config); subclass per method."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StageInfo:
    """What a hook may know about where the run is."""

    stage: int
    num_stages: int
    tasks: list[int]  # tasks trained in this stage
    round: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Method:
    name: ClassVar[str] = "finetune"
    summary: ClassVar[str] = "One LoRA tuned on each stage in turn, FedAvg on the server (the lower bound)."
    # "federated": the stage x round loop; "centralized": one run on the union of all tasks; "none": no training
    kind: ClassVar[str] = "federated"
    Params: ClassVar[type[Params]] = Params

    def __init__(self, cfg: Config):
        self.cfg = cfg
        try:
            self.params = self.Params.model_validate(cfg.method.params)
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(p) for p in e["loc"])
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            raise FcitError(f"config: method.params.{loc}: {msg} (method {self.name})") from None

    # -- model ------------------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """Attach the method's adapters to the frozen backbone and mark what trains."""
        return attach_lora(model, self.cfg.model)

    # -- stage hooks (server side) -----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, info: StageInfo, global_state: State) -> State:
        return global_state

    def after_stage(self, model: torch.nn.Module, info: StageInfo, global_state: State) -> State:
        return global_state

    # -- client side -------------------------------------------------------------------------------------------
    def client_loss(self, info: StageInfo, global_state: State) -> Optional[LossHook]:
        """An extra loss term for local training (EWC, LwF, FedProx...); None for plain task loss."""
        return None

    # -- server side -------------------------------------------------------------------------------------------
    def aggregate(self, info: StageInfo, results: Sequence[LocalResult], global_state: State) -> State:
        return fedavg([r.state for r in results], [r.num_samples for r in results])

    # -- inference ---------------------------------------------------------------------------------------------
    def inference_gate(self, model: torch.nn.Module, samples) -> contextlib.AbstractContextManager:
        """Context in which generation for ``samples`` runs (e.g. per-sample subspace gates)."""
        return contextlib.nullcontext()

    # -- resumable runs ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
