"""The small interface a continual method plugs into, with hook names in the spirit of Avalanche's callbacks.

A method is one file: a subclass of ``Method`` overriding only the hooks it needs, plus a line in
``fcit.methods.REGISTRY``. The one round loop (``fcit.engines.loop``) calls these hooks and nothing else, whichever
engine carries the messages, so a method runs unchanged on every engine. The defaults implement Finetune: one LoRA,
FedAvg of all trainable tensors.

State that passes between hooks travels through their arguments and return values: ``plan_round`` returns a
``RoundPlan`` whose ``server`` part the loop hands back to ``aggregate`` with the uploads, each tagged with the plan
entry it answers. What a method keeps across rounds and stages is its own server state, saved by ``state_dict`` /
``state_json`` for resumed runs.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fcit.config import Config
from fcit.errors import FcitError
from fcit.models.inputs import Batcher
from fcit.models.lora import State, attach_lora, get_state, sub_dict
from fcit.training.local import LocalResult
from fcit.training.losses import LossHook
from fcit.training.server_opt import build_server_optimizer


class Params(BaseModel):
    """A method's own hyper-parameters (``method.params`` in the config); subclass per method."""

    model_config = ConfigDict(extra="forbid")


class Kind(str, enum.Enum):
    """How a method trains: the stage x round loop, one centralized run on the union of all tasks, or not at all."""

    FEDERATED = "federated"
    CENTRALIZED = "centralized"
    NONE = "none"


@dataclass(frozen=True)
class StageInfo:
    """What a hook may know about where the run is."""

    stage: int
    num_stages: int
    tasks: list[int]  # tasks trained in this stage
    round: int = 0
    # Server side, in plan_round: for each client of the plan, the datasets of the task the server assigned it.
    # Diagnostics that need ground truth read it here, so no client has to disclose what its data is.
    assigned: Optional[list[list[str]]] = None


@dataclass
class RoundPlan:
    """The server's plan for one round: one instruction per planned client (sent to it), and what ``aggregate``
    needs besides the uploads (kept on the server, never sent)."""

    clients: list[dict[str, Any]]
    server: dict[str, Any] = field(default_factory=dict)


@dataclass
class Upload:
    """One client's reply: its local result, and the entry of ``RoundPlan.clients`` it trained (clients that never
    reply leave gaps, so the position in the list of uploads is not the plan entry)."""

    index: int
    result: LocalResult


@dataclass
class Heatmap:
    """A figure as data: the report layer draws it (methods never import plotting)."""

    values: list[list[float]]
    rows: list[str]
    cols: list[str]
    title: str
    vmin: Optional[float] = None
    vmax: Optional[float] = None
    xlabel: str = ""
    ylabel: str = ""


@dataclass
class Artifacts:
    """What a method reports about itself after a run: ``summary`` goes into metrics.json, ``files`` (relative path
    -> JSON data) and ``heatmaps`` (relative path of a PNG -> figure) into the run directory."""

    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    heatmaps: dict[str, Heatmap] = field(default_factory=dict)


class Method:
    name: ClassVar[str] = "finetune"
    summary: ClassVar[str] = "One LoRA tuned on each stage in turn, FedAvg on the server (the lower bound)."
    kind: ClassVar[Kind] = Kind.FEDERATED
    Params: ClassVar[type[Params]] = Params
    # False for a reference point that is not a continual learner (zero-shot, the multi-task upper bounds): its one
    # final model is evaluated once, so it reports Last only; Avg and forgetting are not applicable (None).
    continual: ClassVar[bool] = True
    # True: train one stage over the union of all stages' data, one stage's rounds (``Scenario(union=True)``).
    union_stages: ClassVar[bool] = False

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
        self.processor = None
        self.batcher: Optional[Batcher] = None

    # -- model ------------------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """Attach the method's adapters to the frozen backbone and mark what trains."""
        return attach_lora(model, self.cfg.model)

    def bind(self, processor, batcher: Batcher) -> None:
        """Receive the backbone's processor (tokenizer, image processor) and the batcher of the model that was set
        up, before any other hook runs (EWC builds Fisher batches with it, DISCO reads instructions back)."""
        self.processor, self.batcher = processor, batcher

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
    uses_identity: ClassVar[bool] = False  # True: the loop asks clients for ``client_identity`` before planning

    def client_identity(self, model: torch.nn.Module, samples: Sequence, info: StageInfo) -> dict[str, Any]:
        """Client side, before training: what the server needs to plan the round (DISCO: the identity token).

        A client's data of a stage is fixed, so is its identity: the loop asks each client once per stage and task."""
        return {}

    def plan_round(self, info: StageInfo, identities: Sequence[dict], global_state: State) -> RoundPlan:
        """Server side: one instruction per selected client (DISCO: which subspace it trains)."""
        return RoundPlan([{} for _ in identities])

    def before_local(self, model: torch.nn.Module, plan: dict[str, Any]) -> None:
        """Client side: prepare the model for this client's plan (e.g. activate a subspace, set what trains)."""

    def client_loss(self, info: StageInfo, global_state: State) -> Optional[LossHook]:
        """An extra loss term for local training (EWC, LwF, FedProx...); None for plain task loss."""
        return None

    def shared_with_clients(self) -> dict[str, torch.Tensor]:
        """Server side: what a client needs besides the global state to run ``before_local`` and ``client_loss``
        (EWC: Fisher and anchor; LwF: the teacher). Engines whose clients live in other processes (Flower) send it
        with every training message; in-process clients share this object."""
        return {}

    def receive_from_server(self, state: dict[str, torch.Tensor]) -> None:
        """Client side, in another process than the server: ``shared_with_clients()``, before ``before_local``."""

    def aggregate(self, info: StageInfo, plan: RoundPlan, uploads: Sequence[Upload], global_state: State) -> State:
        """Server side: the new global state from the clients' uploads (only their trainable tensors)."""
        results = [u.result for u in uploads]
        new = self.server_opt.step(global_state, [r.state for r in results], [r.num_samples for r in results])
        return {**global_state, **new}

    # -- inference ---------------------------------------------------------------------------------------------
    def inference_gate(self, model: torch.nn.Module, samples, stage: int) -> contextlib.AbstractContextManager:
        """Context in which generation for ``samples`` after ``stage`` runs (e.g. per-sample subspace gates)."""
        return contextlib.nullcontext()

    # -- reporting ----------------------------------------------------------------------------------------------
    def artifacts(self) -> Artifacts:
        """Method-specific logs and figures as data, written and drawn by ``fcit.report``."""
        return Artifacts()

    # -- resumable runs ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a resumed run needs besides the global state; subclasses extend and call super()."""
        return {f"server_opt/{k}": v for k, v in self.server_opt.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.server_opt.load_state_dict(sub_dict(state, "server_opt/"))

    def state_json(self) -> dict[str, Any]:
        """What else a resumed run needs that is not a tensor (logs), as JSON data."""
        return {}

    def load_state_json(self, state: dict[str, Any]) -> None:
        pass
