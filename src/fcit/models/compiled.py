"""Compiled decoder layers for local training (``train.compile``).

On the embedded model a training step is mostly small elementwise passes (norms, rotary embeddings, SiLU, casts to
and from bf16) around matmuls that the CPU's matrix units finish quickly; ``torch.compile`` fuses those passes into
a few vectorised loops per layer. Only the decoder layers are compiled: they hold nearly all of the step's work, have
no data-dependent control flow, and share one compiled graph (every layer runs the same code), while the parts
around them (the vision cache, the image-token scatter, the answer-position gather) would only break the graph.

Compilation is switched on for the duration of a local run and off again (``training_compiled``), so generation,
with its growing KV cache, runs the eager layers, and a model pickled to a worker or a Ray actor never carries a
compiled function. The compiled code is cached by ``torch.compile`` per process and by Inductor on disk, so a
process pays the compile once (20 s cold, 5 s from the disk cache, at one thread on the 2-core machine) and every later
local run reuses it. Shapes vary from batch to batch (batch size, padded length), so the graph is compiled with
dynamic shapes from the start: one compilation per process serves every batch. A one-sample batch would be a
second one (Dynamo specialises sizes of 1), so it runs the eager layer instead: such batches are rare (clients with
a single sample, an epoch's last batch) and cost less than that compilation.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from fcit.models.structure import decoder_layers

# Every local run toggles the layers, and methods differ in what the layers hold (PEFT's fused LoRA, subspace
# layers, no-grad teachers): each combination is a cache entry of the one shared frame.
_RECOMPILE_LIMIT = 64


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """``auto`` compiles on the CPU, where it was measured to pay (README "Speed of the embedded engine"); a GPU
    run's step is dominated by large matmuls and its compile has not been measured, so auto leaves it eager."""
    if setting == "auto":
        return device.type == "cpu"
    return bool(setting)


def compiles(train, device: torch.device) -> bool:
    """Whether local training with ``train`` (a TrainConfig, or any object with its fields) compiles on ``device``:
    only the fast path does; the reference path (``train.fused=false``) stays the eager computation it always was."""
    return getattr(train, "fused", True) and resolve_compile(getattr(train, "compile", False), device)


def _batched(compiled: Callable, eager: Callable) -> Callable:
    def call(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() > 0 and hidden.shape[0] > 1:
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    return call


@contextlib.contextmanager
def training_compiled(model: nn.Module, on: bool) -> Iterator[int]:
    """Run ``model``'s decoder layers compiled inside the block; yields how many layers were switched."""
    if not on:
        yield 0
        return
    import torch._dynamo
    import torch._inductor.config

    # Python floats (LoRA's scaling, the norms' epsilon) are constants of the model: tracing them as dynamic
    # scalars makes Dynamo restart its analysis once, which cost 2 of a compile's 6 s. fallback_random: dropout
    # draws its masks from the global generator as the eager layers do (Inductor's own generator would give other
    # masks), so that compiling changes float rounding only, which is why train.compile is not part of a run's
    # identity.
    dynamo = torch._dynamo.config.patch(specialize_float=True,
                                        recompile_limit=max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT))
    inductor = torch._inductor.config.patch(fallback_random=True)
    _, layers = decoder_layers(model)
    switched = []
    try:
        with dynamo, inductor:
            for layer in layers:
                # nn.Module.compile() stores the same callable here; setting it directly lets the block undo it.
                if layer._compiled_call_impl is None:
                    layer._compiled_call_impl = _batched(torch.compile(layer._call_impl, dynamic=True),
                                                         layer._call_impl)
                    switched.append(layer)
            yield len(switched)
    finally:
        for layer in switched:
            layer._compiled_call_impl = None
