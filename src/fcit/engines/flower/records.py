"""What travels in a Flower Message: named tensor dicts as ArrayRecords, everything else as one JSON ConfigRecord.

Tensors keep their dtype: bfloat16 (which numpy, Flower's array format, lacks) travels as float32, exactly, and is
cast back on arrival.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

if TYPE_CHECKING:
    import torch

META = "fcit-meta"
_DTYPES = "fcit-dtypes"


Arrays = dict[str, dict[str, np.ndarray]]  # record name -> tensor name -> array
Dtypes = dict[str, dict[str, str]]  # record name -> tensor name -> torch dtype the array stands for


def to_arrays(tensors: dict[str, dict[str, "torch.Tensor"]]) -> tuple[Arrays, Dtypes]:
    import torch

    arrays: Arrays = {}
    dtypes: Dtypes = {}
    for name, state in tensors.items():
        arrays[name] = {}
        for k, v in state.items():
            v = v.detach().cpu().contiguous()
            if v.dtype == torch.bfloat16:
                dtypes.setdefault(name, {})[k] = "bfloat16"
                v = v.float()
            arrays[name][k] = v.numpy()
    return arrays, dtypes


def from_arrays(arrays: Arrays, dtypes: Dtypes) -> dict[str, dict[str, "torch.Tensor"]]:
    import torch

    out = {}
    for name, state in arrays.items():
        out[name] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
        for k, dt in dtypes.get(name, {}).items():
            out[name][k] = out[name][k].to(getattr(torch, dt))
    return out


def encode_arrays(meta: dict[str, Any], arrays: Arrays | None = None, dtypes: Dtypes | None = None,
                  metrics: dict[str, float] | None = None) -> RecordDict:
    """The message content from numpy arrays: what a ClientApp that hands its work to a node worker sends back
    without importing torch."""
    rd = RecordDict()
    for name, state in (arrays or {}).items():
        rd[name] = ArrayRecord({k: Array(v) for k, v in state.items()}) if state else ArrayRecord()
    rd[META] = ConfigRecord({"json": json.dumps(meta), _DTYPES: json.dumps(dtypes or {})})
    if metrics:
        # Flower's own convention (e.g. its strategies weight by "num-examples"), for anything reading the replies.
        rd["metrics"] = MetricRecord(metrics)
    return rd


def decode_arrays(rd: RecordDict) -> tuple[dict[str, Any], Arrays, Dtypes]:
    meta_rec = rd[META]
    arrays: Arrays = {name: {k: a.numpy() for k, a in rec.items()} for name, rec in rd.items()
                      if isinstance(rec, ArrayRecord)}
    return json.loads(str(meta_rec["json"])), arrays, json.loads(str(meta_rec[_DTYPES]))


def encode(meta: dict[str, Any], tensors: dict[str, dict[str, "torch.Tensor"]] | None = None,
           metrics: dict[str, float] | None = None) -> RecordDict:
    """``meta`` must be JSON-serialisable; ``tensors`` maps a record name to a state dict."""
    return encode_arrays(meta, *to_arrays(tensors or {}), metrics=metrics)


def decode(rd: RecordDict) -> tuple[dict[str, Any], dict[str, dict[str, "torch.Tensor"]]]:
    meta, arrays, dtypes = decode_arrays(rd)
    return meta, from_arrays(arrays, dtypes)


def payload_bytes(rd: RecordDict) -> int:
    """Bytes of the tensors a message carries (what dominates its size on the wire)."""
    return sum(rec.count_bytes() for rec in rd.values() if isinstance(rec, ArrayRecord))
