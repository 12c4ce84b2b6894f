"""The training forward: the language-model head and the loss only at the positions that carry loss.

A training sequence of the embedded model is ~79 tokens of which ~3 are answer tokens, yet the causal-LM forward
projects every position onto the vocabulary and keeps a KV cache nobody reads (issue 13's profile: 7% of a step on
the head alone). ``answer_forward`` runs the backbone to hidden states without a cache, gathers the positions whose
next-token label is an answer token, applies the head there and takes the cross-entropy with the reduction of
transformers' causal-LM loss (mean over answer tokens), so the loss and its gradients equal the full path's up to
float rounding. ``full=True`` is that full path (the model's own forward), kept as the reference.

The last decoder layer feeds only the head, so its output matters only at those positions: ``answer_logits`` runs it
on them alone (``_AnswerRows``): the keys and values still come from every position, but the queries, the attention
rows, the output projection and the feed-forward block (with its LoRA) cover ~3 positions of ~79. On the embedded
4-layer model that is most of a quarter of the step's layer work, with the same loss and gradients up to float
rounding. It applies to Llama-style layers (LLaVA-1.5's Vicuna, the embedded model) under SDPA attention without a
cache or activation checkpointing (whose recomputation would rerun the full layer); anything else runs the layer as
it is, as does training with dropout.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fcit.models.device import FP32_ATTENTION
from fcit.models.inputs import IGNORE
from fcit.models.structure import decoder_layers


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
    layer = _llama_style(model)  # looked up once a step: finding the layers walks the model's modules
    if layer is not None and _right_padded(inputs.get("attention_mask")):
        # A causal model needs no padding mask for a right-padded batch: no real position attends to a later one,
        # so the real positions get the same values, and nothing reads the padded ones. Without a mask SDPA takes
        # its causal kernel, and the compiled layers keep one graph.
        inputs = {**inputs, "attention_mask": None}
    with _answer_rows(_rows_usable(layer), mask):
        hidden = body(**inputs, use_cache=False)[0]
    return head(hidden[mask])


def _right_padded(attention_mask: Optional[torch.Tensor]) -> bool:
    """Whether each row of a (B, L) mask is ones, then zeros."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    m = attention_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all()) and bool(m[:, 0].all())


# Llama-style decoder layers: pre-norm attention with rotary embeddings, then a pre-norm feed-forward block.
_ROW_LAYERS = ("LlamaDecoderLayer",)
_ROW_ATTENTION = ("sdpa", FP32_ATTENTION)


def _llama_style(model: nn.Module) -> Optional[nn.Module]:
    """The last decoder layer of a Llama-style language model under SDPA attention, else None."""
    try:
        _, layers = decoder_layers(model)
    except Exception:  # noqa: BLE001 - no recognisable layer stack: the plain forward
        return None
    layer = layers[-1]
    attn = getattr(layer, "self_attn", None)
    if type(layer).__name__ not in _ROW_LAYERS or attn is None:
        return None
    if getattr(getattr(attn, "config", None), "_attn_implementation", None) not in _ROW_ATTENTION:
        return None
    return layer


def _rows_layer(model: nn.Module) -> Optional[nn.Module]:
    """The last decoder layer when it can run on answer rows alone, else None."""
    return _rows_usable(_llama_style(model))


def _rows_usable(layer: Optional[nn.Module]) -> Optional[nn.Module]:
    """``layer`` (a ``_llama_style`` last layer, or None) when it can run on answer rows alone, else None."""
    if layer is None:
        return None
    attn = layer.self_attn
    # Activation checkpointing would recompute the full layer in the backward; dropout would draw masks for fewer
    # positions than the reference path does, changing more than rounding.
    dropout = getattr(attn, "attention_dropout", 0) or any(isinstance(m, nn.Dropout) and m.p > 0
                                                           for m in layer.modules())
    if layer.training and (getattr(layer, "gradient_checkpointing", False) or dropout):
        return None
    return layer


