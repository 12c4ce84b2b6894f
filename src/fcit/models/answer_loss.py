"""The training forward: the language-model head and the loss only at the positions that carry loss.

A training sequence of the embedded model is ~79 tokens of which ~3 are answer tokens, yet the causal-LM forward
projects every position onto the vocabulary and keeps a KV cache nobody reads (issue 13's profile: 7% of a step on
the head alone). ``answer_forward`` runs the backbone to hidden states without a cache, gathers the positions whose
next-token label is an answer token, applies the head there and takes the cross-entropy with the reduction of
transformers' causal-LM loss (mean over answer tokens), so the loss and its gradients equal the full path's up to
float rounding. ``full=True`` is that full path (the model's own forward), kept as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fcit.models.inputs import IGNORE


@dataclass
class AnswerOutput:
    """``loss``: mean cross-entropy over answer tokens. ``answer_logits``: (N, V), the logits at ``answer_mask``'s
    positions in row-major order (what distillation compares). ``answer_mask``: (B, L) bool."""

    loss: torch.Tensor
    answer_logits: torch.Tensor
    answer_mask: torch.Tensor


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask over logit positions (B x L) whose prediction target is an answer token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def _body_and_head(model: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's wrapper holds the LM
    body = getattr(lm, "model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module):
        return None
    return body, head


def answer_logits(model: nn.Module, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
    """The logits at ``mask``'s positions, (N, V), computed without the full-sequence head or a KV cache."""
    parts = _body_and_head(model)
    if parts is None:  # an architecture without the body/head split: the full forward, then the gather
        return model(**inputs).logits[mask]
    body, head = parts
    hidden = body(**inputs, use_cache=False)[0]
    return head(hidden[mask])


class _AnswerLogits(nn.Module):
    # functional_call needs a module whose forward is the computation; this one wraps the model as ``m``.
    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
        return answer_logits(self.m, inputs, mask)


def answer_logits_with(model: nn.Module, params: dict[str, torch.Tensor], inputs: dict,
                       mask: torch.Tensor) -> torch.Tensor:
    """``answer_logits`` with ``params`` (model parameter names) standing in for the model's own tensors; nothing is
    written into the live parameters."""
    wrapped = {f"m.{k}": v for k, v in params.items()}
    return torch.func.functional_call(_AnswerLogits(model), wrapped, args=(inputs, mask), strict=False)


def answer_forward(model: nn.Module, batch: dict, full: bool = False) -> AnswerOutput:
    """The task loss of a training batch (with ``labels``) and the logits at its answer positions."""
    labels = batch["labels"]
    mask = answer_positions(labels)
    if full:
        out = model(**batch)
        return AnswerOutput(out.loss, out.logits[mask], mask)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = answer_logits(model, inputs, mask)
    targets = labels[:, 1:][mask[:, :-1]]
    # fp32 as transformers' loss upcasts; a plain mean over the answer tokens is its reduction.
    loss = F.cross_entropy(logits.float(), targets)
    return AnswerOutput(loss, logits, mask)
