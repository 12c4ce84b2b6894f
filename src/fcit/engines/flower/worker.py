"""A node worker: the process beside a deployed SuperNode that keeps the node's model between messages.

Flower 1.41 runs every message in a new ClientApp process; loading a 7B checkpoint per message would dominate the
round. ``fcit node`` starts this worker first; each ClientApp process hands its decoded message to it over a Unix
socket (``multiprocessing.connection`` with an auth key read from a 0600 file) and returns its reply. The worker
handles one message at a time, as the SuperNode delivers them, and exits when its parent (``fcit node``) is gone.

    python -m fcit.engines.flower.worker --socket PATH --key-file PATH [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from fcit.engines.flower.records import Arrays, Dtypes

# A whole local update runs inside one request: bounded by the round timeout on the server, not here.
CONNECT_TIMEOUT = 60.0


def _watch_parent(pid: int) -> None:
    while True:
        if os.getppid() != pid:
            os._exit(0)  # an orphan worker would hold the model's memory for nobody
        time.sleep(1.0)


def serve(socket_path: str, key: bytes, parent_pid: int | None = None) -> None:
    from fcit.engines import resident as node
    from fcit.engines.flower.records import from_arrays, to_arrays

    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    with Listener(socket_path, family="AF_UNIX", authkey=key) as listener:
        print(f"fcit worker: listening on {socket_path} (pid {os.getpid()})", flush=True)
        while True:
            try:
                conn = listener.accept()
            except Exception as exc:  # noqa: BLE001 - a client with a wrong key must not stop the node
                print(f"fcit worker: refused a connection: {exc!r}", flush=True)
                continue
            with conn:
                try:
                    kind, meta, arrays, dtypes, cid, settings = conn.recv()
                    t0 = time.perf_counter()
                    loads = node.RESIDENT.loads
                    out, tensors, metrics = node.handle(kind, meta, from_arrays(arrays, dtypes), cid, settings)
                    if node.RESIDENT.loads != loads:
                        print(f"fcit worker: loaded the model (load {node.RESIDENT.loads} of this worker)",
                              flush=True)
                    reply = ("ok", out, *to_arrays(tensors), metrics)
                    print(f"fcit worker: {kind} stage {meta['stage'] + 1} round {meta['round'] + 1} client {cid} "
                          f"in {time.perf_counter() - t0:.2f} s (message {node.RESIDENT.messages}, "
                          f"loads {node.RESIDENT.loads})", flush=True)
                except Exception as exc:  # noqa: BLE001 - the ClientApp re-raises it, Flower reports it
                    reply = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
                    print(f"fcit worker: {kind} failed: {reply[1]}", flush=True)
                try:
                    conn.send(reply)
                except OSError as exc:
                    print(f"fcit worker: the ClientApp went away before the reply: {exc!r}", flush=True)


def call(socket_path: str, key_file: str, kind: str, meta: dict, arrays: Arrays, dtypes: Dtypes, cid: int,
         settings: dict[str, Any]) -> tuple[dict, Arrays, Dtypes, Any]:
    """One message through the node's worker (the ClientApp's side); raises what the worker raised."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    key = Path(key_file).read_bytes()
    while True:
        try:
            conn = Client(socket_path, family="AF_UNIX", authkey=key)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"fcit node: no worker listens on {socket_path}; is `fcit node` running?")
            time.sleep(0.2)
    with conn:
        conn.send((kind, meta, arrays, dtypes, cid, settings))
        reply = conn.recv()
    if reply[0] == "error":
        # The summary last: the server reads the last line of the reason (e.g. to tell TrainingDiverged apart).
        raise RuntimeError(f"in the node worker:\n{reply[2]}\n{reply[1]}")
    _, out, arrays_out, dtypes_out, metrics = reply
    return out, arrays_out, dtypes_out, metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fcit node worker (started by fcit node)")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--parent-pid", type=int)
    args = ap.parse_args(argv)
    from fcit import env

    env.apply()
    import torch  # noqa: F401 - imported before the first message, not during it

    serve(args.socket, Path(args.key_file).read_bytes(), args.parent_pid)


if __name__ == "__main__":
    main()
