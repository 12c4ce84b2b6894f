"""Multi-subspace LoRA: E rank-q LoRA subspaces per target Linear, one trained at a time, mixed per sample at inference.

This is the adapter DISCO (reference section 5.1) and the subspace baselines (M-LoRA, O-LoRA) are built on. Each
wrapped ``nn.Linear`` computes

    y = W x + s * sum_j g_j B_j A_j dropout(x)        with s = alpha / (E*q)  (``scale_by="total"``, the reference)
                                                        or s = alpha / q      (``scale_by="subspace"``)

Every subspace owns its own ``nn.Parameter`` pair (``lora_A.<j>``, ``lora_B.<j>`` in a ``ParameterList``), so
``requires_grad`` is per subspace: an optimizer built over the trainable parameters never sees the others, whatever
its weight decay, and they stay bit-identical.

The forward has three modes, all driven by one routing context shared by every layer of a model:

* ``set_active(model, j)``: training mode. Only subspace j is in the forward and only it is trainable. With E = 1
  this is PEFT's LoRA forward: the reference forward (``models.fused_lora.set_fused(model, False)``) runs the same
  ops in the same order, hence bit-identical outputs; the default fused one (one addmm) agrees to float rounding.
* ``set_active(model, j, frozen_on=[...])``: subspaces ``frozen_on`` are in the forward with weight 1 but frozen,
  j trains (M-LoRA / O-LoRA: earlier slots stay switched on). ``set_active(model, None, frozen_on=[...])`` is the
  frozen sum with nothing trainable.
* ``set_gate(model, g)`` / ``with gated(model, g)``: a gate of shape (batch, E) (or (E,), shared by the batch); the
  layer runs ``((dropout(x) @ A_cat^T) * repeat_interleave(g, q)) @ B_cat^T * s`` in one fused pass over every
  subspace. A_cat / B_cat are cached per layer and rebuilt only when a parameter's version or storage changed,
  checked when a gate is set. So weights must not change while a gate is set; set it again after an update.
  Each gate row is broadcast over the sequence, so it holds for the prompt and for every cached decoding step of
  ``generate`` (the batch size stays fixed there). ``set_active(model, j)`` followed by ``set_gate(model, g)``
  trains slot j under the gate g (the concatenation is then built live so that j gets its gradient).

``models.peft_export.export_peft`` writes the selected subspaces (or a gate-weighted merge) as a plain PEFT LoRA
adapter that ``PeftModel.from_pretrained(base, path)`` loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fcit.errors import FcitError
from fcit.models.fused_lora import lora_addmm
from fcit.models.lora import State
from fcit.models.structure import FFN, projector_param_names, resolve_target

DEFAULT_TARGET = FFN
_SUBSPACE_KEY = re.compile(r"\.lora_[AB]\.(\d+)$")

GateLike = Union[torch.Tensor, Sequence[float], np.ndarray]


@dataclass(frozen=True)
class SubspaceLoraConfig:
    """What ``attach_subspace_lora`` builds.

    ``init="peft"`` is PEFT's default (A ~ kaiming_uniform(a=sqrt(5)), B = 0) so that E = 1 is plain LoRA;
    ``"gaussian"`` is the reference's A ~ N(0, 0.01^2), B = 0. Each subspace of each layer draws from its own
    generator seeded by (init_seed, layer name, subspace), so slot j's initial A does not depend on E or on the
    order of injection.
    """

    num_subspaces: int = 8
    rank: int = 8
    alpha: float = 128.0  # the reference's task setting: total r 64 (8 x 8), alpha 128, so s = 2
    dropout: float = 0.0
    # "ffn": the language model's feed-forward linear layers, found from the model's structure; or a regex of names.
    target: str = DEFAULT_TARGET
    scale_by: Literal["total", "subspace"] = "total"
    init: Literal["peft", "gaussian"] = "peft"
    init_seed: int = 0
    train_projector: bool = True

    def __post_init__(self):
        if self.num_subspaces < 1 or self.rank < 1:
            raise FcitError(
                f"subspace LoRA: num_subspaces and rank must be >= 1 (got {self.num_subspaces}, {self.rank})"
            )
        if self.scale_by not in ("total", "subspace"):
            raise FcitError(f"subspace LoRA: scale_by must be 'total' or 'subspace' (got {self.scale_by!r})")
        if self.init not in ("peft", "gaussian"):
            raise FcitError(f"subspace LoRA: init must be 'peft' or 'gaussian' (got {self.init!r})")

    @property
    def scaling(self) -> float:
        # The reference divides by the total rank r = E*q (section 5.1), so adding subspaces shrinks each one's step.
        denom = self.num_subspaces * self.rank if self.scale_by == "total" else self.rank
        return self.alpha / denom


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class _Routing:
    """Routing state shared by every layer of one model, so one call switches all of them."""

    def __init__(self, num_subspaces: int, rank: int, cfg: SubspaceLoraConfig):
        self.E, self.q, self.cfg = num_subspaces, rank, cfg
        self.active: tuple[int, ...] = (0,)
        self.trainable: Optional[int] = 0
        self.gate: Optional[torch.Tensor] = None  # (rows, E), fp32
        self.gate_q: Optional[torch.Tensor] = None  # (rows, E*q): the gate expanded to rank columns
        self.active_q: Optional[torch.Tensor] = None  # (1, E*q) 0/1 mask for the multi-slot sum
        self._mix_cast: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(g, self.q, dim=-1)

    def cast(self, mix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``mix`` (the gate or the active mask) in ``dtype``, cast once for all layers and decoding steps."""
        held = self._mix_cast
        if held is None or held[0] is not mix or held[1].dtype != dtype:
            held = self._mix_cast = (mix, mix.to(dtype))
        return held[1]


