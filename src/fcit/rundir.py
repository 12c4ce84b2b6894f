"""The run directory as a record that is never lost and never false.

* JSON goes through ``fcit.jsonio`` (atomic, durable, strict: no NaN or Infinity is ever written).
* ``open_run``: a run holds an exclusive ``flock`` on ``.lock`` while it works (the kernel drops it when the process
  dies, so a crash never leaves a stale lock), refuses a directory that already holds another run, and records its
  ``status`` (running / failed with the reason / finished) in ``status.json``.
* Checkpoints: ``checkpoint/state.safetensors`` + ``checkpoint/progress.json``, tied to the config by
  ``checkpoint/manifest.json`` (config hash, size and sha256 of both files, next stage). New files are written as
  ``*.tmp`` and made durable, then the manifest is replaced atomically, then the files are renamed into place. A crash
  before the manifest leaves the previous consistent pair; a crash after it leaves ``*.tmp`` files that match the new
  manifest, which ``load_checkpoint`` renames into place (roll forward). ``--resume`` verifies all of it and refuses a
  mismatch with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from fcit.errors import FcitError
from fcit.jsonio import dumps, fsync_dir, read_json, write_durable, write_json

if TYPE_CHECKING:
    import torch

    from fcit.config import Config
    from fcit.results import RunResult

CHECKPOINT = "checkpoint"
STATE_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "manifest.json"
STATUS_FILE = "status.json"
LOCK_FILE = ".lock"
MANIFEST_VERSION = 1

# What a resumed run may change without invalidating its checkpoint: where clients run (a deployment that lost its
# nodes finishes in-process) and how many stages to run (a 1-stage run extended to 2 repeats stage 1 exactly).
RESUMABLE_CHANGES = {"federation": ("engine",), "flower": None, "scenario": ("stages",)}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit) during a command: it stops like Ctrl-C, so that a run
    records how it ended and says what to resume instead of dying with ``running`` in its status."""

    signal = "SIGTERM"


