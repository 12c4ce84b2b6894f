"""Export of multi-subspace LoRA layers as a plain PEFT LoRA adapter, so users can load a result with PEFT alone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from fcit.errors import FcitError
from fcit.jsonio import write_json
from fcit.models.structure import projector_modules, projector_param_names
from fcit.models.subspace_lora import GateLike, _as_gate, _routing, subspace_layers


@torch.no_grad()
def export_peft(
    model: nn.Module,
    path: Union[str, Path],
    subspaces: Optional[Sequence[int]] = None,
    gate: Optional[GateLike] = None,
    include_projector: Optional[bool] = None,
    base_model_name_or_path: Optional[str] = None,
) -> Path:
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``subspaces``: the listed slots summed with weight 1 (default: all). ``gate``: a length-E weight vector merged
    into B instead (slots with weight 0 are left out). The result is a LoRA of rank len(slots)*q with A = A_cat,
    B = [g_j B_j], and lora_alpha = s * rank so PEFT's scaling alpha/r equals ours. ``include_projector`` (default:
    whenever the projector is trainable) saves the projector through PEFT's ``modules_to_save``.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    rt = _routing(model)
    if gate is not None and subspaces is not None:
        raise FcitError("export_peft: pass subspaces or gate, not both")
    if gate is not None:
        g = _as_gate(gate, rt.E)
        if g.shape[0] != 1:
            raise FcitError("export_peft: a merged gate is one weight per subspace")
        weights = {i: float(g[0, i]) for i in range(rt.E) if float(g[0, i]) != 0.0}
    else:
        weights = {int(i): 1.0 for i in (range(rt.E) if subspaces is None else subspaces)}
    if not weights:
        raise FcitError("export_peft: no subspace selected")
    slots = sorted(weights)
    if any(not 0 <= i < rt.E for i in slots):
        raise FcitError(f"export_peft: subspace out of range (E = {rt.E})")
    r = len(slots) * rt.q
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in subspace_layers(model):
        a = torch.cat([layer.lora_A[i] for i in slots], dim=0)
        b = torch.cat([layer.lora_B[i] * weights[i] for i in slots], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().contiguous().cpu()
    params = dict(model.named_parameters())
    proj = {n: params[n] for n in projector_param_names(model)}
    if include_projector is None:
        include_projector = any(p.requires_grad for p in proj.values())
    if include_projector:
        for n, p in proj.items():
            tensors[f"base_model.model.{n}"] = p.detach().contiguous().cpu()
    layer0 = subspace_layers(model)[0][1]
    dropout = layer0.lora_dropout.p if isinstance(layer0.lora_dropout, nn.Dropout) else 0.0
    cfg = LoraConfig(
        r=r,
        lora_alpha=rt.cfg.scaling * r,
        lora_dropout=dropout,
        target_modules=rt.cfg.target,
        modules_to_save=projector_modules(model) if include_projector else None,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    meta = {"subspaces": slots, "weights": [weights[i] for i in slots], "rank_per_subspace": rt.q,
            "scaling": rt.cfg.scaling}
    write_json(out / "fcit_subspaces.json", meta, sort_keys=False)
    return out
