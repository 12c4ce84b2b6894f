"""One selected client's round, as every engine's clients run it (in-process, a Ray actor, a Flower SuperNode)."""

from __future__ import annotations

from typing import Sequence

import torch

from fcit.config import Config
from fcit.data.records import Sample
from fcit.methods.base import Method, StageInfo
from fcit.models.inputs import Batcher
from fcit.models.lora import State
from fcit.training.local import LocalResult, local_train
from fcit.training.losses import combine_hooks, fedprox_hook


def client_update(method: Method, model: torch.nn.Module, batcher: Batcher, cfg: Config, info: StageInfo,
                  global_state: State, plan: dict, samples: Sequence[Sample], seed: int) -> LocalResult:
    """The method prepares the model for the server's plan, then the local update runs with the method's loss term
    and FedProx's proximal term."""
    method.before_local(model, plan)
    mu = cfg.federation.prox_mu
    # FedProx lives here, not in a method, so it composes with every method's own loss term.
    hook = combine_hooks(method.client_loss(info, global_state), fedprox_hook(global_state, mu) if mu > 0 else None)
    return local_train(model, batcher, global_state, samples, cfg.train, seed=seed, loss_hook=hook)