def raise_terminated(signum, frame):
    """The SIGTERM handler of every fcit process that runs a run (the CLI, ``fcit matrix --jobs`` children)."""
    raise Terminated


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run, carrying the run directory so the message can say what to resume."""

    def __init__(self, run_dir: Path, signal: str = "SIGINT"):
        super().__init__(str(run_dir))
        self.run_dir = Path(run_dir)
        self.signal = signal


# -- config identity ---------------------------------------------------------------------------------------------------
# The embedded base every fcit shipped before it shipped the replay base (2026-12-07): the one a config.json written
# before model.embedded_base existed ran on.
TWO_PHASE_BASE = "9c46ff0a3632aa4c6307788d99657bccd2966acd99f7b73499e6c3b39c13dd9e"
# Settings whose default changed after runs were made with it (2026-12-07: FCIT-Synth v5, the projector frozen, the
# replay base). The identity spells them against the old default, so a run made before keeps its identity and
# checkpoint manifest, and a run on the new defaults differs from it as its computation does.
_IDENTITY_DEFAULTS = {("data", "synth", "version"): 4, ("model", "train_projector"): True,
                      ("model", "embedded_base"): TWO_PHASE_BASE}


def _against_old_defaults(cfg: "Config", d: dict) -> dict:
    for path, old in _IDENTITY_DEFAULTS.items():
        value = cfg
        for key in path:
            value = getattr(value, key)
        sections = [d]
        for key in path[:-1]:
            sections.append(sections[-1].setdefault(key, {}))
        if value == old or value is None:  # None: no embedded base (a model.path run)
            sections[-1].pop(path[-1], None)
        else:
            sections[-1][path[-1]] = value
        for parent, key in zip(reversed(sections[:-1]), reversed(path[:-1])):  # drop sections left empty
            if parent.get(key) == {}:
                del parent[key]
    return d


def canonical(cfg: "Config") -> dict:
    """What a run computes from: the config without where and how fast it ran (threads, the client worker pool),
    and without the settings left at their defaults, with the method's parameters resolved (so ``lambda: 1000``
    given explicitly equals the default 1000). Leaving defaults out keeps a run resumable and reusable when a later
    fcit adds a setting whose default computes what the run computed."""
    from fcit.config import resolve_auto
    from fcit.methods import REGISTRY

    if cfg.model.compute_dtype == "auto" or (cfg.model.path is None and cfg.model.embedded_base is None):
        cfg = resolve_auto(cfg.model_copy(deep=True))  # a Config built without load_config: as it will run here
    d = cfg.model_dump(mode="json", exclude={"out_dir": True, "run_name": True, "threads": True,
                                             "federation": {"workers"},
                                             "train": {"compile"}}, exclude_defaults=True)
    if d.get("model", {}).get("compute_dtype", "") in (None, "float32"):
        # The base's own dtype is what every run computed before compute_dtype had the auto default: left out, so
        # their identities (and checkpoint manifests) still match.
        del d["model"]["compute_dtype"]
    d = _against_old_defaults(cfg, d)
    d = {k: v for k, v in d.items() if v != {}}  # a section whose only non-default key was excluded
    method = REGISTRY.get(cfg.method.name)
    if method is not None:
        d.setdefault("method", {})["name"] = cfg.method.name
        d["method"]["params"] = method.Params.model_validate(cfg.method.params).model_dump(mode="json",
                                                                                          exclude_defaults=True)
    return d


def _resume_identity(cfg: "Config") -> dict:
    d = canonical(cfg)
    for section, keys in RESUMABLE_CHANGES.items():
        if keys is None:
            d.pop(section, None)
        else:
            for k in keys:
                d.get(section, {}).pop(k, None)
    return d


def config_hash(cfg: "Config") -> str:
    return hashlib.sha256(dumps(_resume_identity(cfg), indent=None).encode()).hexdigest()


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) or isinstance(b, dict):  # a section left out on one side (every key at its default)
        a, b = (a if a is not None else {}), (b if b is not None else {})
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path or 'config'} ({a!r} vs {b!r})"


def read_config(run_dir: Path) -> "Config":
    """The run's own config.json, validated; one line if it is missing, truncated or invalid."""
    from pydantic import ValidationError

    from fcit.config import Config, one_line

    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise FcitError(f"--resume: {run_dir}: no such run directory")
    raw = read_json(path, "the run's config")
    if isinstance(raw, dict) and isinstance(raw.get("eval"), dict) and "scoring" not in raw["eval"]:
        # Written before eval.scoring existed, so scored with the lenient parses: said so, a comparison will not
        # reuse its numbers as reference-scored ones.
        raw["eval"]["scoring"] = "lenient"
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "compute_dtype" not in raw["model"]:
        # Written before model.compute_dtype existed: the run computed in its base's dtype.
        raw["model"]["compute_dtype"] = None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and raw["model"].get("path") is None \
            and "embedded_base" not in raw["model"]:
        # Written before model.embedded_base existed: on the two-phase base. (The runs made in the few hours when
        # fcit shipped the replay base without recording it, results/embedded-2026-12-07/defaults, hold the key.)
        raw["model"]["embedded_base"] = TWO_PHASE_BASE
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise FcitError(f"{path}: {one_line(err)}") from None


# -- status and lock ---------------------------------------------------------------------------------------------------
def read_status(run_dir: Path) -> dict:
    p = Path(run_dir) / STATUS_FILE
    try:
        st = json.loads(p.read_text())
        return st if isinstance(st, dict) else {}
    except (OSError, ValueError):
        return {}


