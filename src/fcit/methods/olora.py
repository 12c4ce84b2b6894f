"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning"), federated.

Everything of M-LoRA (``fcit.methods.mlora``: a LoRA slot per stage, earlier slots frozen but in the forward, all
summed at inference, slot-wise aggregation), plus O-LoRA's orthogonality loss on the clients from stage 2 on:

    L = L_task + lambda * sum_layers sum_{s < t} sum_{i,j} |(A_t A_s^T)_{ij}|

with A the (rank x d_in) ``lora_A`` of each slot, i.e. the q x q products of the new slot's input subspace with every
frozen one (reference section 10). This is the L1 form the O-LoRA code uses
(``torch.abs(torch.mm(A_new, A_old.T)).sum()``), and ``lambda = 0.5`` is its default (``lamda_1``). O-LoRA's
optional L2 term on the new slot (``lamda_2``, 0 there) is left out. Only A_t receives the penalty's gradient: the old
slots are frozen and enter detached.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import ConfigDict, Field

from fcit.methods.base import StageInfo
from fcit.methods.mlora import MLora, MLoraParams
from fcit.models.lora import State
from fcit.models.subspace_lora import subspace_layers
from fcit.training.losses import LossHook


class OLoraParams(MLoraParams):
    # `lambda` is a Python keyword, hence the alias; both spellings are accepted in configs.
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    lambda_: float = Field(0.5, ge=0, alias="lambda", description="orthogonality weight (O-LoRA's lamda_1 = 0.5)")


def _pairs(model: torch.nn.Module, slot: int) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Per layer: (A of ``slot``, the detached A of every earlier slot stacked along the rank axis)."""
    out = []
    for _, layer in subspace_layers(model):
        # Stacking the old slots' rows makes one (q x s*q) product hold every |A_t A_s^T| block at once.
        old = torch.cat([layer.lora_A[s].detach() for s in range(slot)], dim=0)
        out.append((layer.lora_A[slot], old))
    return out


def _penalty(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> torch.Tensor:
    terms = [(a.float() @ old.float().T).abs().sum() for a, old in pairs]
    return torch.stack(terms).sum()


def orthogonality_penalty(model: torch.nn.Module, slot: int) -> torch.Tensor:
    """sum over layers and slots s < ``slot`` of sum |A_slot A_s^T| (unweighted, fp32; 0 for slot 0)."""
    if slot <= 0:
        return torch.zeros(())
    return _penalty(_pairs(model, slot))


class OLora(MLora):
    name = "olora"
    summary = "O-LoRA: M-LoRA plus lambda * sum |A_new A_old^T| keeping each new LoRA orthogonal to the frozen ones."
    Params = OLoraParams

    def client_loss(self, info: StageInfo, global_state: State) -> Optional[LossHook]:
        t, lam = int(info.stage), self.params.lambda_
        if t == 0 or lam == 0:
            return None
        cache: dict[int, list] = {}

        def hook(model, batch, loss, *_):
            pairs = cache.get(id(model))
            if pairs is None:
                # Resolved once per round: every simulated client shares the model object, and the old slots are
                # frozen for the whole stage, so the first call's snapshot of them holds for every client.
                pairs = _pairs(model, t)
                cache.clear()
                cache[id(model)] = pairs
            return loss + (lam * _penalty(pairs)).to(loss.dtype)

        return hook
