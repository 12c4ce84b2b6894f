"""Cache of the frozen vision tower's features, keyed by image content.

The vision tower never trains (only LoRA and the projector do), so every client revisiting an image in every round
recomputes the same features. Caching them removes the tower from all but the first forward of each image, which on
the embedded model is a third of the training step. The cache is an LRU bounded in MB (one LLaVA-1.5-7B image's
penultimate-layer features are 1.2 MB in bf16) and lives in host memory, so it never competes with the GPU.

The cache is a module swapped in for the backbone's ``vision_tower``: LLaVA calls it as it calls the tower, hooks
registered on it fire as before, and anything that is not a cacheable feature request goes to the real tower.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from fcit.models.cache import TensorLRU
from fcit.models.device import default_cache_mb


def _find_tower(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    for name, module in model.named_modules():
        if name == "vision_tower" or name.endswith(".vision_tower"):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    raise ValueError("no vision_tower module in this model")


def supports(model: nn.Module) -> bool:
    """Whether the model has the LLaVA-style ``vision_tower`` this cache wraps (a frozen tower whose features go to a
    separate projector). Qwen2-VL and Qwen2.5-VL have none: their vision encoder ends in the trained merger, so its
    output cannot be cached, and fcit runs them without this cache (the pixel cache still applies)."""
    try:
        _find_tower(model)
    except ValueError:
        return False
    return True


def _key(px: torch.Tensor) -> bytes:
    # Raw bytes (any dtype, bf16 included, which numpy cannot hold); fp32 pixels hash as they always did.
    return hashlib.blake2b(px.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


class CachedVisionTower(nn.Module):
    """The vision tower behind a feature cache. ``tower`` stays a submodule, so ``.to()``, ``parameters()`` and
    state dicts still see it."""

    def __init__(self, tower: nn.Module, cache: TensorLRU):
        super().__init__()
        self.tower = tower
        self.cache = cache

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # LLaVA reads tower attributes (config, patch_size) through whatever sits at vision_tower.
            return getattr(super().__getattr__("tower"), name)

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any):
        layer = kwargs.get("output_hidden_states")
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.tower.parameters())
        # Only the one-layer feature request LLaVA makes is served; anything else is the real tower's job.
        if not self.cache.enabled or trainable or isinstance(layer, bool) or not isinstance(layer, int) or args:
            return self.tower(pixel_values, *args, **kwargs)
        keys = [_key(px) for px in pixel_values]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        feats: list[Optional[torch.Tensor]] = [None if f is None else f.to(pixel_values.device) for f in found]
        if missing:
            out = self.tower(pixel_values[missing], **kwargs)
            fresh = out.hidden_states[layer].detach()
            for j, i in enumerate(missing):
                feats[i] = fresh[j]
                self.cache.put(keys[i], fresh[j].to("cpu", copy=True))
        n_states = self.tower.config.num_hidden_layers + 1
        hidden: list[Any] = [None] * n_states
        hidden[layer] = torch.stack(feats)
        return BaseModelOutputWithPooling(hidden_states=tuple(hidden))


class VisionFeatureCache:
    """Installs a ``CachedVisionTower`` in ``model`` (``budget_mb`` None = min(2048 MB, 5% of RAM), 0 = no cache)."""

    def __init__(self, model: nn.Module, budget_mb: Optional[float] = None):
        parent, attr, tower = _find_tower(model)
        if isinstance(tower, CachedVisionTower):
            self.module = tower
        else:
            self.module = CachedVisionTower(tower, TensorLRU(default_cache_mb() if budget_mb is None else budget_mb))
            setattr(parent, attr, self.module)
        self.store = self.module.cache

    @property
    def hits(self) -> int:
        return self.store.hits

    @property
    def misses(self) -> int:
        return self.store.misses

    @property
    def used(self) -> int:
        return self.store.used
