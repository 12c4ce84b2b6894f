"""A whole Flower federation on one machine, for the deployment tests and ``scripts/bench_flower.py``: a SuperLink
and n ``fcit node`` processes (each a node worker + a SuperNode) on 127.0.0.1 with free ports, optionally with TLS
and SuperNode authentication, and process-tree cleanup by PID (test harness, not part of fcit)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from fcit.errors import FcitError
from fcit.launch.flower import _bin, flower_env, free_port


def make_tls(folder: Path) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, server.pem, server.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fcit-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return tuple(str(p) for p in paths)


def make_node_key(folder: Path, name: str) -> tuple[str, str]:
    """A SuperNode key pair as ``ssh-keygen -t ecdsa -b 384`` writes it: (private key, public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return str(priv), str(pub)


def _related_pids(root: int) -> list[int]:
    """``root``'s descendants, plus the SuperExec processes Flower detaches from it (they name it in --parent-pid)."""
    children: dict[int, list[int]] = {}
    adopted: dict[int, list[int]] = {}  # --parent-pid -> processes that name it
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
        if b"--parent-pid" in cmd:
            try:
                adopted.setdefault(int(cmd[cmd.index(b"--parent-pid") + 1]), []).append(int(d.name))
            except (IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo += children.get(p, []) + adopted.get(p, [])
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
    """A SuperLink and ``n`` nodes (client ids 0..n-1, each ``fcit node``) on 127.0.0.1 with free ports, for tests and
    benchmarks of the deployment engine: insecure, or TLS with ``tls=(ca.crt, server.pem, server.key)`` (a
    certificate for 127.0.0.1); with ``auth`` the SuperLink admits only SuperNodes whose public key was registered
    (``flwr supernode register``): those in ``registered`` (default: all). Every process is stopped by PID on exit,
    also after a failure."""

    def __init__(self, n: int, workdir: Path, node_threads: int = 1, tls: Optional[tuple[str, str, str]] = None,
                 auth: bool = False, registered: Optional[list[int]] = None):
        if auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS")
        self.n, self.workdir, self.node_threads, self.tls = n, Path(workdir), node_threads, tls
        self.auth, self.registered = auth, list(range(n)) if registered is None else list(registered)
        self.port = free_port()
        self.superlink: Optional[subprocess.Popen] = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self._worker_dirs_before: set[Path] = set()
        self.keys: dict[int, str] = {}
        self.env = flower_env(self.workdir / "flower-home")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.workdir / log_name, "w")
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "LocalDeployment":
        import tempfile

        self.workdir.mkdir(parents=True, exist_ok=True)
        # fcit node's worker folders that exist already belong to someone else; any new one is this federation's.
        self._worker_dirs_before = set(Path(tempfile.gettempdir()).glob("fcit-node-*"))
        try:
            security = ["--insecure"] if self.tls is None else [
                "--ssl-ca-certfile", self.tls[0], "--ssl-certfile", self.tls[1], "--ssl-keyfile", self.tls[2]]
            if self.auth:
                security.append("--enable-supernode-auth")
            self.superlink = self._spawn([_bin("flower-superlink"), *security, "--host", "127.0.0.1", "--port",
                                          str(self.port), "--database", str(self.workdir / "superlink.db")],
                                         "superlink.log")
            self._wait_port(self.port, self.superlink, "superlink.log")
            if self.auth:
                self._register_keys()
            for i in range(self.n):
                self.start_node(i)
            for i in self.registered:
                if not self.wait_node(i, 300.0):
                    raise FcitError(f"flower: node {i} did not connect; see {self.workdir / f'node-{i}.log'}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _register_keys(self) -> None:
        """Every node gets a key pair; the SuperLink learns the public keys of ``registered`` through its Control
        API, as an operator would with ``flwr supernode register KEY.pub CONNECTION``."""
        home = Path(self.env["FLWR_HOME"])
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.tls[0]}"\n')
        for i in range(self.n):
            self.keys[i], pub = make_node_key(self.workdir, f"node{i}")
            if i in self.registered:
                subprocess.run([_bin("flwr"), "supernode", "register", pub, "local"], env=self.env, check=True,
                               timeout=120, stdout=subprocess.DEVNULL)

    def start_node(self, i: int) -> None:
        security = ["--insecure"] if self.tls is None else ["--root-certificates", self.tls[0]]
        if i in self.keys:
            security += ["--auth-key", self.keys[i]]
        cmd = [sys.executable, "-m", "fcit.cli", "node", "--superlink", self.address, "--client-id", str(i),
               "--threads", str(self.node_threads), "--flower-home", str(self.workdir / f"node-{i}-home"),
               *security]
        self.nodes[i] = self._spawn(cmd, f"node-{i}.log")

    def node_log(self, i: int) -> str:
        return (self.workdir / f"node-{i}.log").read_text(errors="replace")

    def wait_node(self, i: int, timeout: float) -> bool:
        """Whether node ``i``'s SuperNode joined the SuperLink within ``timeout`` seconds (it logs its node id)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "SuperNode ID" in self.node_log(i):
                return True
            if self.nodes[i].poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def kill_node(self, i: int) -> None:
        """Stop client ``i``'s node (worker and SuperNode) abruptly (SIGKILL), as a crashed institution would."""
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
        # A SIGKILLed fcit node cannot remove its worker folder (socket + key file): the harness does.
        import shutil
        import tempfile

        for d in set(Path(tempfile.gettempdir()).glob("fcit-node-*")) - self._worker_dirs_before:
            shutil.rmtree(d, ignore_errors=True)