class SubspaceLinear(nn.Module):
    """A frozen ``nn.Linear`` plus E LoRA subspaces; see the module docstring for the forward modes."""

    def __init__(self, base_layer: nn.Linear, routing: _Routing, name: str, cfg: SubspaceLoraConfig):
        super().__init__()
        self.base_layer = base_layer
        self._routing = routing
        E, q = cfg.num_subspaces, cfg.rank
        self.num_subspaces, self.rank, self.scaling = E, q, cfg.scaling
        w = base_layer.weight
        # Like PEFT's autocast_adapter_dtype: half-precision bases keep fp32 adapters.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        d_out, d_in = w.shape
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(q, d_in, device=w.device, dtype=dtype)) for _ in range(E)]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_out, q, device=w.device, dtype=dtype)) for _ in range(E)]
        )
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        with torch.no_grad():
            for j, a in enumerate(self.lora_A):
                seed = int(np.random.SeedSequence([cfg.init_seed, zlib.crc32(name.encode()), j]).generate_state(1)[0])
                gen = torch.Generator(device=w.device).manual_seed(seed)
                if cfg.init == "peft":
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                else:
                    nn.init.normal_(a, mean=0.0, std=0.01, generator=gen)
        self._A_cat: Optional[torch.Tensor] = None
        self._B_cat: Optional[torch.Tensor] = None
        self._cache_key: Optional[tuple] = None
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # the concatenations under autocast
        # models.fused_lora.set_fused switches this; False is the reference forward (PEFT's op order).
        self.fused_forward = True

    def extra_repr(self) -> str:
        return f"subspaces={self.num_subspaces}, rank={self.rank}, scaling={self.scaling:g}"

    # -- fused weights ------------------------------------------------------------------------------------------
    def _key(self) -> tuple:
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in (*self.lora_A, *self.lora_B))

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the cached A_cat / B_cat if any subspace changed since the last build."""
        key = self._key()
        if key != self._cache_key:
            self._A_cat = torch.cat([p.detach() for p in self.lora_A], dim=0)
            self._B_cat = torch.cat([p.detach() for p in self.lora_B], dim=1)
            self._cache_key = key
            self._cast = {}

    def _fused(self, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and self._routing.trainable is not None:
            # A slot is training: the concatenation has to be part of the autograd graph.
            return torch.cat(list(self.lora_A), dim=0), torch.cat(list(self.lora_B), dim=1)
        if not gated or self._A_cat is None:
            # Under a gate, set_gate already refreshed the cache; the frozen-sum mode has no such moment, so it
            # checks the parameter versions here (no copy unless something changed).
            self.refresh()
        dt = _autocast_dtype(self._A_cat.device)
        if dt is None or dt == self._A_cat.dtype:
            return self._A_cat, self._B_cat
        # Under autocast the concatenations (not parameters, so outside autocast's weight cache) would be cast
        # again at every call, and generation calls each layer once per token.
        if dt not in self._cast:
            self._cast[dt] = (self._A_cat.to(dt), self._B_cat.to(dt))
        return self._cast[dt]

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        rt = self._routing
        if rt.gate_q is not None:
            mix = rt.gate_q
        elif len(rt.active) == 1:
            j = rt.active[0]
            a, b = self.lora_A[j], self.lora_B[j]
            out_dtype = result.dtype
            if x.dtype != a.dtype:
                x = x.to(a.dtype)
            h = F.linear(self.lora_dropout(x), a)
            if self.fused_forward:
                return lora_addmm(result.to(h.dtype), h, b, self.scaling).to(out_dtype)
            # Same ops in the same order as PEFT's lora.Linear.forward: E = 1 is bit-identical to PEFT.
            result = result + F.linear(h, b) * self.scaling
            return result.to(out_dtype)
        elif not rt.active:
            return result
        else:
            mix = rt.active_q
        A, B = self._fused(gated=rt.gate_q is not None)
        out_dtype = result.dtype
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        rows = mix.shape[0]
        if rows != 1 and rows != x.shape[0]:
            raise FcitError(
                f"subspace LoRA: the gate has {rows} rows but the batch has {x.shape[0]}; set one gate row per sample"
            )
        if mix.dtype != A.dtype:
            mix = self._routing.cast(mix, A.dtype)
        mix = mix.view(rows, *([1] * (x.dim() - 2)), mix.shape[-1]) if x.dim() > 2 else mix
        h = F.linear(self.lora_dropout(x), A) * mix
        if self.fused_forward:
            return lora_addmm(result.to(h.dtype), h, B, self.scaling).to(out_dtype)
        result = result + F.linear(h, B) * self.scaling
        return result.to(out_dtype)


# -- model-level API ------------------------------------------------------------------------------------------------
def subspace_layers(model: nn.Module) -> list[tuple[str, SubspaceLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SubspaceLinear)]


def _routing(model: nn.Module) -> _Routing:
    for m in model.modules():
        if isinstance(m, SubspaceLinear):
            return m._routing
    raise FcitError("subspace LoRA: the model has no subspace layers (call attach_subspace_lora first)")


def num_subspaces(model: nn.Module) -> int:
    return _routing(model).E


def attach_subspace_lora(model: nn.Module, cfg: SubspaceLoraConfig) -> nn.Module:
    """Freeze the backbone, wrap every Linear whose name fully matches ``cfg.target``, activate subspace 0.

    Returns the same model object (modified in place); parameter names gain ``.base_layer`` like PEFT's.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    # The routing keeps the resolved regex: it is what an exported PEFT adapter names as its targets.
    cfg = dataclasses.replace(cfg, target=resolve_target(model, cfg.target))
    routing = _Routing(cfg.num_subspaces, cfg.rank, cfg)
    pattern = re.compile(cfg.target)
    targets = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)
    ]
    if not targets:
        raise FcitError(f"subspace LoRA: no nn.Linear matches target {cfg.target!r}")
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SubspaceLinear(lin, routing, name, cfg))
    if cfg.train_projector:
        # The reference trains LLaVA's mm_projector alongside the adapter (reference section 2).
        params = dict(model.named_parameters())
        for n in projector_param_names(model):
            params[n].requires_grad_(True)
    set_active(model, 0)
    return model


