"""The in-process engine's worker pool: the same results as one process, bit for bit; its failures are one line."""

import pytest
import torch
from safetensors.torch import load_file

from fcit.config import load_config
from fcit.engines.pool import Pool, worker_plan
from fcit.errors import FcitError
from fcit.launch import run
from fcit.training.guard import TrainingDiverged


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fcit-cache-pool")


def cfg_for(cache_dir, tmp_path, **over):
    o = {"data.root": str(cache_dir), "out_dir": str(tmp_path), "scenario.rounds": 3}
    o.update(over)
    return load_config(preset="smoke", overrides=o)


def test_worker_plan():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert worker_plan(None, 2, cpu, 5) == (2, 1)
    assert worker_plan(None, 8, cpu, 5) == (5, 1)  # never more workers than clients in a round
    assert worker_plan(None, 8, cpu, 2) == (2, 4)
    assert worker_plan(None, 8, gpu, 5) == (1, 8)  # one model per GPU
    assert worker_plan(1, 2, cpu, 5) == (1, 2)
    assert worker_plan(3, 2, cpu, 5) == (3, 1)


# finetune: plain; disco: plans per client and identities; ewc: shared client state and the stage-end exchange.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "disco", "ewc"])
def test_pool_equals_one_process(cache_dir, tmp_path, method):
    one = cfg_for(cache_dir, tmp_path, **{"method.name": method, "threads": 1, "federation.workers": 1})
    two = cfg_for(cache_dir, tmp_path, **{"method.name": method, "threads": 2, "federation.workers": 2})
    _, ref = run(one, tmp_path / "one", progress=False)
    _, got = run(two, tmp_path / "pool", progress=False)
    assert got.matrix == ref.matrix
    assert [(r.clients, r.samples, r.loss, r.bytes_up) for r in got.rounds] == [
        (r.clients, r.samples, r.loss, r.bytes_up) for r in ref.rounds]
    a = load_file(str(tmp_path / "pool" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "one" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_diverging_client_in_a_worker_names_where(cache_dir, tmp_path):
    cfg = cfg_for(cache_dir, tmp_path, **{"train.lr": 1e30, "threads": 2, "federation.workers": 2})
    with pytest.raises(TrainingDiverged, match=r"stage 1 round 1 client \d+: loss is"):
        run(cfg, tmp_path / "nan", progress=False)


def test_a_dead_worker_is_a_one_line_error(cache_dir, tmp_path):
    cfg = cfg_for(cache_dir, tmp_path)
    pool = Pool(1, 1)
    pool.start()
    try:
        pool.workers[0].process.kill()
        pool.workers[0].process.wait()
        msg = ("train", {"config": cfg.model_dump_json()}, {}, 0)
        with pytest.raises(FcitError, match="worker process .* died while training client 0"):
            pool.run([(0, msg)])
    finally:
        pool.close()


def test_an_abandoned_round_kills_its_busy_workers_at_once(cache_dir, tmp_path):
    # A round that fails (or is interrupted) discards its other clients' work: their workers must not be waited
    # for. Worker 0 is busy for minutes (it generates a huge benchmark); worker 1 fails at once on a bad message.
    import time

    endless = cfg_for(tmp_path / "fresh-cache", tmp_path, **{"data.synth.n_train": 200000})
    busy = ("train", {"config": endless.model_dump_json()}, {}, 0)
    broken = ("train", {}, {}, 1)  # no config: a KeyError in the worker
    pool = Pool(2, 1)
    pool.start()
    try:
        with pytest.raises(FcitError, match="client 1 failed in a worker process: KeyError"):
            pool.run([(0, busy), (1, broken)])
        deadline = time.monotonic() + 5
        while pool.workers[0].process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.workers[0].process.poll() is not None, "the busy worker was left running"
    finally:
        pool.close()
