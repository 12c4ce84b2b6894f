"""The in-process engine with a round's clients trained in parallel, by worker processes of this machine.

A round's clients are independent, and the embedded model's matrices are too small for two threads to help one
step much: two one-thread processes do about twice the work of one two-thread process (``scripts/bench_speed.py``).
So ``federation.workers`` processes each keep a resident model (``fcit.engines.resident``, built once per run from
the run's config, as a Flower node builds its own) and take the next client when they are free; the parent keeps
the server: identities, planning, aggregation, the stage end and evaluation run there as in ``InProcessTransport``.

A client's update is a function of (global state, what the method shares with clients, data, seed) only, so the
run's results equal the in-process engine's at the same threads per client, bit for bit. The pool outlives one
run: a comparison's next run reuses the processes, which rebuild their objects for the new config.
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from fcit.engines.inprocess import InProcessTransport
from fcit.engines.loop import TrainJob
from fcit.engines.resident import request_meta, train_result
from fcit.errors import FcitError
from fcit.methods.base import StageInfo
from fcit.models.lora import State
from fcit.training.guard import TrainingDiverged
from fcit.training.local import LocalResult


# Plain pickle, not Connection.send: torch registers shared-memory reductions with multiprocessing's pickler,
# which would hand tensors over by file descriptor through an authenticated side channel this pool does not have.
def _send(conn: Connection, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def serve(fd: int, threads: int) -> None:
    """A worker: answer (kind, meta, tensors, client id) messages on the socket ``fd`` until the parent sends None
    or goes away."""
    from fcit import env

    conn = Connection(fd)
    env.apply()
    torch.set_num_threads(threads)
    from fcit.engines import resident

    try:
        resident.preload()
    except Exception:  # noqa: BLE001 - the first message's build raises it again, and the parent reports it
        pass
    settings = {"threads": threads}
    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            return
        if msg is None:
            return
        kind, meta, tensors, cid = msg
        try:
            _send(conn, ("ok", resident.handle(kind, meta, tensors, cid, settings)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
            _send(conn, ("error", type(exc).__name__, str(exc), traceback.format_exc()))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    busy: Optional[int] = None  # the client id it trains


@dataclass
class Pool:
    """``size`` worker processes, ``threads`` torch threads each."""

    size: int
    threads: int
    workers: list[_Worker] = field(default_factory=list)

    def start(self) -> None:
        # A fresh interpreter per worker, not multiprocessing's fork (the parent has live OpenMP threads) or spawn
        # (it re-runs the caller's main script, which a user's script need not guard); a socket pair is the channel.
        for _ in range(self.size):
            parent, child = socket.socketpair()
            code = f"from fcit.engines.pool import serve; serve({child.fileno()}, {self.threads})"
            p = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child.fileno()])
            child.close()
            self.workers.append(_Worker(p, Connection(parent.detach())))

    def alive(self) -> bool:
        return bool(self.workers) and all(w.process.poll() is None for w in self.workers)

    def close(self) -> None:
        for w in self.workers:
            try:
                _send(w.conn, None)
            except OSError:
                pass
        for w in self.workers:
            try:
                w.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.process.kill()
            w.conn.close()
        self.workers = []

    def run(self, messages: Sequence[tuple[int, tuple]], done=None) -> dict[int, Any]:
        """Run (key, message) pairs, each on the next free worker, in the given order; key -> the handler's reply."""
        queue = list(messages)
        out: dict[int, Any] = {}
        by_conn = {w.conn: w for w in self.workers}
        try:
            while queue or any(w.busy is not None for w in self.workers):
                for w in self.workers:
                    if w.busy is None and queue:
                        key, msg = queue.pop(0)
                        w.busy = key
                        try:
                            _send(w.conn, msg)
                        except OSError:
                            raise self._died(w) from None
                for conn in wait([w.conn for w in self.workers if w.busy is not None]):
                    w = by_conn[conn]
                    try:
                        reply = _recv(conn)
                    except (EOFError, OSError):
                        raise self._died(w) from None
                    key, w.busy = w.busy, None
                    if reply[0] == "error":
                        _, name, text, tb = reply
                        if name == TrainingDiverged.__name__:
                            raise TrainingDiverged(f"client {key}: {text}")
                        raise FcitError(f"client {key} failed in a worker process: {name}: {text}\n{tb}")
                    out[key] = reply[1]
                    if done is not None:
                        done()
        except BaseException:
            # The round is abandoned (an error, Ctrl-C, SIGTERM), so a busy worker's client is wasted work: kill it
            # now instead of letting close() wait up to 10 s for each to finish (a scheduler's grace period is
            # short). The pool is unusable either way; the next run starts a fresh one.
            for w in self.workers:
                if w.busy is not None:
                    w.process.kill()
            close_pool()
            raise
        return out


    @staticmethod
    def _died(w: _Worker) -> FcitError:
        return FcitError(f"a client worker process (pid {w.process.pid}) died while training client {w.busy} "
                         f"(exit code {w.process.poll()}); `fcit run --resume RUN_DIR` continues the run")


