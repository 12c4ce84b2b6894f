"""fcit on Flower: the simulation engine computes what the in-process engine computes, failures drop clients, and a
real SuperLink with SuperNodes on loopback runs a DISCO experiment through a node crash."""

import json
import threading
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fcit.config import load_config
from fcit.errors import FcitError
from fcit.launch import run

pytest.importorskip("flwr")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fcit-cache-flower")


def cfg_for(cache_dir, tmp_path, **over):
    # The equivalence setting of the issue: 2 stages, 3 rounds, 4 clients of which 2 per round; the embedded base.
    o = {"data.root": str(cache_dir), "out_dir": str(tmp_path), "scenario.rounds": 3, "threads": 1,
         "flower.cpus": 2}
    o.update(over)
    return load_config(preset="smoke", overrides=o)


def final_state(run_dir):
    return {k: v for k, v in load_file(str(run_dir / "checkpoint" / "state.safetensors")).items()}


def test_records_keep_names_values_and_dtypes():
    from fcit.engines.flower.records import decode, encode, payload_bytes

    state = {"a.lora_A": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "i": torch.arange(3)}
    rd = encode({"plan": {"subspace": 2}, "x": [1, 2]}, {"global": state, "empty": {}}, {"num-examples": 7})
    meta, tensors = decode(rd)
    assert meta == {"plan": {"subspace": 2}, "x": [1, 2]}
    assert tensors["empty"] == {}
    for k, v in state.items():
        assert tensors["global"][k].dtype == v.dtype and torch.equal(tensors["global"][k], v)
    assert payload_bytes(rd) >= 12 * 4 + 5 * 4 + 3 * 8


# ewc: shared client state + the stage-end exchange; lwf, olora: shared client state
@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "disco", "ewc", "lwf", "olora", "mtl-fed"])
def test_flower_simulation_equals_the_in_process_engine(cache_dir, tmp_path, method):
    _, ref = run(cfg_for(cache_dir, tmp_path, **{"method.name": method}), tmp_path / "inprocess", progress=False)
    _, sim = run(cfg_for(cache_dir, tmp_path, **{"method.name": method, "federation.engine": "flower-sim"}),
                 tmp_path / "sim", progress=False)
    assert sim.matrix == ref.matrix
    assert [r.clients for r in sim.rounds] == [r.clients for r in ref.rounds]
    assert [r.samples for r in sim.rounds] == [r.samples for r in ref.rounds]
    # One round loop: the logs agree on everything but wall time.
    assert [(r.bytes_up, r.bytes_down, r.dropped) for r in sim.rounds] == [
        (r.bytes_up, r.bytes_down, r.dropped) for r in ref.rounds]
    for a, b in zip(sim.rounds, ref.rounds):
        assert abs(a.loss - b.loss) <= 1e-6
    # The strongest check: every aggregated tensor of the final global state.
    s, r = final_state(tmp_path / "sim"), final_state(tmp_path / "inprocess")
    assert s.keys() == r.keys()
    worst = max(float((s[k].float() - r[k].float()).abs().max()) for k in r if k.startswith("global/"))
    assert worst <= 1e-6, worst
    if method == "disco":
        routing = [json.loads((tmp_path / d / "disco" / "routing.json").read_text())["routing"]
                   for d in ("sim", "inprocess")]
        assert [e["subspace"] for e in routing[0]] == [e["subspace"] for e in routing[1]]


@pytest.mark.slow
def test_clients_without_a_node_are_dropped_and_min_replies_stops_the_run(cache_dir, tmp_path):
    from fcit.launch.flower import run_simulation

    # 4 clients, 3 nodes: every round that selects client 3 goes on with the other client.
    cfg = cfg_for(cache_dir, tmp_path, **{"method.name": "disco", "scenario.rounds": 2,
                                          "federation.engine": "flower-sim"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = run_simulation(cfg, tmp_path / "partial", progress=False, num_nodes=3)
    picked = [r for r in m.rounds if 3 in r.dropped]
    assert picked, "the smoke selection should pick client 3 at least once"
    assert all(3 not in r.clients and len(r.clients) == 1 for r in picked)
    assert all(r.failures[0]["client"] == 3 and "no connected node" in r.failures[0]["why"] for r in picked)
    assert any("client 3 dropped" in str(w.message) for w in caught)
    assert len(m.matrix.rows) == 2
    # Asking for both replies makes the first such round fatal, with a message that says how to go on.
    strict = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"min_replies": 2})})
    with pytest.raises(FcitError, match="min_replies=2.*--resume"):
        run_simulation(strict, tmp_path / "strict", progress=False, num_nodes=3)


