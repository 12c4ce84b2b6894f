"""One FCIT experiment end to end: build everything from a validated config, run the stages, write the run directory.

Run directory: ``config.json`` (resolved config), ``metrics.json`` (accuracy matrix, Last/Avg/forgetting, per-round
logs, time breakdown), ``results.md``, ``matrix.png`` and ``checkpoint/`` (global state after the last finished stage,
so ``fcit run --resume DIR`` continues a crashed run from there).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from fcit.config import Config
from fcit.data import registry
from fcit.errors import FcitError
from fcit.eval.evaluate import generate
from fcit.federated.client import local_train
from fcit.federated.engine import InProcessEngine, Timer
from fcit.methods import build_method
from fcit.methods.base import Method, StageInfo
from fcit.models.backbone import load_backbone
from fcit.models.device import upcast_trainables
from fcit.models.inputs import Batcher
from fcit.models.lora import set_state
from fcit.models.vision_cache import VisionFeatureCache


def write_json(path: Path, obj: Any) -> None:
    """Atomic write: a crash never leaves a truncated file behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


@dataclass
class Runtime:
    """What is built once per process and shared by every run of a comparison: the benchmark and the base model."""

    bench: Any
    base_model: torch.nn.Module
    processor: Any

    @classmethod
    def build(cls, cfg: Config, progress: bool = True) -> "Runtime":
        from fcit.data.loader import open_benchmark

        bench = open_benchmark(cfg, progress=progress)
        model, processor = load_backbone(cfg.model.path, cfg.model.dtype, cfg.device, cfg.model.attn_implementation)
        return cls(bench, model, processor)

    def fresh_model(self) -> torch.nn.Module:
        # Methods inject adapters in place, so every run gets its own copy of the frozen backbone.
        return copy.deepcopy(self.base_model)


def _set_threads(cfg: Config) -> None:
    torch.set_num_threads(cfg.threads or max(1, os.cpu_count() or 1))


