"""PEFT LoRA on the language model's FFN, plus the trainable projector, and the state that travels between parties."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from fcit.models.fused_lora import set_fused
from fcit.models.structure import projector_param_names, resolve_target

if TYPE_CHECKING:  # the GPU benchmark imports this module where pydantic is not installed
    from fcit.config import ModelConfig

# PEFT 0.21 asks transformers 5 for a renamed attribute on every wrap; the warning says nothing to a user of fcit.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

State = dict[str, torch.Tensor]


def attach_lora(model, cfg: ModelConfig):
    """Wrap the backbone with PEFT LoRA; everything but the adapters (and the projector, if asked) is frozen.

    ``cfg.lora.target`` "ffn" (the default) is the language model's feed-forward linear layers and the projector is
    the vision-to-language connector, both found from the model's structure (``models.structure``)."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    target = resolve_target(model, lc.target)
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=target)
    model = get_peft_model(model, peft_cfg)
    set_fused(model, True)
    if cfg.train_projector:
        # The reference trains LLaVA's mm_projector alongside LoRA (reference section 2).
        params = dict(model.named_parameters())
        for name in projector_param_names(model):
            params[name].requires_grad_(True)
    return model


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_state(model, names: list[str] | None = None) -> State:
    """A detached copy of the named (default: trainable) parameters: what a client uploads."""
    params = dict(model.named_parameters())
    names = trainable_names(model) if names is None else names
    return {n: params[n].detach().clone() for n in names}


@torch.no_grad()
def set_state(model, state: State) -> None:
    params = dict(model.named_parameters())
    for n, v in state.items():
        params[n].copy_(v)


def sub_dict(d: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``d`` under ``prefix``, with the prefix taken off their names."""
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def state_bytes(state: State) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())