def set_active(model: nn.Module, j: Optional[int], frozen_on: Sequence[int] = ()) -> None:
    """Training mode: subspace ``j`` trains (None: none does); ``frozen_on`` stay in the forward with weight 1.

    Clears any gate. Only subspace j's parameters get ``requires_grad=True``; everything else of the adapter is
    frozen. Parameters outside the adapter (the projector) are left as they are.
    """
    rt = _routing(model)
    slots = set(int(i) for i in frozen_on) | ({int(j)} if j is not None else set())
    bad = [i for i in slots if not 0 <= i < rt.E]
    if bad:
        raise FcitError(f"subspace LoRA: subspace {bad[0]} out of range (E = {rt.E})")
    for _, layer in subspace_layers(model):
        for i in range(rt.E):
            layer.lora_A[i].requires_grad_(i == j)
            layer.lora_B[i].requires_grad_(i == j)
    rt.active = tuple(sorted(slots))
    rt.trainable = None if j is None else int(j)
    rt.gate = rt.gate_q = None
    mask = torch.zeros(1, rt.E)
    mask[0, list(rt.active)] = 1.0
    rt.active_q = rt.expand(mask)


def _as_gate(g: GateLike, E: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(g) if not isinstance(g, torch.Tensor) else g).detach().float().cpu()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != E:
        raise FcitError(f"subspace LoRA: a gate must have shape (batch, {E}) or ({E},), got {tuple(t.shape)}")
    return t


def set_gate(model: nn.Module, gate: Optional[GateLike]) -> None:
    """Gated mode with one gate row per sample (or one row for the whole batch); None returns to the active set.

    The fused per-layer weights are refreshed here if any subspace changed since they were built.
    """
    rt = _routing(model)
    if gate is None:
        rt.gate = rt.gate_q = None
        return
    g = _as_gate(gate, rt.E)
    layers = subspace_layers(model)
    device = layers[0][1].lora_A[0].device
    for _, layer in layers:
        layer.refresh()
    rt.gate = g.to(device)
    rt.gate_q = rt.expand(rt.gate)


def get_gate(model: nn.Module) -> Optional[torch.Tensor]:
    return _routing(model).gate


@contextlib.contextmanager
def gated(model: nn.Module, gate: Optional[GateLike]) -> Iterator[None]:
    """``set_gate`` for the duration of a block; the previous gate (or active set) comes back afterwards."""
    rt = _routing(model)
    prev = rt.gate
    set_gate(model, gate)
    try:
        yield
    finally:
        set_gate(model, prev)


# -- state helpers ------------------------------------------------------------------------------------------------
def subspace_index(name: str) -> Optional[int]:
    """The subspace a parameter name belongs to (``...lora_A.3`` -> 3), None for anything else."""
    m = _SUBSPACE_KEY.search(name)
    return int(m.group(1)) if m else None


def subspace_names(model: nn.Module, j: Optional[int] = None) -> list[str]:
    """Parameter names of subspace j (all subspaces when j is None)."""
    return [n for n, _ in model.named_parameters() if (i := subspace_index(n)) is not None and (j is None or i == j)]


def split_state(state: State) -> tuple[dict[int, State], State]:
    """(subspace -> its tensors, everything else such as the projector)."""
    per: dict[int, State] = {}
    rest: State = {}
    for k, v in state.items():
        i = subspace_index(k)
        if i is None:
            rest[k] = v
        else:
            per.setdefault(i, {})[k] = v
    return per, rest
