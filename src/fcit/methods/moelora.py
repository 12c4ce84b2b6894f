"""MoELoRA: E rank-q LoRA experts per target layer mixed per token by a learned softmax router, trained like one LoRA.

Reference section 10: "E rank-q experts per layer with a learned softmax router per layer, trained and averaged like
any LoRA". Each wrapped ``nn.Linear`` computes, for every token x,

    y = W x + s * sum_e g_e(x) B_e A_e dropout(x),      g(x) = softmax(R x),  R: Linear(d_in, E, bias=False)

* Everything trains in every stage (all experts, all routers, the projector), and the server averages all of it with
  the base ``Method.aggregate`` (FedAvg or the configured server optimizer), exactly like Finetune's single LoRA.
* Defaults: E = 4 experts of rank q = 2, so E*q = 8 is Finetune's rank budget (``model.lora.r``); each expert is
  scaled like a PEFT LoRA, s = alpha / q, and an unset ``alpha`` keeps Finetune's s = model.lora.alpha / model.lora.r.
  Since the gates sum to 1, the adapter is a convex mix of the experts' updates.
* The router is dense (every expert runs for every token: E*q is tiny next to d_in) with no load-balancing loss, as the
  reference's definition has none. Its weights start from ``nn.Linear``'s own init, seeded per layer.

Built on ``fcit.models.subspace_lora``: the experts are its subspaces (same parameter names ``lora_A.<e>``, same
seeded init), and ``MoELoraLinear`` only adds the router and a per-token forward. The subspace layer's gate is one
row per sample (broadcast over the sequence), so a per-token gate cannot go through ``set_gate``; a gate of shape
(batch, seq, E), or a per-layer gate callback, in ``SubspaceLinear.forward`` would make this subclass unnecessary.
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fcit.methods.subspace import SubspaceMethod, SubspaceParams
from fcit.models.subspace_lora import SubspaceLinear, SubspaceLoraConfig, attach_subspace_lora, subspace_layers


class MoELoraLinear(SubspaceLinear):
    """A ``SubspaceLinear`` whose subspaces are experts mixed per token by ``self.router``."""

    router: nn.Linear

    @classmethod
    def promote(cls, layer: SubspaceLinear, name: str, init_seed: int) -> "MoELoraLinear":
        """Turn an attached ``SubspaceLinear`` into an MoE layer in place, adding its router.

        In place (a class swap, as ``torch.nn.utils.parametrize`` does) so the experts keep the subspace layer's
        parameter names and seeded init, and every helper of ``subspace_lora`` that finds layers still finds these.
        """
        layer.__class__ = cls
        a = layer.lora_A[0]
        router = nn.Linear(a.shape[1], layer.num_subspaces, bias=False, device=a.device, dtype=a.dtype)
        seed = int(np.random.SeedSequence([init_seed, zlib.crc32(f"{name}.router".encode())]).generate_state(1)[0])
        with torch.no_grad():
            # nn.Linear's default init, but from a per-layer generator so it does not depend on the global RNG.
            nn.init.kaiming_uniform_(router.weight, a=math.sqrt(5),
                                     generator=torch.Generator(device=a.device).manual_seed(seed))
        layer.router = router
        return layer

    def extra_repr(self) -> str:
        return f"experts={self.num_subspaces}, rank={self.rank}, scaling={self.scaling:g}, router=softmax per token"

    def _experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():
            # Training: the concatenation must be in the graph so that every expert gets its gradient.
            return torch.cat(list(self.lora_A), dim=0), torch.cat(list(self.lora_B), dim=1)
        self.refresh()  # no copy unless an expert changed since the last build
        return self._A_cat, self._B_cat

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights, shape x.shape[:-1] + (E,)."""
        return torch.softmax(self.router(x.to(self.router.weight.dtype)), dim=-1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        A, B = self._experts()
        out_dtype = result.dtype
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        g = torch.repeat_interleave(self.gate(x).to(A.dtype), self.rank, dim=-1)
        h = F.linear(self.lora_dropout(x), A) * g
        result = result + F.linear(h, B) * self.scaling
        return result.to(out_dtype)


def moe_layers(model: nn.Module) -> list[tuple[str, MoELoraLinear]]:
    return [(n, m) for n, m in subspace_layers(model) if isinstance(m, MoELoraLinear)]


def attach_moelora(model: nn.Module, cfg: SubspaceLoraConfig) -> nn.Module:
    """Freeze the backbone, wrap the target Linears with ``cfg.num_subspaces`` experts and a router each; every
    expert and router (and the projector if ``cfg.train_projector``) trains. Returns the same model object."""
    model = attach_subspace_lora(model, cfg)
    for name, layer in subspace_layers(model):
        MoELoraLinear.promote(layer, name, cfg.init_seed)
    # attach_subspace_lora leaves only subspace 0 trainable (its one-slot-at-a-time mode); here all experts train.
    for _, layer in moe_layers(model):
        for p in (*layer.lora_A, *layer.lora_B, *layer.router.parameters()):
            p.requires_grad_(True)
    return model


class MoELoraParams(SubspaceParams):
    num_experts: int = Field(4, ge=1, description="experts per target layer")
    rank: int = Field(2, ge=1, description="rank of each expert (4 x 2 = Finetune's r = 8)")
    alpha: Optional[float] = Field(
        None, gt=0, description="per-expert LoRA alpha, s = alpha / rank; None: Finetune's s = lora.alpha / lora.r"
    )


class MoELora(SubspaceMethod):
    name = "moelora"
    summary = "MoELoRA: E small LoRA experts per layer mixed per token by a learned softmax router, averaged as a LoRA."
    Params = MoELoraParams

    @property
    def lora_config(self) -> SubspaceLoraConfig:
        p, lc = self.params, self.cfg.model.lora
        alpha = p.alpha if p.alpha is not None else lc.alpha / lc.r * p.rank
        return self.subspace_config(p.num_experts, rank=p.rank, alpha=alpha, scale_by="subspace")

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        return attach_moelora(model, self.lora_config)

    # initial_state, aggregate: the base class's (all trainable tensors, FedAvg / server optimizer).