def default_run_dir(cfg: Config, method: str) -> Path:
    sc = cfg.scenario
    name = cfg.run_name or (
        f"{sc.setting}-{sc.mode}-{method}-b{sc.beta:g}-s{cfg.seed}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    )
    return Path(cfg.out_dir) / name


def prepare_model(cfg: Config, method: Method, base_model: torch.nn.Module, processor) -> tuple[Any, Batcher, Any]:
    """The method's model on a frozen backbone, its batcher and vision-feature cache, built the same way by the server
    and by every Flower client (so both start from identical adapters)."""
    # Seeded, so that any adapter tensor the global state does not carry starts identical on every party.
    torch.manual_seed(cfg.seed)
    model = method.setup(base_model)
    upcast_trainables(model)  # a half-precision base trains fp32 adapters (no-op for float32)
    cache = VisionFeatureCache(model, cfg.model.vision_cache_mb) if cfg.model.vision_cache_mb != 0 else None
    batcher = Batcher(model, processor, system_prompt=cfg.model.system_prompt, max_length=cfg.train.max_length,
                      cache_mb=cfg.model.vision_cache_mb)
    method.batcher = batcher
    method.bind(processor)
    return model, batcher, cache


class Experiment:
    """Server side of a run: the method's global state, the stage loop, evaluation after each stage, the run directory.

    ``engine_factory(experiment)`` gives the object that runs one stage's rounds (``run_stage``); by default the
    in-process engine, the Flower ServerApp passes one that talks to its Grid.
    """

    def __init__(self, cfg: Config, run_dir: Path, runtime: Optional[Runtime] = None, progress: bool = True,
                 engine_factory: Optional[Callable[["Experiment"], Any]] = None):
        self._t_created = time.perf_counter()
        self.engine_factory = engine_factory
        self.method: Method = build_method(cfg)  # validates method params before any heavy work
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        _set_threads(cfg)
        from fcit.data.scenario import Scenario

        self.rt = runtime or Runtime.build(cfg, progress=progress)
        self.scenario = Scenario(cfg.scenario, cfg.seed, self.rt.bench, partitions_root=cfg.data.partitions)
        base = self.rt.fresh_model() if runtime is not None else self.rt.base_model
        self.model, self.batcher, self.vision_cache = prepare_model(cfg, self.method, base, self.rt.processor)
        # A max_length that cannot hold a prompt fails here, not in the middle of a stage.
        sc = self.scenario
        self.batcher.check_max_length([s for k in sorted({k for t in range(sc.num_stages) for k in sc.stage_tasks(t)})
                                       for d in sc.tasks[k] for s in self.rt.bench.train(d)])
        self.timer = Timer()
        self._tests: dict[str, list] = {}

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, datasets: list[str]) -> dict[str, dict]:
        from fcit.eval.scorers import score_dataset

        t0 = time.perf_counter()
        out = {}
        e = self.cfg.eval
        for d in tqdm(datasets, desc="eval", leave=False, disable=not self.progress):
            if d not in self._tests:
                self._tests[d] = self.rt.bench.test(d, limit=e.max_test)
            samples = self._tests[d]
            with self.method.inference_gate(self.model, samples):
                preds = generate(self.model, self.batcher, samples, e.batch_size, e.max_new_tokens)
            res = score_dataset(d, preds, samples)
            res.pop("correct", None)
            res["examples"] = [{"q": s.prompt, "gt": s.answer, "pred": p} for s, p in list(zip(samples, preds))[:3]]
            out[d] = res
        self.timer.add("eval", time.perf_counter() - t0)
        return out

    # -- checkpointing -------------------------------------------------------------------------------------------
    def _save_checkpoint(self, state: dict, progress: dict) -> None:
        from safetensors.torch import save_file

        ck = self.run_dir / "checkpoint"
        ck.mkdir(parents=True, exist_ok=True)
        tensors = {f"global/{k}": v.contiguous() for k, v in state.items()}
        tensors.update({f"method/{k}": v.contiguous() for k, v in self.method.state_dict().items()})
        save_file(tensors, str(ck / "state.safetensors.tmp"))
        os.replace(ck / "state.safetensors.tmp", ck / "state.safetensors")
        write_json(ck / "progress.json", progress)

    def load_checkpoint(self) -> tuple[dict, dict] | None:
        """The global state and progress of the last finished stage (method state is loaded into the method)."""
        from safetensors.torch import load_file

        ck = self.run_dir / "checkpoint"
        if not (ck / "progress.json").is_file():
            return None
        tensors = load_file(str(ck / "state.safetensors"))
        state = {k[7:]: v for k, v in tensors.items() if k.startswith("global/")}
        self.method.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("method/")})
        return state, json.loads((ck / "progress.json").read_text())

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        from fcit.eval.metrics import AccuracyMatrix

        t_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", self.cfg.model_dump(mode="json"))
        sc = self.scenario
        matrix = AccuracyMatrix(datasets=[], rows=[])
        logs: list[dict] = []
        details: list[dict] = []
        start_stage = 0
        global_state = self.method.initial_state(self.model)
        if resume and (ck := self.load_checkpoint()) is not None:
            global_state, prog = ck
            matrix = AccuracyMatrix.from_dict(prog["matrix"])
            logs, details, start_stage = prog["rounds"], prog["details"], prog["next_stage"]
            self.timer.seconds.update(prog["timing"])

        kind = self.method.kind
        # Time to the first stage: data generation (first run), model load, partitions; the issue bounds it at 60 s.
        self.timer.seconds.setdefault("setup", time.perf_counter() - self._t_created)
        if kind == "federated":
            engine = (self.engine_factory(self) if self.engine_factory is not None else
                      InProcessEngine(self.cfg, self.model, self.batcher, sc, self.method, self.timer))
            stages = tqdm(range(start_stage, sc.num_stages), desc="stages", disable=not self.progress,
                          initial=start_stage, total=sc.num_stages)
            for t in stages:
                info = StageInfo(stage=t, num_stages=sc.num_stages, tasks=sc.stage_tasks(t))
                global_state = self.method.before_stage(self.model, info, global_state)
                global_state, round_logs = engine.run_stage(info, global_state, bar=self.progress)
                logs += round_logs
                res = self.evaluate(sc.seen_datasets(t))
                matrix.add_stage({d: r["score"] for d, r in res.items()})
                details.append(res)
                stages.set_postfix(avg_seen=f"{sum(r['score'] for r in res.values()) / len(res):.1f}")
                self._save_checkpoint(global_state, {"next_stage": t + 1, "matrix": matrix.to_dict(), "rounds": logs,
                                                     "details": details, "timing": self.timer.seconds})
        else:
            if kind == "centralized":
                self._train_centralized(global_state)
            # The model does not change between stages, so one evaluation fills every row of the matrix.
            all_seen = sc.seen_datasets(sc.num_stages - 1)
            res = self.evaluate(all_seen)
            for t in range(sc.num_stages):
                matrix.add_stage({d: res[d]["score"] for d in sc.seen_datasets(t)})
            details.append(res)
        self.timer.add("total", time.perf_counter() - t_start)
        return self._write_results(matrix, logs, details)

    def _train_centralized(self, start: dict) -> None:
        sc = self.scenario
        data = [s for k in sorted({k for t in range(sc.num_stages) for k in sc.stage_tasks(t)}) for s in sc.task_train(k)]
        steps = -(-len(data) // self.cfg.train.batch_size) * self.cfg.train.local_epochs
        bar = tqdm(total=steps, desc="centralized multi-task", disable=not self.progress)
        t0 = time.perf_counter()
        res = local_train(self.model, self.batcher, start, data, self.cfg.train, seed=self.cfg.seed, progress=bar.update)
        bar.close()
        self.timer.add("train", time.perf_counter() - t0)
        set_state(self.model, res.state)

    def _write_results(self, matrix, logs: list[dict], details: list[dict]) -> dict:
        from fcit.eval.metrics import summary
        from fcit.report.plots import matrix_heatmap
        from fcit.report.tables import matrix_markdown

        sc = self.scenario
        last_stage_tasks = sc.stage_tasks(sc.num_stages - 1)
        final_ds = [d for k in last_stage_tasks for d in sc.tasks[k]] if self.method.kind == "federated" else sc.seen_datasets(sc.num_stages - 1)
        groups = None
        if self.cfg.scenario.setting == "capability":
            groups = {}
            for d in matrix.datasets:
                groups.setdefault(registry.get(d).group, []).append(d)
        summ = summary(matrix, final_ds, groups)
        t = self.timer.seconds
        # "total" runs from the first stage on; "setup" (before it) is reported beside it.
        t["other"] = max(0.0, t.get("total", 0.0) - t["train"] - t["eval"] - t["aggregation"])
        metrics = {
            "method": self.method.name,
            "scenario": sc.name,
            "seed": self.cfg.seed,
            "matrix": matrix.to_dict(),
            "summary": summ,
            "per_dataset": details,
            "rounds": logs,
            "timing": t,
        }
        metrics["method_artifacts"] = self.method.write_artifacts(self.run_dir)
        write_json(self.run_dir / "metrics.json", metrics)
        title = f"{self.method.name} on {sc.name} (beta={self.cfg.scenario.beta:g}, seed {self.cfg.seed})"
        md = matrix_markdown(matrix, summ, title)
        (self.run_dir / "results.md").write_text(md)
        matrix_heatmap(matrix, self.run_dir / "matrix.png", title)
        return metrics


def run(cfg: Config, run_dir: Path | None = None, runtime: Optional[Runtime] = None, progress: bool = True,
        resume: bool = False) -> tuple[Path, dict]:
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg, cfg.method.name)
    if not resume and (run_dir / "metrics.json").exists():
        raise FcitError(f"run directory {run_dir} already holds a finished run; pick another --out or --name")
    engine = cfg.federation.engine
    if engine != "inprocess" and build_method(cfg).kind == "federated":
        from fcit.federated.flower.launch import run_deployment, run_simulation

        launch = run_simulation if engine == "flower-sim" else run_deployment
        return run_dir, launch(cfg, run_dir, resume=resume, progress=progress)
    exp = Experiment(cfg, run_dir, runtime=runtime, progress=progress)
    return run_dir, exp.run(resume=resume)