def _row_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos, valid), both (B, A) with A the most answer positions of a row (at least 2): each row's answer positions
    in order, padded with its first one (a real row, so that the padding computes finite values nobody reads).

    A is never 1 because Dynamo specialises sizes of 1: one-token answers (letters, yes/no) would compile a second
    graph, which costs more than the one padded row saves."""
    counts = mask.sum(1)
    width = max(int(counts.max()), 2)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None] < counts[:, None]
    return torch.where(valid, order, order[:, :1]), valid


def _rows_forward(layer: nn.Module, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The decoder layer's output at ``pos`` (B, A): LlamaDecoderLayer's computation with queries at those rows."""
    attn = layer.self_attn
    rotate_half = sys.modules[type(attn).__module__].rotate_half
    (b, n, h), a, d = hidden.shape, pos.shape[1], attn.head_dim
    x = layer.input_layernorm(hidden)
    k = attn.k_proj(x).view(b, n, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, -1, d).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    k = (k * c) + (rotate_half(k) * s)
    rows = pos.unsqueeze(-1)
    q = attn.q_proj(x.gather(1, rows.expand(b, a, h))).view(b, a, -1, d).transpose(1, 2)
    c = cos.expand(b, -1, -1).gather(1, rows.expand(b, a, cos.shape[-1])).unsqueeze(1)
    s = sin.expand(b, -1, -1).gather(1, rows.expand(b, a, sin.shape[-1])).unsqueeze(1)
    q = (q * c) + (rotate_half(q) * s)
    if attention_mask is None:  # no padding: causal, each row sees the positions up to its own
        m = (torch.arange(n, device=pos.device)[None, None, :] <= pos[:, :, None]).unsqueeze(1)
    else:
        m = attention_mask.expand(b, -1, -1, -1)
        m = m.gather(2, pos[:, None, :, None].expand(b, m.shape[1], a, n))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out, _ = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation](attn, q, k, v, m, dropout=0.0,
                                                                       scaling=attn.scaling)
    h_rows = hidden.gather(1, rows.expand(b, a, h)) + attn.o_proj(out.reshape(b, a, -1))
    return h_rows + layer.mlp(layer.post_attention_layernorm(h_rows))


_COMPILED_ROWS: Optional[Callable] = None


def _compiled_rows() -> Callable:
    global _COMPILED_ROWS
    if _COMPILED_ROWS is None:
        _COMPILED_ROWS = torch.compile(_rows_forward, dynamic=True)
    return _COMPILED_ROWS


class _AnswerRows:
    """The last layer's call while ``answer_logits`` runs: rows at the answer positions, the rest passed through
    (the head never reads them)."""

    def __init__(self, layer: nn.Module, mask: torch.Tensor, inner: Optional[Callable]):
        self.layer, self.mask, self.inner = layer, mask, inner
        self.pos, self.valid = _row_index(mask)

    def __call__(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None, **kwargs) -> torch.Tensor:
        usable = (position_embeddings is not None and kwargs.get("past_key_values") is None
                  and tuple(hidden_states.shape[:2]) == tuple(self.mask.shape)
                  and (attention_mask is None or attention_mask.dim() == 4))
        if not usable:
            call = self.inner or self.layer._call_impl
            return call(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                        **kwargs)
        cos, sin = position_embeddings
        # Compiled while local training compiles the other layers (``training_compiled`` installs ``inner``);
        # Dynamo specialises one-sample batches, which therefore stay eager as there.
        fn = _compiled_rows() if self.inner is not None and hidden_states.shape[0] > 1 else _rows_forward
        rows = fn(self.layer, hidden_states, attention_mask, cos, sin, self.pos)
        b = torch.arange(self.pos.shape[0], device=self.pos.device)[:, None].expand_as(self.pos)
        return hidden_states.index_put((b[self.valid], self.pos[self.valid]), rows[self.valid])


@contextlib.contextmanager
def _answer_rows(layer: Optional[nn.Module], mask: torch.Tensor) -> Iterator[None]:
    if layer is None:
        yield
        return
    inner = layer._compiled_call_impl
    layer._compiled_call_impl = _AnswerRows(layer, mask, inner)
    try:
        yield
    finally:
        layer._compiled_call_impl = inner


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
