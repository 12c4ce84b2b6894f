"""Server-side aggregation: plain functions over state dicts, shared by every engine."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch

from fcit.errors import FcitError
from fcit.models.lora import State
from fcit.models.subspace_lora import split_state


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


def aggregate_per_subspace(
    states: Sequence[State],
    weights: Sequence[float],
    slots: Sequence[int],
    step_subspace: Callable[[int, list[State], list[float]], State],
    step_shared: Callable[[list[State], list[float]], State],
) -> tuple[State, dict[int, list[int]]]:
    """Each subspace from only the clients that trained it (``slots[i]``), the rest (the projector) from all clients.

    Returns the new values and the slot -> client indices grouping. A client that uploads another subspace than the
    one it was planned on is an error: averaging it into its planned slot would silently mix two tasks.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, j in enumerate(slots):
        groups[int(j)].append(i)
    split = [split_state(s) for s in states]
    new: State = {}
    for slot in sorted(groups):
        idx = groups[slot]
        for i in idx:
            extra = set(split[i][0]) - {slot}
            if extra:
                raise FcitError(f"aggregation: client {i} uploaded subspace(s) {sorted(extra)} but trained {slot}")
        sub = [split[i][0].get(slot, {}) for i in idx]
        if sub[0]:
            new.update(step_subspace(slot, sub, [weights[i] for i in idx]))
    shared = [rest for _, rest in split]
    if shared and shared[0]:
        new.update(step_shared(shared, list(weights)))
    return new, dict(groups)
