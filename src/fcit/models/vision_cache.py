"""Cache of the frozen vision tower's features, keyed by image content.

The vision tower never trains (only LoRA and the projector do), so every client revisiting an image in every round
recomputes the same features. Caching them removes the tower from all but the first forward of each image, which on
the embedded model is a third of the training step. The budget bounds memory: with LLaVA-1.5-7B one image's features
are 2.4 MB, so the cache simply stops growing once full.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


def _find_tower(model: torch.nn.Module) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.endswith("vision_tower"):
            return module
    raise ValueError("no vision_tower module in this model")


class VisionFeatureCache:
    def __init__(self, model: torch.nn.Module, budget_mb: float):
        self.tower = _find_tower(model)
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        self._orig = self.tower.forward
        self.tower.forward = self._forward  # instance attribute: module hooks still fire around it

    def _forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any):
        layer = kwargs.get("output_hidden_states")
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.tower.parameters())
        if trainable or isinstance(layer, bool) or not isinstance(layer, int) or args:
            return self._orig(pixel_values, *args, **kwargs)
        keys = [hashlib.blake2b(px.detach().cpu().numpy().tobytes(), digest_size=16).digest() for px in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            self.misses += len(missing)
            out = self._orig(pixel_values[missing], **kwargs)
            feats = out.hidden_states[layer].detach()
            for j, i in enumerate(missing):
                fresh[i] = feats[j]
                size = feats[j].numel() * feats[j].element_size()
                if self.used + size <= self.budget:
                    self.store[keys[i]] = feats[j].clone()
                    self.used += size
        self.hits += len(keys) - len(missing)
        stacked = torch.stack([fresh[i] if i in fresh else self.store[k] for i, k in enumerate(keys)])
        n_states = self.tower.config.num_hidden_layers + 1
        hidden: list[Any] = [None] * n_states
        hidden[layer] = stacked
        return BaseModelOutputWithPooling(hidden_states=tuple(hidden))
