"""Zero-shot: the base model evaluated with no adapter."""

import torch

from fcit.methods.base import Kind, Method


class ZeroShot(Method):
    name = "zeroshot"
    summary = "The base model with no adapter and no training (the floor of the benchmark)."
    kind = Kind.NONE
    continual = False

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        return model
