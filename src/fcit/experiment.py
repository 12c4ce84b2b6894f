"""One FCIT experiment end to end: build everything from a validated config, run the stages, write the run directory.

Run directory: ``config.json`` (resolved config), ``environment.json`` (one ``fcit.environment`` record per start:
a resumed run appends one), ``metrics.json`` (accuracy matrix, Last/Avg/forgetting, per-round logs, time breakdown,
a summary of the environment records), ``results.md``, ``matrix.png`` and ``checkpoint/`` (global state after the
last finished stage, so ``fcit run --resume DIR`` continues a crashed run from there).

The stage loop is here, once: train the stage (``fcit.engines.loop.StageLoop`` over the run's transport), evaluate
every dataset seen so far, checkpoint. Which engine carries the rounds is the caller's choice (``fcit.launch``).
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from fcit import environment, rundir
from fcit.config import Config, resolve_auto
from fcit.data import registry
from fcit.data.validation import validate_scenario
from fcit.errors import FcitError
from fcit.engines.inprocess import InProcessTransport
from fcit.engines.loop import RoundFailed, StageLoop, Timer, Transport
from fcit.eval.evaluate import generate
from fcit.eval.general import GeneralScore
from fcit.jsonio import write_json
from fcit.methods import build_method
from fcit.methods.base import Kind, Method, StageInfo
from fcit.models.lora import set_state
from fcit.results import Retention, RoundLog, RunResult, Summary
from fcit.runtime import Runtime, prepare_model, set_threads
from fcit.training.guard import empty_predictions_warning, located
from fcit.training.local import local_train


def default_run_dir(cfg: Config, method: str) -> Path:
    sc = cfg.scenario
    name = cfg.run_name or (
        f"{sc.setting}-{sc.mode}-{method}-b{sc.beta:g}-s{cfg.seed}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    )
    return Path(cfg.out_dir) / name


class Experiment:
    """Server side of a run: the method's global state, the stage loop, evaluation after each stage, the run directory.

    ``transport`` carries each round's messages to the clients; by default they run in this process
    (``InProcessTransport``), the Flower ServerApp passes one over its Grid.
    """

    def __init__(self, cfg: Config, run_dir: Path, runtime: Optional[Runtime] = None, progress: bool = True,
                 transport: Optional[Transport] = None):
        self._t_created = time.perf_counter()
        self.method: Method = build_method(cfg)  # validates method params before any heavy work
        self.cfg = resolve_auto(cfg)
        self.run_dir = Path(run_dir)
        self.progress = progress
        set_threads(cfg)
        if transport is None:
            self._start_pool()  # the workers import torch while this process loads the benchmark and the model
        from fcit.data.scenario import Scenario

        self.rt = runtime or Runtime.build(cfg, progress=progress)
        self.scenario = Scenario(cfg.scenario, cfg.seed, self.rt.bench, partitions_root=cfg.data.partitions,
                                 union=self.method.union_stages)
        base = self.rt.fresh_model() if runtime is not None else self.rt.base_model
        validate_scenario(self.rt.bench, self.scenario)  # a bad file of the last stage fails before stage 1
        prepared = prepare_model(cfg, self.method, base, self.rt.processor)
        self.model, self.batcher, self.vision_cache = prepared.model, prepared.batcher, prepared.vision_cache
        # A max_length that cannot hold a prompt fails here, not in the middle of a stage.
        sc = self.scenario
        self.batcher.check_max_length([s for k in sorted({k for t in range(sc.num_stages) for k in sc.stage_tasks(t)})
                                       for d in sc.tasks[k] for s in self.rt.bench.train(d)])
        if cfg.eval.unseen:
            for d in sc.unseen:  # parsed now: a missing test file fails before stage 1, not after the last
                self.rt.bench.test(d, limit=cfg.eval.max_test)
        self._general: Optional[list] = None
        if cfg.eval.retention:
            from fcit.data.loader import open_general

            self._general = open_general(cfg, progress=progress)  # built (once per cache) and parsed before stage 1
        self.transport: Transport = transport or self._local_transport()
        self.timer = Timer()
        self._tests: dict[str, list] = {}
        self.warnings: list[str] = []

    def _pool_plan(self, device) -> tuple[int, int]:
        """(worker processes, threads each) of the in-process engine; 1 worker = no pool."""
        from fcit.engines.pool import worker_plan

        workers, threads = worker_plan(self.cfg.federation.workers, self.cfg.threads, device,
                                       self.cfg.scenario.clients_per_round)
        return (workers, threads) if self.method.kind == Kind.FEDERATED else (1, threads)

    def _start_pool(self) -> None:
        from fcit.engines.pool import get_pool
        from fcit.models.device import resolve_device

        workers, threads = self._pool_plan(resolve_device(self.cfg.device))
        if workers > 1:
            get_pool(workers, threads)

    def _local_transport(self) -> Transport:
        from fcit.engines.pool import PoolTransport
        from fcit.models.device import model_device

        args = (self.cfg, self.model, self.batcher, self.scenario, self.method, self.progress)
        workers, threads = self._pool_plan(model_device(self.model))
        if workers == 1:
            return InProcessTransport(*args)
        return PoolTransport(*args, workers=workers, threads=threads)

    def _environment(self) -> dict:
        """This start's environment record: the process, the run's device and the client worker pool."""
        from fcit.engines.pool import PoolTransport
        from fcit.models.device import model_device

        if isinstance(self.transport, PoolTransport):
            workers, threads = self.transport.workers, self.transport.threads
        elif isinstance(self.transport, InProcessTransport):
            workers, threads = 1, None
        else:  # the clients run elsewhere (Flower)
            workers = threads = None
        from fcit.models.compiled import compiles

        compiled = compiles(self.cfg.train, model_device(self.model)) if workers is not None else None
        return environment.record(device=str(model_device(self.model)), workers=workers, worker_threads=threads,
                                  compiled=compiled)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, datasets: list[str], stage: int) -> dict[str, dict]:
        from fcit.eval.scorers import score_dataset

        t0 = time.perf_counter()
        out = {}
        e = self.cfg.eval
        for d in tqdm(datasets, desc="eval", leave=False, disable=not self.progress):
            if d not in self._tests:
                self._tests[d] = self.rt.bench.test(d, limit=e.max_test)
            samples = self._tests[d]
            with self.method.inference_gate(self.model, samples, stage):
                preds = generate(self.model, self.batcher, samples, e.batch_size, e.max_new_tokens)
            res = score_dataset(d, preds, samples, e.scoring)
            if (w := empty_predictions_warning(d, preds, f"after stage {stage + 1}")) is not None:
                self.warnings.append(w)
            res.pop("correct", None)
            res["examples"] = [{"q": s.prompt, "gt": s.answer, "pred": p} for s, p in list(zip(samples, preds))[:3]]
            out[d] = res
        self.timer.add("eval", time.perf_counter() - t0)
        return out

    def score_general(self, stage: Optional[int]) -> GeneralScore:
        """The general set on the current model: ``stage`` None is the base before any training, generated outside
        the method's inference gate (every adapter is still zero, so the model is the base whatever the method; a
        gate has nothing to route to yet); otherwise the model after ``stage``, generated as the tasks' test sets
        are (DISCO's gate included)."""
        from fcit.data.loader import GENERAL
        from fcit.eval.general import score_general

        t0 = time.perf_counter()
        e, samples = self.cfg.eval, self._general
        gate = contextlib.nullcontext() if stage is None else self.method.inference_gate(self.model, samples, stage)
        with gate:
            preds = generate(self.model, self.batcher, samples, e.batch_size, e.max_new_tokens)
        when = "on the base" if stage is None else f"after stage {stage + 1}"
        if (w := empty_predictions_warning(GENERAL, preds, when)) is not None:
            self.warnings.append(w)
        self.timer.add("eval", time.perf_counter() - t0)
        return score_general(preds, samples, e.scoring)

    # -- checkpointing -------------------------------------------------------------------------------------------
    def _save_checkpoint(self, state: dict, progress: dict) -> None:
        rundir.save_checkpoint(self.run_dir, self.cfg, state, self.method.state_dict(), progress)

    def load_checkpoint(self) -> tuple[dict, dict] | None:
        """The global state and progress of the last finished stage (method state is loaded into the method)."""
        ck = rundir.load_checkpoint(self.run_dir, self.cfg, self.scenario.num_stages)
        if ck is None:
            return None
        state, method_state, progress = ck
        self.method.load_state_dict(method_state)
        return state, progress

    def load_final(self) -> None:
        """A finished run's final global state into the model (and the method's state into the method), for
        evaluating it again afterwards (scripts/transfer_eval.py, scripts/disco_activation_ablation.py)."""
        ck = self.load_checkpoint()
        if ck is None or ck[1].get("next_stage") != self.scenario.num_stages:
            raise FcitError(f"{self.run_dir}: not a finished run (its checkpoint is not after the last stage)")
        set_state(self.model, ck[0])

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunResult:
        from fcit.eval.metrics import AccuracyMatrix

        t_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", self.cfg.model_dump(mode="json"))
        env_records, env_warning = environment.append(self.run_dir, self._environment(), fresh=not resume)
        sc = self.scenario
        matrix = AccuracyMatrix(datasets=[], rows=[])
        logs: list[RoundLog] = []
        details: list[dict] = []
        start_stage = 0
        global_state = self.method.initial_state(self.model)
        total_before = 0.0  # wall time of the stages a resumed run inherits
        before: Optional[GeneralScore] = None  # eval.retention: the base on the general set
        if resume and (ck := self.load_checkpoint()) is not None:
            global_state, prog = ck
            matrix = AccuracyMatrix.from_dict(prog["matrix"])
            logs = [RoundLog.from_dict(r) for r in prog["rounds"]]
            details, start_stage = prog["details"], prog["next_stage"]
            self.method.load_state_json(prog.get("method_state", {}))
            self.timer.seconds.update(prog["timing"])
            total_before = self.timer.seconds.pop("total", 0.0)
            self.warnings = prog.get("warnings", [])
            if self.cfg.eval.retention:
                if prog.get("retention_before") is None:  # the trained model is no longer the base
                    raise FcitError(f"{self.run_dir}: its checkpoint holds no base score on the general set "
                                    f"(eval.retention); rerun it from the start")
                before = GeneralScore.from_dict(prog["retention_before"])
        self._environment_summary = environment.summary(env_records)
        for w in (env_warning, environment.resume_note(env_records)):
            if w is not None:
                self.warnings.append(w)

        kind = self.method.kind
        # Time to the first stage: data generation (first run), model load, partitions; the issue bounds it at 60 s.
        self.timer.seconds.setdefault("setup", time.perf_counter() - self._t_created)
        if self.cfg.eval.retention and before is None:
            # Before any training; a resumed run kept the score in its checkpoint (the base is gone by then).
            before = self.score_general(None)
        if kind == Kind.FEDERATED:
            loop = StageLoop(self.method, self.model, sc, self.transport, rounds=sc.rounds,
                             seed=self.cfg.seed, min_replies=self.cfg.federation.min_replies, timer=self.timer)
            stages = tqdm(range(start_stage, sc.num_stages), desc="stages", disable=not self.progress,
                          initial=start_stage, total=sc.num_stages)
            for t in stages:
                info = StageInfo(stage=t, num_stages=sc.num_stages, tasks=sc.stage_tasks(t))
                global_state = self.method.before_stage(self.model, info, global_state)
                try:
                    global_state, round_logs = loop.run(info, global_state, bar=self.progress)
                except RoundFailed as err:
                    raise FcitError(f"{err}; the run stopped and `fcit run --resume {self.run_dir}` continues it "
                                    f"from the last finished stage") from None
                logs += round_logs
                res = self.evaluate(sc.seen_datasets(t), t)
                matrix.add_stage({d: r["score"] for d, r in res.items()})
                details.append(res)
                stages.set_postfix(avg_seen=f"{sum(r['score'] for r in res.values()) / len(res):.1f}")
                timing = {**self.timer.seconds, "total": total_before + time.perf_counter() - t_start}
                record = {"next_stage": t + 1, "matrix": matrix.to_dict(), "rounds": [r.to_dict() for r in logs],
                          "details": details, "method_state": self.method.state_json(), "timing": timing,
                          "warnings": self.warnings}
                if before is not None:  # only then: a run without eval.retention writes the checkpoint it always did
                    record["retention_before"] = before.to_dict()
                self._save_checkpoint(global_state, record)
        else:
            if kind == Kind.CENTRALIZED:
                self._train_centralized(global_state)
            # One model, evaluated once on every dataset: the matrix has that one row (copying it into a row per
            # stage made an Avg out of a single evaluation).
            all_seen = sc.seen_datasets(sc.num_stages - 1)
            res = self.evaluate(all_seen, sc.num_stages - 1)
            matrix.add_stage({d: res[d]["score"] for d in all_seen})
            details.append(res)
        unseen = None
        if self.cfg.eval.unseen:
            # The final model on what it never trained; scored apart so Last/Avg stay over the trained datasets.
            res = self.evaluate(sc.unseen, sc.num_stages - 1)
            unseen = {d: r["score"] for d, r in res.items()}
        retention = None
        if before is not None:
            retention = Retention(before=before, after=self.score_general(sc.num_stages - 1))
        self.timer.add("total", total_before + time.perf_counter() - t_start)
        return self._write_results(matrix, logs, details, unseen, retention)

    def _train_centralized(self, start: dict) -> None:
        sc = self.scenario
        data = [s for k in sorted({k for t in range(sc.num_stages) for k in sc.stage_tasks(t)}) for s in sc.task_train(k)]
        steps = -(-len(data) // self.cfg.train.batch_size) * self.cfg.train.local_epochs
        bar = tqdm(total=steps, desc="centralized multi-task", disable=not self.progress)
        t0 = time.perf_counter()
        with located("centralized training"):
            res = local_train(self.model, self.batcher, start, data, self.cfg.train, seed=self.cfg.seed,
                              progress=bar.update)
        bar.close()
        self.timer.add("train", time.perf_counter() - t0)
        set_state(self.model, res.state)

    def _write_results(self, matrix, logs: list[RoundLog], details: list[dict],
                       unseen: Optional[dict[str, float]] = None,
                       retention: Optional[Retention] = None) -> RunResult:
        from fcit.eval.metrics import summary
        from fcit.report.artifacts import write_artifacts
        from fcit.report.plots import matrix_heatmap
        from fcit.report.tables import matrix_markdown

        sc = self.scenario
        last_stage_tasks = sc.stage_tasks(sc.num_stages - 1)
        final_ds = ([d for k in last_stage_tasks for d in sc.tasks[k]] if self.method.kind == Kind.FEDERATED
                    else sc.seen_datasets(sc.num_stages - 1))
        groups = None
        if self.cfg.scenario.setting == "capability":
            groups = {}
            for d in matrix.datasets:
                groups.setdefault(registry.get(d).group, []).append(d)
        summ = Summary.from_dict(summary(matrix, final_ds, groups))
        if not self.method.continual:
            # Not a continual learner: its final model has no "after stage t" to average or forget over.
            summ.avg = summ.forgetting = summ.avg_groups = None
        t = self.timer.seconds
        # "total" runs from the first stage on; "setup" (before it) is reported beside it.
        t["other"] = max(0.0, t.get("total", 0.0) - t["train"] - t["eval"] - t["aggregation"])
        result = RunResult(method=self.method.name, scenario=sc.name, seed=self.cfg.seed, matrix=matrix,
                           summary=summ, per_dataset=details, rounds=logs, timing=t, warnings=self.warnings,
                           method_artifacts=write_artifacts(self.method.artifacts(), self.run_dir),
                           environment=self._environment_summary, unseen=unseen, retention=retention)
        write_json(self.run_dir / "metrics.json", result.to_dict())
        title = f"{self.method.name} on {sc.name} (beta={self.cfg.scenario.beta:g}, seed {self.cfg.seed})"
        labels = None if self.method.continual else ["Final model"]
        md = matrix_markdown(matrix, summ.to_dict(), title, row_labels=labels)
        if unseen is not None:
            md += "- **Unseen** (never trained): " + (", ".join(f"{d} {v:.1f}" for d, v in unseen.items())
                                                      or "none: the setting trains every dataset") + "\n"
        if retention is not None:
            md += _retention_line(retention)
        (self.run_dir / "results.md").write_text(md)
        matrix_heatmap(matrix, self.run_dir / "matrix.png", title, row_labels=labels)
        return result


def _retention_line(r: Retention) -> str:
    fmts = ", ".join(f"{f} {v:.1f} -> {r.after.per_format[f]:.1f}" for f, v in r.before.per_format.items()
                     if f != "caption")
    cap = (f"; caption CIDEr {r.before.per_format['caption']:.1f} -> {r.after.per_format['caption']:.1f}"
           if "caption" in r.before.per_format else "")
    return (f"- **General ability** (held-out generic instructions, mean over formats): base {r.before.score:.1f}, "
            f"final {r.after.score:.1f} ({-r.drop:+.1f}; {fmts}{cap})\n")
