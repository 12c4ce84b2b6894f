"""Extra loss terms of local training: the hook type every method's term has, FedProx's proximal term, chaining."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from fcit.models.lora import State

# A method's extra loss term: (model, batch, task loss, model outputs) -> loss
LossHook = Callable[[torch.nn.Module, dict, torch.Tensor, Any], torch.Tensor]


def fedprox_hook(global_state: State, mu: float) -> LossHook:
    """loss + mu/2 * sum ||theta - theta_global||^2 over the trainable parameters that appear in ``global_state``.

    Tensors not in ``global_state`` (or frozen) carry no term, so a method that trains only a slice of its state gets a
    proximal term on exactly what it trains. The anchor is detached and kept in fp32 on the parameter's device.
    """
    anchor = {k: v.detach() for k, v in global_state.items()}
    cache: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}

    def hook(model, batch, loss, *_):
        if mu == 0:
            return loss
        pairs = cache.get(id(model))
        if pairs is None:
            # One model object serves every simulated client of the round, so names and device copies are resolved
            # once; requires_grad is read per call because before_local may change what trains between clients.
            params = dict(model.named_parameters())
            pairs = [(params[k], a.to(params[k].device, torch.float32)) for k, a in anchor.items() if k in params]
            cache.clear()
            cache[id(model)] = pairs
        terms = [((p.float() - a) ** 2).sum() for p, a in pairs if p.requires_grad]
        if not terms:
            return loss
        return loss + (0.5 * mu * torch.stack(terms).sum()).to(loss.dtype)

    return hook


def combine_hooks(*hooks: Optional[LossHook]) -> Optional[LossHook]:
    """Chain loss hooks left to right; None entries are skipped, and no hooks at all gives None (plain task loss)."""
    hs = [h for h in hooks if h is not None]
    if not hs:
        return None
    if len(hs) == 1:
        return hs[0]

    def hook(model, batch, loss, *extra):
        for h in hs:
            loss = h(model, batch, loss, *extra)
        return loss

    return hook
