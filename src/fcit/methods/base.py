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
from fcit.federated.server_opt import build_server_optimizer
from fcit.federated.client import LocalResult, LossHook
from fcit.models.lora import State, attach_lora, get_state


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
        self.server_opt = build_server_optimizer(cfg.federation)
        # Set by the engine that owns the Batcher before any client hook runs (EWC builds Fisher batches with it).
        self.batcher = None

    # -- model ------------------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """Attach the method's adapters to the frozen backbone and mark what trains."""
        return attach_lora(model, self.cfg.model)

    def bind(self, processor) -> None:
        """Receive the backbone's processor (tokenizer, image processor) once the model is set up."""

    def initial_state(self, model: torch.nn.Module) -> State:
        """The global state the server starts from: every tensor the method will ever aggregate."""
        return get_state(model)

    # -- stage hooks (server side) -----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, info: StageInfo, global_state: State) -> State:
        return global_state

    def client_after_stage(self, model: torch.nn.Module, samples: Sequence, info: StageInfo) -> Optional[State]:
        """Client side, at the end of a stage, with the final global model loaded: e.g. EWC's Fisher estimate.

        Run by the clients of the stage's last round; None means nothing to send."""
        return None

    def after_stage(
        self, model: torch.nn.Module, info: StageInfo, global_state: State, payloads: Sequence[tuple[State, int]]
    ) -> State:
        """Server side, after the stage's last round; ``payloads`` are (client_after_stage result, samples)."""
        return global_state

    # -- one round: client identity -> server plan -> local training -> aggregation -------------------------------
    def client_identity(self, model: torch.nn.Module, samples: Sequence, info: StageInfo) -> dict[str, Any]:
        """Client side, before training: what the server needs to plan the round (DISCO: the identity token)."""
        return {}

    def plan_round(self, info: StageInfo, identities: Sequence[dict], global_state: State) -> list[dict[str, Any]]:
        """Server side: one instruction per selected client (DISCO: which subspace it trains)."""
        return [{} for _ in identities]

    def before_local(self, model: torch.nn.Module, plan: dict[str, Any]) -> None:
        """Client side: prepare the model for this client's plan (e.g. activate a subspace, set what trains)."""

    def client_loss(self, info: StageInfo, global_state: State) -> Optional[LossHook]:
        """An extra loss term for local training (EWC, LwF, FedProx...); None for plain task loss."""
        return None

    def client_state(self) -> dict[str, torch.Tensor]:
        """Server side: what a remote client needs besides the global state to run ``before_local`` and
        ``client_loss`` (EWC: Fisher and anchor; LwF: the teacher). Engines whose clients live in other processes
        (Flower) send it with every training message; the in-process engine's clients share this object."""
        return {}

    def load_client_state(self, state: dict[str, torch.Tensor]) -> None:
        """Client side: receive ``client_state()`` from the server before ``before_local``."""

    def aggregate(
        self, info: StageInfo, results: Sequence[LocalResult], plans: Sequence[dict], global_state: State
    ) -> State:
        """Server side: the new global state from the clients' uploads (only their trainable tensors)."""
        new = self.server_opt.step(global_state, [r.state for r in results], [r.num_samples for r in results])
        return {**global_state, **new}

    # -- inference ---------------------------------------------------------------------------------------------
    def inference_gate(self, model: torch.nn.Module, samples) -> contextlib.AbstractContextManager:
        """Context in which generation for ``samples`` runs (e.g. per-sample subspace gates)."""
        return contextlib.nullcontext()

    # -- reporting ----------------------------------------------------------------------------------------------
    def write_artifacts(self, run_dir) -> dict[str, Any]:
        """Write method-specific pictures/logs into the run directory; returns a summary merged into metrics.json."""
        return {}

    # -- resumable runs ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs besides the global state; subclasses extend and call super()."""
        return {f"server_opt/{k}": v for k, v in self.server_opt.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.server_opt.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("server_opt/")})
