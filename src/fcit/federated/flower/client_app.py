"""The ClientApp: one institution (a SuperNode, or a virtual node of the simulation) runs the project's client code.

Its client id is the node's ``partition-id`` (set by ``fcit node --client-id`` or by the simulation). Messages:

* ``query.hello``: report the client id, so the server can address clients by id.
* ``query.identity``: the method's ``client_identity`` on this client's data of the stage (DISCO's identity token).
* ``train``: load what the server sent (global state, the method's client state, the plan) and run
  ``fcit.federated.client.client_update``, the in-process engine's client step; reply with the trainable tensors.
* ``query.stage_end``: ``client_after_stage`` on the final global model of the stage (EWC's Fisher).

The heavy objects (backbone, method, data) are built once per process and config; a SuperNode starts a new process
per message, so only ``Context.state`` (kept by the SuperNode) survives there: identity tokens, which do not change
within a stage, are cached in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import fcit.federated.flower  # noqa: F401  (Flower's environment switches, before flwr loads)
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fcit.federated.flower.records import decode, encode

app = ClientApp()


@dataclass
class ClientRuntime:
    cfg: Any
    model: torch.nn.Module
    method: Any
    batcher: Any
    scenario: Any
    vision_cache: Any = None

    @classmethod
    def build(cls, cfg) -> "ClientRuntime":
        from fcit.data.loader import open_benchmark
        from fcit.data.scenario import Scenario
        from fcit.experiment import prepare_model
        from fcit.methods import build_method
        from fcit.models.backbone import load_backbone

        method = build_method(cfg)
        bench = open_benchmark(cfg, progress=False)
        base, processor = load_backbone(cfg.model.path, cfg.model.dtype, cfg.device, cfg.model.attn_implementation)
        model, batcher, cache = prepare_model(cfg, method, base, processor)
        scenario = Scenario(cfg.scenario, cfg.seed, bench, partitions_root=cfg.data.partitions)
        return cls(cfg, model, method, batcher, scenario, cache)


_RUNTIMES: dict[str, ClientRuntime] = {}


def _node_overrides(context: Context) -> dict[str, Any]:
    """What the institution decides for itself: where its data lives and how many threads it gives a client."""
    nc = context.node_config
    out: dict[str, Any] = {}
    if nc.get("data-root"):
        out["data-root"] = str(nc["data-root"])
    if nc.get("partitions"):
        out["partitions"] = str(nc["partitions"])
    if nc.get("threads"):
        out["threads"] = int(nc["threads"])
    return out


def client_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise RuntimeError("this SuperNode has no partition-id in its node config; start it with fcit node --client-id")
    return int(context.node_config["partition-id"])


def _runtime(meta: dict, context: Context) -> ClientRuntime:
    from fcit.config import Config

    raw = json.loads(meta["config"])
    local = _node_overrides(context)
    if "data-root" in local:
        raw["data"]["root"] = local["data-root"]
    if "partitions" in local:
        raw["data"]["partitions"] = local["partitions"]
    threads = local.get("threads") or meta.get("client_threads") or raw.get("threads") or os.cpu_count() or 1
    torch.set_num_threads(int(threads))
    key = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one run at a time per process: free the previous run's model
        _RUNTIMES[key] = ClientRuntime.build(Config.model_validate(raw))
    return _RUNTIMES[key]


def _info(meta: dict):
    from fcit.methods.base import StageInfo

    return StageInfo(stage=meta["stage"], num_stages=meta["num_stages"], tasks=meta["tasks"], round=meta["round"])


def _samples(rt: ClientRuntime, meta: dict, cid: int):
    return rt.scenario.shares(int(meta["task"]))[cid]


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return Message(encode({"client_id": client_id(context)}), reply_to=msg)


@app.query("identity")
def identity(msg: Message, context: Context) -> Message:
    meta, _ = decode(msg.content)
    cid = client_id(context)
    # A client's data of a stage is fixed, so is its identity: cached per (run, stage, task) in the node's state.
    key = f"identity/{meta['run_key']}/{meta['stage']}/{meta['task']}"
    if key in context.state and f"{key}/meta" in context.state:
        tensors = context.state[key].to_torch_state_dict() if len(context.state[key]) else {}
        extra = json.loads(str(context.state[f"{key}/meta"]["json"]))
    else:
        rt = _runtime(meta, context)
        idt = rt.method.client_identity(rt.model, _samples(rt, meta, cid), _info(meta))
        tensors = {k: v for k, v in idt.items() if isinstance(v, torch.Tensor)}
        extra = {k: v for k, v in idt.items() if not isinstance(v, torch.Tensor)}
        context.state[key] = ArrayRecord(torch_state_dict={k: v.float() for k, v in tensors.items()}) if tensors \
            else ArrayRecord()
        context.state[f"{key}/meta"] = ConfigRecord({"json": json.dumps(extra)})
    return Message(encode({"client_id": cid, "identity": extra}, {"identity": tensors}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fcit.federated.client import client_update

    meta, tensors = decode(msg.content)
    cid = client_id(context)
    rt = _runtime(meta, context)
    rt.method.load_client_state(tensors.get("client_state", {}))
    res = client_update(rt.method, rt.model, rt.batcher, rt.cfg, _info(meta), tensors["global"], meta["plan"],
                        _samples(rt, meta, cid), seed=int(meta["seed"]))
    served = context.state["fcit/served"]["rounds"] if "fcit/served" in context.state else 0
    context.state["fcit/served"] = ConfigRecord({"rounds": int(served) + 1})
    out = {"client_id": cid, "num_samples": res.num_samples, "loss": res.loss, "steps": res.steps,
           "seconds": res.seconds}
    return Message(encode(out, {"state": res.state}, {"num-examples": res.num_samples, "train-loss": res.loss}),
                   reply_to=msg)


@app.query("stage_end")
def stage_end(msg: Message, context: Context) -> Message:
    from fcit.models.lora import set_state

    meta, tensors = decode(msg.content)
    cid = client_id(context)
    rt = _runtime(meta, context)
    rt.method.load_client_state(tensors.get("client_state", {}))
    set_state(rt.model, tensors["global"])
    samples = _samples(rt, meta, cid)
    payload = rt.method.client_after_stage(rt.model, samples, _info(meta))
    out = {"client_id": cid, "num_samples": len(samples), "has_payload": payload is not None}
    return Message(encode(out, {"payload": payload or {}}), reply_to=msg)
