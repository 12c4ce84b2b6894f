"""The ClientApp: one institution (a SuperNode, or a virtual node of the simulation) runs the project's client code.

Its client id is the node's ``partition-id`` (set by ``fcit node --client-id`` or by the simulation). Messages:

* ``query.hello``: report the client id, so the server can address clients by id.
* ``query.identity``: the method's ``client_identity`` on this client's data of the stage (DISCO's identity token).
* ``train``: load what the server sent (global state, what the method shares with clients, the plan) and run
  ``fcit.engines.client.client_update``, the in-process engine's client step; reply with the trainable tensors.
* ``query.stage_end``: ``client_after_stage`` on the final global model of the stage (EWC's Fisher).

Where the work happens (``fcit.engines.resident``): a deployed SuperNode started by ``fcit node`` has a node
worker (its node config names ``worker`` and ``worker-key``) that keeps the model between messages, since Flower
1.41 starts a new ClientApp process per message; this module then imports neither torch nor the model code and
only forwards the message. Without a worker (the simulation's Ray actors, tests) the work runs in this process, on
objects kept for the process's lifetime.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fcit.engines.flower.records import decode_arrays, encode, encode_arrays

app = ClientApp()


def node_settings(context: Context) -> dict[str, Any]:
    """What the institution decides for itself: its data, its device, the threads it gives a client."""
    nc = context.node_config
    out: dict[str, Any] = {}
    for key in ("data-root", "partitions", "device"):
        if nc.get(key):
            out[key] = str(nc[key])
    if nc.get("threads"):
        out["threads"] = int(nc["threads"])
    return out


def client_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise RuntimeError("this SuperNode has no partition-id in its node config; start it with fcit node --client-id")
    return int(context.node_config["partition-id"])


def _serve(kind: str, msg: Message, context: Context) -> Message:
    cid = client_id(context)
    meta, arrays, dtypes = decode_arrays(msg.content)
    nc = context.node_config
    if nc.get("worker"):
        from fcit.engines.flower.worker import call

        out, arrays_out, dtypes_out, metrics = call(str(nc["worker"]), str(nc["worker-key"]), kind, meta, arrays,
                                                    dtypes, cid, node_settings(context))
        return Message(encode_arrays(out, arrays_out, dtypes_out, metrics), reply_to=msg)
    from fcit.engines.resident import handle
    from fcit.engines.flower.records import from_arrays

    out, tensors, metrics = handle(kind, meta, from_arrays(arrays, dtypes), cid, node_settings(context))
    return Message(encode(out, tensors, metrics), reply_to=msg)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return Message(encode_arrays({"client_id": client_id(context)}), reply_to=msg)


@app.query("identity")
def identity(msg: Message, context: Context) -> Message:
    return _serve("identity", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _serve("train", msg, context)


@app.query("stage_end")
def stage_end(msg: Message, context: Context) -> Message:
    return _serve("stage_end", msg, context)
