"""The fused LoRA forward: ``y = W x + s * B (A dropout(x))`` as one ``addmm`` onto the base output.

PEFT's forward computes the rank-r product, scales it and adds it in three separate passes over the (tokens x
d_out) output; on the embedded model those elementwise passes cost as much as the LoRA matmuls themselves (issue
13's profile). ``addmm(result, h, B^T, alpha=s)`` folds the scale and the add into the matmul's epilogue.

For PEFT's ``lora.Linear`` the fused forward is a subclass swapped in place (``instance.__class__``): parameter
names, state-dict keys, ``isinstance`` checks, merging and saving stay PEFT's, so global states and checkpoints are
unchanged. Anything the fused path does not cover (several active adapters, DoRA and other variants, a LoRA bias,
merged or disabled adapters, per-sample ``adapter_names``) goes to PEFT's own forward. ``set_fused(model, False)``
restores PEFT's class and the subspace layers' unfused forward: the reference path, kept for comparisons.
"""

from __future__ import annotations

import torch
from torch import nn


def lora_addmm(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + scaling * h @ b.T`` in one addmm over the flattened leading dimensions; result's shape."""
    shape = result.shape
    out = torch.addmm(result.reshape(-1, shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling)
    return out.view(shape)


_CLASSES: dict[str, type] = {}


def _classes() -> tuple[type, type]:
    """(PEFT's lora.Linear, its fused subclass), built on first use: importing peft costs a second, and this module
    is imported by code that never attaches LoRA."""
    if not _CLASSES:
        from peft.tuners.lora.layer import Linear as PeftLinear

        class FusedPeftLinear(PeftLinear):
            """PEFT's ``lora.Linear`` with the single-adapter vanilla-LoRA forward fused; see the module docstring."""

            def _fusable(self, kwargs: dict) -> str | None:
                if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
                    return None
                active = [a for a in self.active_adapters if a in self.lora_A]
                if len(active) != 1:
                    return None
                name = active[0]
                if name in self.lora_variant or self.lora_B[name].bias is not None:
                    return None
                return name

            def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                name = self._fusable(kwargs) if not args else None
                if name is None:
                    return super().forward(x, *args, **kwargs)
                self._check_forward_args(x, *args, **kwargs)
                kwargs.pop("adapter_names", None)
                result = self.base_layer(x, **kwargs)
                out_dtype = result.dtype
                a, b = self.lora_A[name].weight, self.lora_B[name].weight
                if x.dtype != a.dtype:
                    x = x.to(a.dtype)
                h = nn.functional.linear(self.lora_dropout[name](x), a)
                if result.dtype != h.dtype:
                    result = result.to(h.dtype)
                return lora_addmm(result, h, b, self.scaling[name]).to(out_dtype)

        FusedPeftLinear.__module__ = __name__
        FusedPeftLinear.__qualname__ = "FusedPeftLinear"
        _CLASSES.update(peft=PeftLinear, fused=FusedPeftLinear)
    return _CLASSES["peft"], _CLASSES["fused"]


def __getattr__(name: str):
    # Pickle (Ray actors, deep copies across processes) finds the fused class by its module-level name.
    if name == "FusedPeftLinear":
        return _classes()[1]
    raise AttributeError(name)


def set_fused(model: nn.Module, on: bool) -> int:
    """Switch every LoRA layer of ``model`` to the fused (True) or the reference (False) forward; returns how many.

    Idempotent and cheap, so local training can call it with its setting on every run.
    """
    n = 0
    peft_cls = fused_cls = None
    for m in model.modules():
        if peft_cls is None and type(m).__name__ in ("Linear", "FusedPeftLinear") and hasattr(m, "lora_A"):
            peft_cls, fused_cls = _classes()
        # Exact types: a PEFT subclass of lora.Linear (a quantized one) has its own forward and keeps it.
        if peft_cls is not None and type(m) in (peft_cls, fused_cls):
            m.__class__ = fused_cls if on else peft_cls
            n += 1
        elif hasattr(m, "fused_forward"):
            m.fused_forward = bool(on)
            n += 1
    return n