_POOL: Optional[Pool] = None


def get_pool(size: int, threads: int) -> Pool:
    """The process's pool of ``size`` workers of ``threads`` threads, started on first use and kept for later runs."""
    global _POOL
    if _POOL is not None and (_POOL.size, _POOL.threads) == (size, threads) and _POOL.alive():
        return _POOL
    close_pool()
    _POOL = Pool(size, threads)
    _POOL.start()
    return _POOL


def close_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


atexit.register(close_pool)


def worker_plan(workers: Optional[int], threads: Optional[int], device: torch.device,
                clients_per_round: int) -> tuple[int, int]:
    """(worker processes, threads each) for ``federation.workers``; (1, threads) means no pool.

    Auto (None) uses a pool on the CPU only: a GPU holds one model and runs one client at a time well.
    """
    total = threads or os.cpu_count() or 1
    if workers is None:
        workers = min(total, clients_per_round) if device.type == "cpu" else 1
    workers = max(1, min(workers, clients_per_round))
    return workers, max(1, total // workers)


@dataclass
class PoolTransport(InProcessTransport):
    """``InProcessTransport`` whose ``train`` runs the clients on the worker pool."""

    workers: int = 2
    threads: int = 1
    config_json: str = field(init=False, default="")  # every message carries the run's config

    def __post_init__(self):
        self.config_json = self.cfg.model_dump_json()
        get_pool(self.workers, self.threads)  # started now, so the workers load while the parent finishes setup

    def train(self, info: StageInfo, jobs: Sequence[TrainJob], global_state: State,
              shared: dict[str, torch.Tensor]) -> dict[int, LocalResult]:
        # Largest clients first, so that the round's last client to finish is a small one.
        sizes = {j.client.client_id: len(self.scenario.client_data(j.client.task, j.client.client_id)) for j in jobs}
        order = sorted(jobs, key=lambda j: -sizes[j.client.client_id])
        tensors = {"global": global_state, "shared": shared}
        msgs = [(j.client.client_id, ("train", request_meta(self.config_json, info, j.client.task, plan=j.plan,
                                                             seed=j.seed), tensors, j.client.client_id))
                for j in order]
        bar = tqdm(total=len(jobs), desc="clients", leave=False, disable=not self.progress)
        try:
            replies = get_pool(self.workers, self.threads).run(msgs, done=bar.update)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"stage {info.stage + 1} round {info.round + 1} {err}") from None
        finally:
            bar.close()
        return {cid: train_result(meta, tensors_out) for cid, (meta, tensors_out, _) in replies.items()}

    def stage_end(self, info: StageInfo, clients: Sequence, global_state: State,
                  shared: dict[str, torch.Tensor]) -> dict:
        # The stage end's client work (EWC's Fisher) runs here, in the parent, at a client's thread count: bf16
        # matmuls round differently at two threads than at one, and the pool must compute what one process does.
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return super().stage_end(info, clients, global_state, shared)
        finally:
            torch.set_num_threads(prev)