def write_status(run_dir: Path, status: str, reason: Optional[str] = None) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    prev = read_status(run_dir)
    write_json(Path(run_dir) / STATUS_FILE, {"status": status, "reason": reason, "pid": os.getpid(),
                                             "started": prev.get("started", now) if status != "running" else now,
                                             "updated": now})


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    import fcntl

    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FcitError(f"{run_dir}: cannot write the run directory: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FcitError(f"run directory {run_dir} is in use by another fcit process (pid {holder}); "
                            f"wait for it or pick another --out or --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _refuse_existing(run_dir: Path) -> None:
    if (run_dir / "metrics.json").exists():
        raise FcitError(f"run directory {run_dir} already holds a finished run; pick another --out or --name")
    # status.json alone is an attempt stopped before it wrote its config (while loading the model or the data):
    # there is nothing to resume or lose, and --resume could not read it, so a fresh run takes the directory.
    if any((run_dir / n).exists() for n in ("config.json", CHECKPOINT)):
        st = read_status(run_dir)
        what = st.get("status", "unknown status") + (f": {st['reason']}" if st.get("reason") else "")
        raise FcitError(f"run directory {run_dir} already holds a run ({what}); continue it with "
                        f"`fcit run --resume {run_dir}` or pick another --out or --name")


def _reason(err: BaseException) -> str:
    """One line for status.json: an FcitError is already worded for the user; anything else keeps its type."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(err, FcitError):
        return first or type(err).__name__
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


@contextmanager
def open_run(run_dir: Path, cfg: "Config", resume: bool) -> Iterator[None]:
    """Hold the run directory for one run: lock it, refuse another run's directory (or, with ``resume``, verify the
    checkpoint against ``cfg``), and record how the run ended in ``status.json``."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FcitError(f"{run_dir}: cannot create the run directory: {e.strerror or e}") from None
    with locked(run_dir):
        if resume:
            verify_resume(run_dir, cfg)
        else:
            _refuse_existing(run_dir)
        write_status(run_dir, "running")
        try:
            yield
        except KeyboardInterrupt as err:
            sig = getattr(err, "signal", "SIGINT")
            _best_effort_status(run_dir, f"interrupted ({sig})")
            raise RunInterrupted(run_dir, sig) from None
        except BaseException as err:
            _best_effort_status(run_dir, _reason(err))
            raise
        write_status(run_dir, "finished")


def _best_effort_status(run_dir: Path, reason: str) -> None:
    # The original error is what the user must see; a status that cannot be written (full disk) must not mask it.
    try:
        write_status(run_dir, "failed", reason)
    except (FcitError, OSError):
        pass


# -- checkpoints -------------------------------------------------------------------------------------------------------
def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def save_checkpoint(run_dir: Path, cfg: "Config", state: dict, method_state: dict, progress: dict) -> None:
    """The global and method state after a finished stage, with its progress record (see the module docstring)."""
    from safetensors.torch import save_file

    ck = Path(run_dir) / CHECKPOINT
    tensors = {f"global/{k}": v.contiguous() for k, v in state.items()}
    tensors.update({f"method/{k}": v.contiguous() for k, v in method_state.items()})
    text = dumps(progress, where=str(ck / PROGRESS_FILE))
    try:
        ck.mkdir(parents=True, exist_ok=True)
        st_tmp, pr_tmp = ck / (STATE_FILE + ".tmp"), ck / (PROGRESS_FILE + ".tmp")
        save_file(tensors, str(st_tmp))
        with open(st_tmp, "rb+") as f:
            os.fsync(f.fileno())
        write_durable(pr_tmp, text.encode())
        manifest = {"version": MANIFEST_VERSION, "config_hash": config_hash(cfg), "next_stage": progress["next_stage"],
                    "files": {STATE_FILE: _digest(st_tmp), PROGRESS_FILE: _digest(pr_tmp)}}
        write_json(ck / MANIFEST_FILE, manifest)
        os.replace(st_tmp, ck / STATE_FILE)
        os.replace(pr_tmp, ck / PROGRESS_FILE)
        fsync_dir(ck)
    except OSError as e:
        raise FcitError(f"{ck}: cannot write the checkpoint: {e.strerror or e}") from None


