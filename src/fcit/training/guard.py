"""Round-level checks that stop a run whose training has gone wrong, instead of letting it write NaN checkpoints
and an accuracy matrix of empty answers with exit status 0.

Pure functions over what a round produces (a loss and a state dict), so every engine and the round loop call the
same checks; ``where`` is the location the message names ("stage 2 round 3 client 17").
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from fcit.errors import FcitError

# Relative change of the round loss below which a whole stage counts as not having moved. A healthy stage moves its
# loss by percents (different clients, different data); a saturated one (e.g. stage 2 at lr=1000) repeats the same
# value to the fifth digit whatever the data. Relative only, so a converged loss near 0 is never "stuck".
STUCK_RTOL = 1e-4


class TrainingDiverged(FcitError):
    """Training produced non-finite numbers or stopped learning; the last finished stage's checkpoint is kept."""


def check_loss(loss: float, where: str) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"{where}: loss is {loss}; lower train.lr (the last finished stage is checkpointed)")


def check_update(loss: float, state: Mapping[str, torch.Tensor], where: str) -> None:
    """A client's (or the aggregated) result: a finite loss and only finite tensors."""
    check_loss(loss, where)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise TrainingDiverged(f"{where}: non-finite values in {shown}; lower train.lr")


def check_stage_progress(round_losses: Sequence[float], where: str) -> None:
    """The loss of a stage must move at some round: a loss frozen at its first value means the adapters saturated
    (every prediction then comes out empty) and the remaining stages would only repeat it."""
    if len(round_losses) < 2:
        return  # one round has nothing to compare with
    first = round_losses[0]
    if all(abs(x - first) <= STUCK_RTOL * abs(first) for x in round_losses[1:]):
        raise TrainingDiverged(
            f"{where}: the loss stayed at {first:.4f} for all {len(round_losses)} rounds; training is stuck "
            f"(lower train.lr)"
        )


@contextmanager
def located(where: str) -> Iterator[None]:
    """Prefix a TrainingDiverged raised deeper down (e.g. by a local step, which does not know its round) with
    ``where``."""
    try:
        yield
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{where}: {e}") from None


def empty_predictions_warning(dataset: str, preds: Sequence[str], when: str) -> str | None:
    """A dataset on which every prediction is empty: the score is 0 for a reason the matrix does not show."""
    if preds and all(not p.strip() for p in preds):
        return f"{when}: {dataset}: all {len(preds)} predictions are empty"
    return None


@contextmanager
def in_round(stage: int, rnd: int, clients: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Name the round and its clients ((client id, samples) pairs) in a server-side error (e.g. aggregation's
    "client weights sum to zero"), which the aggregation functions, working on bare state lists, cannot know.
    ``stage`` and ``rnd`` are 0-based."""
    try:
        yield
    except FcitError as e:
        named = ", ".join(f"{c} ({n} samples)" for c, n in clients)
        raise type(e)(f"stage {stage + 1} round {rnd + 1}, clients {named}: {e}") from None
