"""The embedded base model shipped as package data, and the digest that names it in a run's identity.

Kept below the configuration, which records the digest (``model.embedded_base``) before any model exists: a run on
the embedded base says which one it computed from, so a later fcit that ships another base neither reuses nor
resumes it as its own.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from fcit.errors import FcitError

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "tiny-llava"
WEIGHTS = "model.safetensors"


def embedded_base_sha256() -> str | None:
    """sha256 of the embedded base's weights (the file, so it is the digest ``sha256sum`` prints); None before
    ``fcit pretrain`` has built them."""
    p = EMBEDDED_DIR / WEIGHTS
    try:
        st = p.stat()
    except OSError:
        return None
    return _digest(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rebuilt base is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_embedded_base(expected: str | None) -> None:
    """Refuse to compute a run recorded on another embedded base than the one this fcit ships."""
    if expected is None:
        return
    have = embedded_base_sha256()
    if have is None:
        raise FcitError(f"embedded base model missing at {EMBEDDED_DIR}; run `fcit pretrain` to build it")
    if expected != have:
        raise FcitError(f"model.embedded_base: the run is recorded on embedded base {expected[:12]}, this fcit ships "
                        f"{have[:12]}; continue it with an fcit that ships that base, or start a new run (with model.path "
                        f"at a copy of that base to compute as it did: README \"Reproducing the embedded base model\")")
