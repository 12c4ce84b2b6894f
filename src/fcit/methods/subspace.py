"""The base of every method built on the multi-subspace LoRA layer (``fcit.models.subspace_lora``): DISCO, M-LoRA,
O-LoRA and MoELoRA build their layer config, attach it and (the slot methods) aggregate it slot by slot the same way.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from pydantic import Field

from fcit.methods.base import Method, Params, RoundPlan, Upload
from fcit.models.lora import State, get_state
from fcit.models.subspace_lora import SubspaceLoraConfig, attach_subspace_lora, subspace_index, subspace_names
from fcit.training.aggregation import aggregate_per_subspace


class SubspaceParams(Params):
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="None: model.lora.dropout")
    init: Literal["peft", "gaussian"] = "peft"


class SubspaceMethod(Method):
    Params = SubspaceParams

    def subspace_config(self, num_subspaces: int, rank: int, alpha: float,
                        scale_by: Literal["total", "subspace"]) -> SubspaceLoraConfig:
        """The layer config: the method chooses the subspaces' number, rank, alpha and scaling; the rest (dropout,
        targets, init, seed, projector) comes from ``model.lora`` and the method's params alike for all of them."""
        p, lc = self.params, self.cfg.model.lora
        return SubspaceLoraConfig(
            num_subspaces=num_subspaces, rank=rank, alpha=alpha,
            dropout=lc.dropout if p.dropout is None else p.dropout, target=lc.target, scale_by=scale_by,
            init=p.init, init_seed=self.cfg.seed, train_projector=self.cfg.model.train_projector,
        )

    @property
    def lora_config(self) -> SubspaceLoraConfig:
        raise NotImplementedError

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        return attach_subspace_lora(model, self.lora_config)


class SlotMethod(SubspaceMethod):
    """One subspace (a slot) trains at a time: every slot travels in the global state, and each slot is aggregated
    over only the clients that trained it (``slot_key`` in their plan), the shared tensors (the projector) over all."""

    slot_key = "slot"
    shared_group = ""  # the server optimizer's moment group of the shared tensors

    def initial_state(self, model: torch.nn.Module) -> State:
        # Every slot travels (the frozen or idle ones too: a client needs them in its forward), plus the projector.
        names = subspace_names(model) + [
            n for n, p in model.named_parameters() if p.requires_grad and subspace_index(n) is None
        ]
        return get_state(model, names)

    def aggregate_slots(self, plan: RoundPlan, uploads: Sequence[Upload],
                        global_state: State) -> tuple[State, dict[int, list[int]]]:
        """The new values of the slots trained this round and of the shared tensors, and slot -> upload indices."""
        return aggregate_per_subspace(
            [u.result.state for u in uploads],
            [u.result.num_samples for u in uploads],
            [int(plan.clients[u.index][self.slot_key]) for u in uploads],
            lambda slot, states, w: self.server_opt.step(global_state, states, w, group=self.slot_group(slot)),
            lambda states, w: self.server_opt.step(global_state, states, w, group=self.shared_group),
        )

    def slot_group(self, slot: int) -> str:
        return f"slot{slot}"
