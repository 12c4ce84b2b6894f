"""Where the parts of a vision-language backbone are, found from its module structure rather than from one family's
module names.

* The **language model** is the module that owns the input embedding (``get_input_embeddings()``); its **decoder
  layers** are its ``nn.ModuleList``.
* A decoder layer's **feed-forward block** is its child that holds ``nn.Linear`` layers and is not the attention
  (a module whose ``forward`` takes an attention mask or position embeddings). The LoRA targets are the linear
  layers of those blocks: ``gate_proj``/``up_proj``/``down_proj`` in Llama and Qwen2, whatever they are called
  elsewhere, and never the vision encoder's MLPs (which Qwen2.5-VL also calls ``gate_proj``/...).
* The **projector** (the trained connector from the vision encoder to the language model) is, in the module that
  holds the language model, each other child without a stack of layers (LLaVA's ``multi_modal_projector``,
  Idefics3's ``connector``); when there is none, it is the part of the vision encoder after its stack of blocks that
  outputs the language model's width (Qwen2-VL's and Qwen2.5-VL's ``visual.merger``).

Names are relative to the module passed in, so the same functions serve a bare Hugging Face model, a PEFT wrapper
(``base_model.model.`` prefix) and fcit's subspace models.
"""

from __future__ import annotations

import inspect
import re
from typing import Optional

from torch import nn

from fcit.errors import FcitError

# model.lora.target's default: the language model's feed-forward linear layers, found by ``ffn_linear_names``.
FFN = "ffn"
_ATTENTION_ARGS = ("attention_mask", "position_embeddings")


def _owner_of(model: nn.Module, child: nn.Module) -> Optional[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if any(c is child for c in module.children()):
            return name, module
    return None


def language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the language model: the module whose child is the input embedding."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    found = _owner_of(model, emb) if isinstance(emb, nn.Module) else None
    if found is None:
        raise FcitError(f"model: cannot find the language model of {type(model).__name__} (no input embedding)")
    return found


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the language model's decoder layers."""
    lm_name, lm = language_model(model)
    stacks = [(n, c) for n, c in lm.named_children() if isinstance(c, nn.ModuleList) and len(c)]
    if len(stacks) != 1:
        raise FcitError(f"model: the language model {type(lm).__name__} has {len(stacks)} layer lists, expected one")
    n, layers = stacks[0]
    return _join(lm_name, n), layers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def _is_attention(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(a in params for a in _ATTENTION_ARGS)


def _ffn_child(layer_name: str, layer: nn.Module) -> tuple[str, nn.Module]:
    cands = [(n, c) for n, c in layer.named_children() if _has_linear(c) and not _is_attention(c)]
    if len(cands) != 1:
        names = ", ".join(n for n, _ in cands) or "none"
        raise FcitError(f"model.lora.target: cannot tell the feed-forward block of decoder layer {layer_name} "
                        f"(candidates: {names}); set model.lora.target to a regex of module names")
    return cands[0]


def ffn_linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in the feed-forward blocks of the language model's decoder layers, in module
    order."""
    stack_name, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        lname = f"{stack_name}.{i}"
        fname, ffn = _ffn_child(lname, layer)
        out += [_join(f"{lname}.{fname}", n) for n, m in ffn.named_modules() if isinstance(m, nn.Linear)]
    return out


def ffn_target(model: nn.Module) -> str:
    """A regex (``re.fullmatch``, as PEFT applies a string) that matches exactly ``ffn_linear_names(model)``.

    When every layer has the same block (the usual case) it reads like a hand-written one, e.g.
    ``model\\.language_model\\.layers\\.\\d+\\.mlp\\.(?:gate_proj|up_proj|down_proj)``; otherwise it lists the names.
    """
    names = ffn_linear_names(model)
    stack_name, layers = decoder_layers(model)
    head = stack_name + "."
    tails = [n[len(head):].split(".", 1)[1] for n in names]  # "mlp.gate_proj", with the layer index cut off
    per_layer = len(tails) // max(1, len(layers))
    first = tails[:per_layer]
    if per_layer and tails == first * len(layers):
        fname = first[0].split(".")[0]
        if all(t.startswith(fname + ".") for t in first):
            rest = "|".join(re.escape(t[len(fname) + 1:]) for t in first)
            regex = rf"{re.escape(stack_name)}\.\d+\.{re.escape(fname)}\.(?:{rest})"
        else:
            regex = rf"{re.escape(stack_name)}\.\d+\.(?:{'|'.join(re.escape(t) for t in first)})"
    else:
        regex = "(?:" + "|".join(re.escape(n) for n in names) + ")"
    pattern = re.compile(regex)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)] == names
    return regex


def resolve_target(model: nn.Module, target: str) -> str:
    """``model.lora.target`` for this model: ``"ffn"`` becomes ``ffn_target(model)``; a regex is kept."""
    return ffn_target(model) if target == FFN else target


def _has_stack(module: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) for m in module.modules())


def projector_modules(model: nn.Module) -> list[str]:
    """Names of the modules that connect the vision encoder to the language model (empty for a text-only model)."""
    lm_name, lm = language_model(model)
    if not lm_name:
        return []
    parent_name = lm_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    others = [(n, c) for n, c in parent.named_children() if c is not lm and any(True for _ in c.parameters())]
    direct = [_join(parent_name, n) for n, c in others if not _has_stack(c)]
    if direct:
        return direct
    width = lm.get_input_embeddings().embedding_dim if hasattr(lm, "get_input_embeddings") else None
    out = []
    for n, enc in others:
        children = list(enc.named_children())
        last_stack = max((i for i, (_, c) in enumerate(children) if isinstance(c, nn.ModuleList)), default=None)
        if last_stack is None:
            continue
        for cn, c in children[last_stack + 1:]:
            if any(isinstance(m, nn.Linear) and m.out_features == width for m in c.modules()):
                out.append(_join(_join(parent_name, n), cn))
    return out


def projector_param_names(model: nn.Module) -> list[str]:
    """Parameter names under ``projector_modules(model)``, in ``named_parameters`` order."""
    heads = tuple(p + "." for p in projector_modules(model))
    return [n for n, _ in model.named_parameters() if n.startswith(heads)] if heads else []
