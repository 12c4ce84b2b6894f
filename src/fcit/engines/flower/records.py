"""What travels in a Flower Message: named tensor dicts as ArrayRecords, everything else as one JSON ConfigRecord.

Tensors keep their dtype: bfloat16 (which numpy, Flower's array format, lacks) travels as float32, exactly, and is
cast back on arrival.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

META = "fcit-meta"
_DTYPES = "fcit-dtypes"


def _to_numpy_safe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out, dtypes = {}, {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        if v.dtype == torch.bfloat16:
            dtypes[k] = "bfloat16"
            v = v.float()
        out[k] = v
    return out, dtypes


def encode(meta: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]] | None = None,
           metrics: dict[str, float] | None = None) -> RecordDict:
    """``meta`` must be JSON-serialisable; ``tensors`` maps a record name to a state dict."""
    rd = RecordDict()
    dtypes: dict[str, dict[str, str]] = {}
    for name, state in (tensors or {}).items():
        safe, dt = _to_numpy_safe(state)
        rd[name] = ArrayRecord(torch_state_dict=safe) if safe else ArrayRecord()
        if dt:
            dtypes[name] = dt
    rd[META] = ConfigRecord({"json": json.dumps(meta), _DTYPES: json.dumps(dtypes)})
    if metrics:
        # Flower's own convention (e.g. its strategies weight by "num-examples"), for anything reading the replies.
        rd["metrics"] = MetricRecord(metrics)
    return rd


def decode(rd: RecordDict) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    meta_rec = rd[META]
    meta = json.loads(str(meta_rec["json"]))
    dtypes = json.loads(str(meta_rec[_DTYPES]))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, rec in rd.items():
        if isinstance(rec, ArrayRecord):
            state = rec.to_torch_state_dict() if len(rec) else {}
            for k, dt in dtypes.get(name, {}).items():
                state[k] = state[k].to(getattr(torch, dt))
            tensors[name] = state
    return meta, tensors


def payload_bytes(rd: RecordDict) -> int:
    """Bytes of the tensors a message carries (what dominates its size on the wire)."""
    return sum(rec.count_bytes() for rec in rd.values() if isinstance(rec, ArrayRecord))
