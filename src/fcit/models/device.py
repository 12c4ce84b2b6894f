"""Where the model runs and in which precision: device resolution, mixed precision, activation checkpointing.

The float32 default runs exactly the computation it always ran: no autocast, no casts. Half-precision bases keep
their trainable tensors in fp32 (AdamW on bf16 weights loses most small updates) and compute under autocast; an fp32
base can compute in bf16 too (``model.compute_dtype``), its weights staying the fp32 masters.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from fcit.env import DEVICE_PATTERN
from fcit.errors import FcitError
from fcit.hardware import auto_compute_dtype


def resolve_device(spec: str) -> torch.device:
    """``auto`` = the first visible GPU, else the CPU; ``cuda[:N]`` must be visible."""
    if not re.match(DEVICE_PATTERN, spec):
        raise FcitError(f"config: device: expected auto, cpu, cuda or cuda:N (got {spec!r})")
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FcitError(f"config: device: {spec} requested but no CUDA device is visible")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise FcitError(f"config: device: {spec} requested but only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def enable_tf32() -> None:
    # The reference trains with --tf32 True; fp32 matmuls that remain (the fp32 LoRA path) get tensor cores.
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def default_cache_mb() -> float:
    """min(2048 MB, 5% of physical RAM): large enough for every embedded image, small next to a 7B run's host."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2048.0
    return float(min(2048.0, 0.05 * ram / 2**20))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The frozen backbone's dtype (trainable tensors may have been upcast to fp32)."""
    first = None
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        if not p.requires_grad:
            return p.dtype
        first = first or p.dtype
    return first or torch.float32


def autocast_for(model: torch.nn.Module):
    """Autocast to the compute dtype (``set_compute_dtype``), else to the base dtype for a half-precision backbone;
    a no-op context for float32."""
    dt = getattr(model, "_fcit_compute_dtype", None) or base_dtype(model)
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=model_device(model).type, dtype=dt)


FP32_ATTENTION = "fcit_sdpa_fp32"


def _sdpa_fp32(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention with autocast off and fp32 inputs; the output in the caller's dtype."""
    dt = value.dtype
    if torch.compiler.is_compiling() and _flash_cpu_applies(module, query, dropout, kwargs):
        out = _flash_cpu_fp32(module, query, key, value, attention_mask, scaling, is_causal)
        return out.to(dt), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    return out.to(dt), weights


# Arguments of transformers' attention functions that the direct kernel call does not implement.
_SDPA_EXTRAS = ("position_bias", "softcap", "cache", "output_attentions", "s_aux", "sinks")


def _flash_cpu_applies(module, query: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    return (query.device.type == "cpu" and not dropout and getattr(module, "num_key_value_groups", 1) == 1
            and not any(kwargs.get(k) not in (None, False) for k in _SDPA_EXTRAS))


def _flash_cpu_fp32(module, query, key, value, attention_mask, scaling, is_causal) -> torch.Tensor:
    """What SDPA runs for fp32 inputs on the CPU (its flash kernel; a boolean mask becomes the additive one SDPA
    builds), called directly, so that the compiled graph holds no autocast region: AOTAutograd does not cache a
    graph with one, and every process would trace the layer's joint graph again (4 s of a pool worker's 7.6 s
    first step on the 2-core machine). The kernel is not on autocast's list, so its inputs stay fp32 under it."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal  # as transformers' sdpa_attention_forward
    if causal and key.shape[2] > query.shape[2]:
        key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
    mask = attention_mask
    if mask is not None:
        mask = (torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool else mask.float())
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query.float(), key.float(), value.float(),
                                                                      0.0, causal, attn_mask=mask, scale=scaling)[0]
    return out.transpose(1, 2).contiguous()


def set_compute_dtype(model: torch.nn.Module, name: str | None) -> None:
    """Run the matmuls in ``name`` (bfloat16 / float16) under autocast over the model's own weights (fp32 masters
    for an fp32 base); None keeps the base's dtype.

    On the CPU, attention stays fp32: PyTorch's bf16 flash-attention backward there is several times slower than
    its fp32 one (27.6 vs 4.3 ms a step on the embedded model), which would undo the gain of the bf16 matmuls.
    """
    if name == "auto":  # a Config built without load_config, which resolves it
        name = auto_compute_dtype(str(base_dtype(model)).removeprefix("torch."), model_device(model).type)
    if name is None or name == "float32":  # the fp32 base's own dtype: no autocast
        return
    model._fcit_compute_dtype = getattr(torch, name)
    top = model.get_base_model() if hasattr(model, "get_base_model") else model
    if model_device(model).type == "cpu" and getattr(top.config, "_attn_implementation", None) == "sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(FP32_ATTENTION, _sdpa_fp32)
        # transformers builds no mask at all for an attention name it has no mask function for, and left-padded
        # prompts (generation) would then attend to their padding.
        AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)
        top.set_attn_implementation(FP32_ATTENTION)


def upcast_trainables(model: torch.nn.Module) -> int:
    """Cast every trainable tensor (adapters, projector) of a half-precision model to fp32; returns how many."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """HF activation checkpointing (non-reentrant) plus inputs that require grad, as PEFT's own recipe does.

    Idempotent: a model shared by every simulated client is prepared once.
    """
    if getattr(model, "_fcit_checkpointing", False):
        return
    kwargs = {"use_reentrant": False}
    # transformers >= 5.20 renamed the method; older 5.x (the GPU machines' 5.17) only has the first name.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # With a frozen embedding the checkpointed segments' inputs carry no grad; PEFT enables this for the same reason.
    model.enable_input_require_grads()
    model._fcit_checkpointing = True
