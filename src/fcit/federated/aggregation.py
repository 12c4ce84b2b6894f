"""Server-side aggregation: plain functions over state dicts, shared by every engine."""

from __future__ import annotations

from typing import Sequence

import torch

from fcit.errors import FcitError
from fcit.models.lora import State


def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
    """Weighted mean of client states; weights are sample counts (FedAvg), normalised here."""
    if not states:
        raise FcitError("aggregation: no client updates to aggregate")
    total = float(sum(weights))
    if total <= 0:
        raise FcitError("aggregation: client weights sum to zero")
    out: State = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float32)
        for s, w in zip(states, weights):
            acc += s[key].float() * (w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out