@pytest.mark.slow
def test_deployment_superlink_and_three_supernodes_survive_a_node_crash(cache_dir, tmp_path):
    from local_deployment import LocalDeployment

    out = tmp_path / "run"
    crash: dict = {}
    with LocalDeployment(3, tmp_path / "federation") as fed:
        pids = [fed.superlink.pid] + [p.pid for p in fed.nodes.values()]
        cfg = cfg_for(cache_dir, tmp_path, **{
            "method.name": "disco", "scenario.num_clients": 3, "scenario.rounds": 1,  # a deployment round is ~15 s
            "federation.engine": "flower", "flower.superlink": fed.address, "flower.insecure": True,
            "federation.round_timeout": 60})

        def kill_after_stage_one():
            deadline = time.monotonic() + 600
            while not (out / "checkpoint" / "progress.json").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            crash["at"] = time.monotonic()
            fed.kill_node(2)

        threading.Thread(target=kill_after_stage_one, daemon=True).start()
        _, m = run(cfg, out, progress=False)
        assert "at" in crash, "the node was never killed"
    assert len(m.matrix.rows) == 2
    stage2 = [r for r in m.rounds if r.stage == 1]
    assert all(2 not in r.clients for r in stage2)
    assert any(2 in r.dropped for r in stage2), "seed 0 selects client 2 in stage 2: it must show as dropped"
    routing = json.loads((out / "disco" / "routing.json").read_text())
    assert sum(routing["used"]) >= 1
    # Every daemon is gone once the federation is closed.
    time.sleep(0.5)
    for pid in pids:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        assert state == "Z", f"process {pid} still running"


@pytest.mark.slow
def test_deployment_over_tls_admits_only_registered_nodes_and_loads_the_model_once_per_node(cache_dir, tmp_path):
    from local_deployment import LocalDeployment, make_tls

    tls = make_tls(tmp_path / "tls")
    # Client 2's key is never registered: the SuperLink refuses its SuperNode, so rounds that pick it go on without.
    with LocalDeployment(3, tmp_path / "federation", tls=tls, auth=True, registered=[0, 1]) as fed:
        assert not fed.wait_node(2, 20.0), "an unregistered SuperNode joined"
        assert "Failed to activate SuperNode" in fed.node_log(2)
        cfg = cfg_for(cache_dir, tmp_path, **{
            "method.name": "disco", "scenario.num_clients": 3, "scenario.rounds": 2,
            "federation.engine": "flower", "flower.superlink": fed.address, "flower.root_certificates": tls[0],
            "federation.round_timeout": 120})
        _, m = run(cfg, tmp_path / "run", progress=False)
        logs = {i: fed.node_log(i) for i in (0, 1)}
    assert len(m.matrix.rows) == 2
    assert all(2 not in r.clients for r in m.rounds)
    picked = [r for r in m.rounds if 2 in r.dropped]
    assert picked and all("no connected node" in r.failures[0]["why"] for r in picked)
    assert any(r.clients for r in m.rounds)
    served = {i: log.count("fcit worker: ") - 1 - log.count("loaded the model") for i, log in logs.items()}
    # One model per node for the whole run, however many messages it served (identity, train, in two stages).
    for i, log in logs.items():
        assert log.count("loaded the model") == (1 if served[i] else 0), log[-2000:]
    assert max(served.values()) >= 3, served


def test_node_command_and_flower_config_validation(tmp_path):
    from fcit.launch.flower import node_command, write_app, write_connection

    cmd = node_command("link.example.org:9093", 7, data_root=str(tmp_path), root_certificates="ca.crt",
                       auth_key="node7", port=9100)
    i = cmd.index("--node-config")
    assert cmd[i + 1] == f'partition-id=7 data-root="{tmp_path}"'
    assert cmd[cmd.index("--superlink") + 1] == "link.example.org:9093" and "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1].endswith("/ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1].endswith("/node7")
    with pytest.raises(FcitError, match="exactly one"):
        node_command("h:1", 0)  # neither TLS nor an explicit --insecure
    # The node's device and its worker travel in the node config; the node's device wins over the run's.
    cmd = node_command("h:1", 1, insecure=True, device="cuda:1", worker=("/tmp/w.sock", "/tmp/w.key"))
    assert cmd[cmd.index("--node-config") + 1] == 'partition-id=1 device="cuda:1" worker="/tmp/w.sock" ' \
                                                  'worker-key="/tmp/w.key"'
    with pytest.raises(FcitError, match="--device 'gpu1'"):
        node_command("h:1", 1, insecure=True, device="gpu1")
    from fcit.engines.resident import node_config

    raw = json.loads(load_config(preset="smoke", overrides={"device": "cpu"}).model_dump_json())
    assert node_config(raw, {"device": "cuda:1", "data-root": "/d"})["device"] == "cuda:1"
    assert node_config(raw, {})["device"] == "cpu" and raw["device"] == "cpu"
    with pytest.raises(FcitError, match="insecure"):
        run(load_config(preset="smoke", overrides={"federation.engine": "flower", "flower.superlink": "h:1"}),
            tmp_path / "r", progress=False)
    with pytest.raises(FcitError, match="at most one of insecure and root_certificates"):
        load_config(preset="smoke", overrides={"flower.insecure": True, "flower.root_certificates": "ca.crt"})
    # The app a deployment submits carries the whole config; the connection names the SuperLink.
    cfg = load_config(preset="smoke", overrides={"flower.superlink": "h:1", "flower.insecure": True, "seed": 3})
    app = write_app(cfg, tmp_path / "run", resume=False)
    try:
        import tomllib
    except ImportError:  # Python 3.10: flwr depends on tomli
        import tomli as tomllib

    conf = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert json.loads(conf["config"]["fcit-config"])["seed"] == 3
    assert conf["components"]["clientapp"] == "fcit.engines.flower.client_app:app"
    write_connection(tmp_path, cfg)
    conn = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert conn["default"] == "fcit" and conn["fcit"] == {"address": "h:1", "insecure": True}
