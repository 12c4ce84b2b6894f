"""What every party builds before it trains: the benchmark, the frozen backbone, and the method's model on it.

The server's ``Experiment`` and every Flower client build their model with ``prepare_model``, so both start from
identical adapters.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from fcit.config import Config
from fcit.methods.base import Method
from fcit.models.device import set_compute_dtype, upcast_trainables
from fcit.models.inputs import Batcher
from fcit.models.structure import projector_param_names
from fcit.models.vision_cache import VisionFeatureCache, supports as vision_cache_supported


def set_threads(cfg: Config) -> None:
    torch.set_num_threads(cfg.threads or max(1, os.cpu_count() or 1))


@dataclass
class Runtime:
    """What is built once per process and shared by every run of a comparison: the benchmark and the base model."""

    bench: Any
    base_model: torch.nn.Module
    processor: Any

    @classmethod
    def build(cls, cfg: Config, progress: bool = True) -> "Runtime":
        from fcit.data.loader import open_benchmark
        from fcit.models.backbone import load_backbone

        if cfg.model.path is None:  # a client host's fcit may ship another embedded base than the server's
            from fcit.embedded import check_embedded_base

            check_embedded_base(cfg.model.embedded_base)
        bench = open_benchmark(cfg, progress=progress)
        model, processor = load_backbone(cfg.model.path, cfg.model.dtype, cfg.device, cfg.model.attn_implementation,
                                         allow_missing=cfg.model.allow_missing)
        return cls(bench, model, processor)

    def fresh_model(self) -> torch.nn.Module:
        # Methods inject adapters in place, so every run gets its own copy of the frozen backbone.
        return copy.deepcopy(self.base_model)


@dataclass
class PreparedModel:
    model: torch.nn.Module
    batcher: Batcher
    vision_cache: Optional[VisionFeatureCache]


def prepare_model(cfg: Config, method: Method, base_model: torch.nn.Module, processor) -> PreparedModel:
    """The method's model on a frozen backbone, its batcher and vision-feature cache; the method is bound to them."""
    # Seeded, so that any adapter tensor the global state does not carry starts identical on every party.
    torch.manual_seed(cfg.seed)
    model = method.setup(base_model)
    if cfg.federation.projector_rate_scale != 1.0:
        method.server_opt.rate_scale = dict.fromkeys(projector_param_names(model), cfg.federation.projector_rate_scale)
    upcast_trainables(model)  # a half-precision base trains fp32 adapters (no-op for float32)
    set_compute_dtype(model, cfg.model.compute_dtype)
    # The vision-feature cache wraps a LLaVA-style vision tower; other families run without it (README).
    use_cache = cfg.model.vision_cache_mb != 0 and vision_cache_supported(model)
    cache = VisionFeatureCache(model, cfg.model.vision_cache_mb) if use_cache else None
    batcher = Batcher(model, processor, system_prompt=cfg.model.system_prompt, max_length=cfg.train.max_length,
                      cache_mb=cfg.model.vision_cache_mb)
    method.bind(processor, batcher)
    return PreparedModel(model, batcher, cache)
