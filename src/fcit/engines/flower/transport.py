"""The round loop's messages over a Flower Grid: every client is a Flower node addressed by its client id.

* ``query.hello``: a node reports its client id (its ``partition-id``); asked of every node not met yet, so a
  SuperNode may join or re-join at any time.
* ``query.identity``, ``train``, ``query.stage_end``: one message per client, carrying the run's config, where the
  run is, and the tensors (global state, what the method shares with clients); replies carry only the identity,
  the trainable tensors or the stage-end payload.

A client that errors, misses ``federation.round_timeout`` or has no connected node is left out of the reply with a
warning, and the reason is kept for the round log.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from typing import Any, Optional, Sequence

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fcit.config import Config
from fcit.data.scenario import Assignment
from fcit.engines.flower.records import decode, encode
from fcit.engines.loop import TrainJob
from fcit.engines.resident import request_meta, train_result
from fcit.methods.base import StageInfo
from fcit.models.lora import State
from fcit.training.guard import TrainingDiverged
from fcit.training.local import LocalResult

HELLO_TIMEOUT = 120.0  # seconds a new node gets to say who it is
# Grid.send_and_receive waits 3 s between pulls (Flower 1.41, fixed); a pull is one request to the SuperLink, so the
# server asks far more often and a round does not wait for replies that are already there.
PULL_INTERVAL = 0.05


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Flower's ``Grid.send_and_receive`` with a short pull interval."""
    ids = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    out: list[Message] = []
    while ids and time.monotonic() < end:
        got = list(grid.pull_messages(ids))
        out += got
        ids -= {m.metadata.reply_to_message_id for m in got}
        if ids:
            time.sleep(PULL_INTERVAL)
    return out


class FlowerTransport:
    def __init__(self, grid: Grid, cfg: Config, client_threads: Optional[int] = None):
        self.grid, self.cfg = grid, cfg
        self.client_threads = client_threads
        self.config_json = cfg.model_dump_json()
        # Identifies the run to the nodes: a node serving a new run rebuilds its model and data.
        self.run_key = hashlib.sha256(self.config_json.encode()).hexdigest()[:16]
        self.nodes: dict[int, int] = {}  # client id -> node id
        self._no_id: set[int] = set()  # nodes that answered hello with an error (no partition-id): not asked again
        self._failures: list[dict] = []

    # -- the loop's transport --------------------------------------------------------------------------------------
    def identities(self, info: StageInfo, clients: Sequence[Assignment]) -> dict[int, dict]:
        reqs = {c.client_id: encode(self._meta(info, c.task)) for c in clients}
        out = {}
        for cid, rep in self._exchange("query.identity", reqs, f"{self._where(info)} (identity)").items():
            meta, tensors = decode(rep.content)
            out[cid] = {**meta["identity"], **tensors["identity"]}
        return out

    def train(self, info: StageInfo, jobs: Sequence[TrainJob], global_state: State,
              shared: dict[str, torch.Tensor]) -> dict[int, LocalResult]:
        reqs = {j.client.client_id: encode(self._meta(info, j.client.task, plan=j.plan, seed=j.seed),
                                           {"global": global_state, "shared": shared}) for j in jobs}
        out = {}
        for cid, rep in self._exchange("train", reqs, f"{self._where(info)} (train)").items():
            meta, tensors = decode(rep.content)
            out[cid] = train_result(meta, tensors)
        return out

    def stage_end(self, info: StageInfo, clients: Sequence[Assignment], global_state: State,
                  shared: dict[str, torch.Tensor]) -> dict[int, tuple[Optional[State], int]]:
        reqs = {c.client_id: encode(self._meta(info, c.task), {"global": global_state, "shared": shared})
                for c in clients}
        out = {}
        for cid, rep in self._exchange("query.stage_end", reqs, f"stage {info.stage + 1} (stage end)").items():
            meta, tensors = decode(rep.content)
            out[cid] = (tensors["payload"] if meta["has_payload"] else None, int(meta["num_samples"]))
        return out

    def take_failures(self) -> list[dict]:
        out, self._failures = self._failures, []
        return out

    # -- messages ------------------------------------------------------------------------------------------------
    @staticmethod
    def _where(info: StageInfo) -> str:
        return f"stage {info.stage + 1} round {info.round + 1}"

    def _meta(self, info: StageInfo, task: int, **extra) -> dict[str, Any]:
        return request_meta(self.config_json, info, task, run_key=self.run_key, client_threads=self.client_threads,
                            **extra)

    def _discover(self) -> None:
        """Ask nodes we have not met yet for their client id."""
        known = set(self.nodes.values()) | self._no_id
        new = [n for n in self.grid.get_node_ids() if n not in known]
        if not new:
            return
        msgs = [Message(encode({}), dst_node_id=n, message_type="query.hello") for n in new]
        for rep in send_and_receive(self.grid, msgs, min(HELLO_TIMEOUT, self.cfg.federation.round_timeout)):
            if rep.has_error():
                self._no_id.add(rep.metadata.src_node_id)
                warnings.warn(f"Flower: node {rep.metadata.src_node_id} has no client id: {rep.error.reason}",
                              RuntimeWarning, stacklevel=2)
                continue
            meta, _ = decode(rep.content)
            self.nodes[int(meta["client_id"])] = rep.metadata.src_node_id

    def _exchange(self, kind: str, requests: dict[int, Any], what: str) -> dict[int, Any]:
        """Send one message per client id, wait for the replies; returns client id -> reply (failures dropped)."""
        msgs, by_node = [], {}
        online = set(self.grid.get_node_ids())
        if any(self.nodes.get(c) not in online for c in requests):
            # A client never seen, or whose node went away: it may have (re)joined under a new node id.
            self._discover()
            online = set(self.grid.get_node_ids())
        for c, content in requests.items():
            node = self.nodes.get(c)
            if node is None or node not in online:
                self._fail(c, what, "no connected node has this client id" if node is None else "its node is offline")
                continue
            by_node[node] = c
            msgs.append(Message(content, dst_node_id=node, message_type=kind))
        replies: dict[int, Any] = {}
        errored: set[int] = set()
        timeout = self.cfg.federation.round_timeout
        for rep in send_and_receive(self.grid, msgs, timeout) if msgs else []:
            c = by_node.get(rep.metadata.src_node_id)
            if c is None:
                continue
            if rep.has_error():
                if TrainingDiverged.__name__ in rep.error.reason:
                    # The client's training diverged: not a lost node but a run to stop, as in-process.
                    raise TrainingDiverged(f"{what} client {c}: {rep.error.reason.strip().splitlines()[-1]}")
                errored.add(c)
                self._fail(c, what, f"error {rep.error.code}: {rep.error.reason}")
                continue
            replies[c] = rep
        for c in by_node.values():
            if c not in replies and c not in errored:
                self._fail(c, what, f"no reply within {timeout:g} s")
        return replies

    def _fail(self, client: int, what: str, why: str) -> None:
        self._failures.append({"client": client, "what": what, "why": why})
        warnings.warn(f"Flower: client {client} dropped from {what}: {why}", RuntimeWarning, stacklevel=3)
