"""A whole Flower federation on one machine, for the deployment tests and ``scripts/bench_flower.py``: a SuperLink
and n SuperNodes on 127.0.0.1 with free ports, and process-tree cleanup by PID (test harness, not part of fcit)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Optional

from fcit.errors import FcitError
from fcit.launch.flower import _bin, flower_env, free_port, node_command


def _related_pids(root: int) -> list[int]:
    """``root``'s descendants, plus the SuperExec processes Flower detaches from it (they name it in --parent-pid)."""
    children: dict[int, list[int]] = {}
    adopted: list[int] = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
        if b"--parent-pid" in cmd and cmd[cmd.index(b"--parent-pid") + 1:][:1] == [str(root).encode()]:
            adopted.append(int(d.name))
    out, todo = [], [root, *adopted]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo += children.get(p, [])
    return out


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid`` and everything it started, then SIGKILL whatever is still alive after ``timeout``."""
    import signal
    import time

    pids = _related_pids(pid) if Path(f"/proc/{pid}").exists() else [pid]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for p in pids:
        while time.monotonic() < deadline:
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(p):
                break
            time.sleep(0.1)
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class LocalDeployment:
    """A SuperLink and ``n`` SuperNodes (client ids 0..n-1) on 127.0.0.1 with free ports, for tests and benchmarks of
    the deployment engine: insecure, or TLS with ``tls=(ca.crt, server.pem, server.key)`` (a certificate for
    127.0.0.1). Every process is stopped by PID on exit, also after a failure."""

    def __init__(self, n: int, workdir: Path, node_threads: int = 1, tls: Optional[tuple[str, str, str]] = None):
        self.n, self.workdir, self.node_threads, self.tls = n, Path(workdir), node_threads, tls
        self.port = free_port()
        self.superlink: Optional[subprocess.Popen] = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self.env = flower_env(self.workdir / "flower-home")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.workdir / log_name, "w")
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "LocalDeployment":
        import time

        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            security = ["--insecure"] if self.tls is None else [
                "--ssl-ca-certfile", self.tls[0], "--ssl-certfile", self.tls[1], "--ssl-keyfile", self.tls[2]]
            self.superlink = self._spawn([_bin("flower-superlink"), *security, "--host", "127.0.0.1", "--port",
                                          str(self.port), "--database", str(self.workdir / "superlink.db")],
                                         "superlink.log")
            self._wait_port(self.port, self.superlink, "superlink.log")
            for i in range(self.n):
                self.start_node(i)
            # Nodes register within a second or two; the ServerApp discovers them when it starts.
            time.sleep(2.0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start_node(self, i: int) -> None:
        cmd = node_command(self.address, i, insecure=self.tls is None,
                           root_certificates=self.tls[0] if self.tls else None, threads=self.node_threads)
        self.nodes[i] = self._spawn(cmd, f"supernode-{i}.log")

    def kill_node(self, i: int) -> None:
        """Stop client ``i``'s SuperNode abruptly (SIGKILL), as a crashed institution would."""
        import signal

        p = self.nodes.pop(i)
        for q in _related_pids(p.pid):
            try:
                os.kill(q, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=10)

    def _wait_port(self, port: int, proc: subprocess.Popen, log: str, timeout: float = 60.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FcitError(f"flower: {log.split('.')[0]} exited at start; see {self.workdir / log}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FcitError(f"flower: nothing listens on port {port} after {timeout:g} s; see {self.workdir / log}")

    def __exit__(self, *exc) -> None:
        for p in list(self.nodes.values()):
            stop_process(p.pid)
        self.nodes.clear()
        if self.superlink is not None:
            stop_process(self.superlink.pid)
            self.superlink = None
