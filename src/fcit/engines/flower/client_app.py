"""The ClientApp: one institution (a SuperNode, or a virtual node of the simulation) runs the project's client code.

Its client id is the node's ``partition-id`` (set by ``fcit node --client-id`` or by the simulation). Messages:

* ``query.hello``: report the client id, so the server can address clients by id.
* ``query.identity``: the method's ``client_identity`` on this client's data of the stage (DISCO's identity token).
* ``train``: load what the server sent (global state, what the method shares with clients, the plan) and run
  ``fcit.engines.client.client_update``, the in-process engine's client step; reply with the trainable tensors.
* ``query.stage_end``: ``client_after_stage`` on the final global model of the stage (EWC's Fisher).

The heavy objects (backbone, method, data) are built once per process and run (``_RESIDENT``); a Flower 1.41
SuperNode starts a new process per message, so there they are rebuilt for every message.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fcit.config import Config
from fcit.engines.client import client_update
from fcit.engines.flower.records import decode, encode
from fcit.methods.base import StageInfo
from fcit.models.lora import set_state

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
    def build(cls, cfg: Config) -> "ClientRuntime":
        from fcit.data.scenario import Scenario
        from fcit.methods import build_method
        from fcit.runtime import Runtime, prepare_model

        method = build_method(cfg)
        rt = Runtime.build(cfg, progress=False)
        prepared = prepare_model(cfg, method, rt.base_model, rt.processor)
        scenario = Scenario(cfg.scenario, cfg.seed, rt.bench, partitions_root=cfg.data.partitions)
        return cls(cfg, prepared.model, method, prepared.batcher, scenario, prepared.vision_cache)


@dataclass
class _Resident:
    """The one run this process serves (a Ray actor serves many messages of one run; a new run replaces it)."""

    key: Optional[str] = None
    runtime: Optional[ClientRuntime] = None


_RESIDENT = _Resident()


def _node_settings(context: Context) -> dict[str, Any]:
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
    raw = json.loads(meta["config"])
    local = _node_settings(context)
    if "data-root" in local:
        raw["data"]["root"] = local["data-root"]
    if "partitions" in local:
        raw["data"]["partitions"] = local["partitions"]
    threads = local.get("threads") or meta.get("client_threads") or raw.get("threads") or os.cpu_count() or 1
    torch.set_num_threads(int(threads))
    key = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    if _RESIDENT.key != key:
        _RESIDENT.runtime = None  # free the previous run's model before building the next
        _RESIDENT.runtime, _RESIDENT.key = ClientRuntime.build(Config.model_validate(raw)), key
    return _RESIDENT.runtime


def _info(meta: dict) -> StageInfo:
    return StageInfo(stage=meta["stage"], num_stages=meta["num_stages"], tasks=meta["tasks"], round=meta["round"])


def _samples(rt: ClientRuntime, meta: dict, cid: int):
    return rt.scenario.client_data(int(meta["task"]), cid)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return Message(encode({"client_id": client_id(context)}), reply_to=msg)


@app.query("identity")
def identity(msg: Message, context: Context) -> Message:
    meta, _ = decode(msg.content)
    cid = client_id(context)
    rt = _runtime(meta, context)
    idt = rt.method.client_identity(rt.model, _samples(rt, meta, cid), _info(meta))
    tensors = {k: v.float() for k, v in idt.items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in idt.items() if not isinstance(v, torch.Tensor)}
    return Message(encode({"client_id": cid, "identity": extra}, {"identity": tensors}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    meta, tensors = decode(msg.content)
    cid = client_id(context)
    rt = _runtime(meta, context)
    rt.method.receive_from_server(tensors.get("shared", {}))
    res = client_update(rt.method, rt.model, rt.batcher, rt.cfg, _info(meta), tensors["global"], meta["plan"],
                        _samples(rt, meta, cid), seed=int(meta["seed"]))
    out = {"client_id": cid, "num_samples": res.num_samples, "loss": res.loss, "steps": res.steps,
           "seconds": res.seconds}
    return Message(encode(out, {"state": res.state}, {"num-examples": res.num_samples, "train-loss": res.loss}),
                   reply_to=msg)


@app.query("stage_end")
def stage_end(msg: Message, context: Context) -> Message:
    meta, tensors = decode(msg.content)
    cid = client_id(context)
    rt = _runtime(meta, context)
    rt.method.receive_from_server(tensors.get("shared", {}))
    set_state(rt.model, tensors["global"])
    samples = _samples(rt, meta, cid)
    payload = rt.method.client_after_stage(rt.model, samples, _info(meta))
    out = {"client_id": cid, "num_samples": len(samples), "has_payload": payload is not None}
    return Message(encode(out, {"payload": payload or {}}), reply_to=msg)