def _verify_files(ck: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {STATE_FILE, PROGRESS_FILE}:
        raise FcitError(f"{ck / MANIFEST_FILE}: damaged (no file list)")
    for name, want in files.items():
        final, tmp = ck / name, ck / (name + ".tmp")
        if final.is_file() and _digest(final) == want:
            continue
        if tmp.is_file() and _digest(tmp) == want:
            os.replace(tmp, final)  # the crash hit after the manifest: the new file is complete, finish the rename
            continue
        if not final.is_file():
            raise FcitError(f"{final}: missing; the checkpoint cannot be resumed")
        raise FcitError(f"{final}: damaged or not the file the manifest names (size {final.stat().st_size}, "
                        f"expected {want.get('size')}); the checkpoint cannot be resumed")


def _manifest(run_dir: Path, cfg: "Config") -> Optional[dict]:
    """The verified manifest, or None when no stage has been checkpointed yet."""
    ck = Path(run_dir) / CHECKPOINT
    mpath = ck / MANIFEST_FILE
    if not mpath.is_file():
        if any((ck / n).exists() for n in (STATE_FILE, PROGRESS_FILE)):
            raise FcitError(f"{ck}: checkpoint files without {MANIFEST_FILE} (an older fcit, or damaged); "
                            f"they cannot be verified against the config")
        return None
    manifest = read_json(mpath, "checkpoint manifest")
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise FcitError(f"{mpath}: damaged or of another fcit version")
    if manifest.get("config_hash") != config_hash(cfg):
        raise FcitError(f"{ck}: the checkpoint was made with another configuration than {run_dir}/config.json; "
                        f"it cannot be resumed with it")
    _verify_files(ck, manifest)
    return manifest


def verify_resume(run_dir: Path, cfg: "Config") -> None:
    """Everything ``--resume`` relies on, checked before any work: config.json agrees with ``cfg`` and the
    checkpoint with both."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists():
        raise FcitError(f"--resume: {run_dir} holds a finished run; nothing to resume")
    stored = read_config(run_dir)
    a, b = _resume_identity(stored), _resume_identity(cfg)
    if a != b:
        raise FcitError(f"--resume: {run_dir}/config.json differs from this run's config at {_first_difference(a, b)}")
    _manifest(run_dir, cfg)


def load_checkpoint(run_dir: Path, cfg: "Config", num_stages: int) -> Optional[tuple[dict, dict, dict]]:
    """(global state, method state, progress) of the last finished stage, verified; None if there is none yet."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = _manifest(run_dir, cfg)
    if manifest is None:
        return None
    ck = Path(run_dir) / CHECKPOINT
    nxt = manifest.get("next_stage")
    if not isinstance(nxt, int) or not 1 <= nxt <= num_stages:
        raise FcitError(f"{ck / MANIFEST_FILE}: next stage {nxt} is outside this run's 1..{num_stages} stages")
    progress = read_json(ck / PROGRESS_FILE, "checkpoint progress")
    need = {"next_stage", "matrix", "rounds", "details", "timing"}
    if not isinstance(progress, dict) or not need <= set(progress) or progress["next_stage"] != nxt:
        raise FcitError(f"{ck / PROGRESS_FILE}: damaged (expected the keys {', '.join(sorted(need))})")
    try:
        tensors: dict[str, "torch.Tensor"] = load_file(str(ck / STATE_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise FcitError(f"{ck / STATE_FILE}: damaged: {str(e).splitlines()[0]}") from None
    state = {k[7:]: v for k, v in tensors.items() if k.startswith("global/")}
    method_state = {k[7:]: v for k, v in tensors.items() if k.startswith("method/")}
    return state, method_state, progress


def finished_result(run_dir: Path, cfg: "Config") -> Optional["RunResult"]:
    """The metrics of a finished run of exactly this config in ``run_dir`` (an interrupted comparison or matrix, or
    one assembled from runs made elsewhere), else None. A finished run of another config is an error, not a reuse."""
    from fcit.results import RunResult

    m, c = run_dir / "metrics.json", run_dir / "config.json"
    if not m.exists():
        return None
    if not c.exists():
        raise FcitError(f"{run_dir} holds a finished run without its config.json; remove it or pick another --out")
    stored, wanted = canonical(read_config(run_dir)), canonical(cfg)
    if stored != wanted:
        # e.g. model.compute_dtype (None vs 'bfloat16'): an fp32 run met by a default that computes in bf16 here
        raise FcitError(f"{run_dir} holds a finished run of a different config, at "
                        f"{_first_difference(stored, wanted)}; remove it, pick another --out or set that key")
    try:
        return RunResult.load(run_dir)
    except FcitError as err:
        raise FcitError(f"{err}; remove the run directory to rerun it") from None
