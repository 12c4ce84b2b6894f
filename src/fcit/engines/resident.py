"""A client served on resident objects: what a process that serves many messages of one run does with each.

The heavy objects (backbone, method, data, batcher) are built once per run from the run's config: the first message
of a run builds them, a message of another run (another config) replaces them. Every engine whose clients live in
another process uses it: a Flower ClientApp in its own process (simulation, tests), the node worker of a deployed
SuperNode (``fcit.engines.flower.worker``), and the in-process engine's worker pool (``fcit.engines.pool``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from fcit.config import Config
from fcit.engines.client import client_update
from fcit.methods.base import StageInfo
from fcit.models.lora import set_state
from fcit.training.local import LocalResult

Tensors = dict[str, dict[str, torch.Tensor]]


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
        scenario = Scenario(cfg.scenario, cfg.seed, rt.bench, partitions_root=cfg.data.partitions,
                            union=method.union_stages)
        return cls(cfg, prepared.model, method, prepared.batcher, scenario, prepared.vision_cache)


@dataclass
class Resident:
    """The one run this process serves (a Ray actor or a node worker serves many messages of one run)."""

    key: Optional[str] = None
    runtime: Optional[ClientRuntime] = None
    loads: int = 0  # runtimes built by this process: one per run is the point of keeping them
    messages: int = 0


RESIDENT = Resident()


def preload() -> None:
    """Import what building a runtime and a compiled local run need (transformers, PEFT, Inductor: about 3 s on the
    2-core machine). A pool worker calls it as it starts, and so spends the wait for its first message, while the
    parent builds the run, on imports that message would otherwise pay for."""
    import peft  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: F401 (the lazy modules load)

    import fcit.data.scenario  # noqa: F401
    import fcit.methods  # noqa: F401
    import fcit.runtime  # noqa: F401


def node_config(raw: dict, settings: dict[str, Any]) -> dict:
    """The run's config with what the institution decides for itself: its data, its device."""
    raw = json.loads(json.dumps(raw))
    if "data-root" in settings:
        raw["data"]["root"] = settings["data-root"]
    if "partitions" in settings:
        raw["data"]["partitions"] = settings["partitions"]
    if "device" in settings:
        raw["device"] = settings["device"]
    return raw


def runtime(meta: dict, settings: dict[str, Any]) -> ClientRuntime:
    raw = node_config(json.loads(meta["config"]), settings)
    threads = settings.get("threads") or meta.get("client_threads") or raw.get("threads") or os.cpu_count() or 1
    torch.set_num_threads(int(threads))
    key = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    if RESIDENT.key != key:
        RESIDENT.runtime = None  # free the previous run's model before building the next
        RESIDENT.runtime, RESIDENT.key = ClientRuntime.build(Config.model_validate(raw)), key
        RESIDENT.loads += 1
    return RESIDENT.runtime


def request_meta(config_json: str, info: StageInfo, task: int, **extra) -> dict[str, Any]:
    """A message's meta: the run's config and where the run is; ``handle`` reads it back."""
    return {"config": config_json, "stage": info.stage, "round": info.round, "num_stages": info.num_stages,
            "tasks": list(info.tasks), "task": task, **extra}


def train_result(meta: dict, tensors: Tensors) -> LocalResult:
    """The ``LocalResult`` of a ``train`` reply (its meta and tensors, as ``handle`` returned them)."""
    return LocalResult(state=tensors["state"], num_samples=int(meta["num_samples"]), loss=float(meta["loss"]),
                       steps=int(meta["steps"]), seconds=float(meta["seconds"]))


def _info(meta: dict) -> StageInfo:
    return StageInfo(stage=meta["stage"], num_stages=meta["num_stages"], tasks=meta["tasks"], round=meta["round"])


def handle(kind: str, meta: dict, tensors: Tensors, cid: int,
           settings: dict[str, Any]) -> tuple[dict, Tensors, Optional[dict[str, float]]]:
    """One message of ``kind`` for client ``cid``: the reply's meta, tensors and Flower metrics."""
    rt = runtime(meta, settings)
    RESIDENT.messages += 1
    samples = rt.scenario.client_data(int(meta["task"]), cid)
    if kind == "identity":
        idt = rt.method.client_identity(rt.model, samples, _info(meta))
        tensors_out = {k: v.float() for k, v in idt.items() if isinstance(v, torch.Tensor)}
        extra = {k: v for k, v in idt.items() if not isinstance(v, torch.Tensor)}
        return {"client_id": cid, "identity": extra}, {"identity": tensors_out}, None
    rt.method.receive_from_server(tensors.get("shared", {}))
    if kind == "train":
        res = client_update(rt.method, rt.model, rt.batcher, rt.cfg, _info(meta), tensors["global"], meta["plan"],
                            samples, seed=int(meta["seed"]))
        out = {"client_id": cid, "num_samples": res.num_samples, "loss": res.loss, "steps": res.steps,
               "seconds": res.seconds}
        return out, {"state": res.state}, {"num-examples": res.num_samples, "train-loss": res.loss}
    if kind == "stage_end":
        set_state(rt.model, tensors["global"])
        payload = rt.method.client_after_stage(rt.model, samples, _info(meta))
        out = {"client_id": cid, "num_samples": len(samples), "has_payload": payload is not None}
        return out, {"payload": payload or {}}, None
    raise ValueError(f"unknown message kind {kind!r}")
