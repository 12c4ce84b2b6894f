"""The process environment fcit needs, set in one place.

Nothing is ever fetched from a model hub (no network here, in CI or on the GPU machines), and Flower must never
install an app's dependencies at run time (it would pull a CUDA torch), phone home or check for updates. These
switches are read when huggingface_hub, transformers and flwr load, so ``apply()`` runs before any of them is
imported: from ``fcit/__init__.py``, which every entry point (the CLI, Ray workers, Flower's ClientApp processes)
imports first.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# A device a run may ask for: auto (a GPU when one is visible, else the CPU), cpu, cuda or cuda:N.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
FLOWER = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
          "FLWR_DISABLE_UPDATE_CHECK": "1"}


def apply() -> None:
    """Set every switch the user has not set (a user's own value wins)."""
    for k, v in {**OFFLINE, **FLOWER}.items():
        os.environ.setdefault(k, v)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess fcit starts (Flower daemons): this one, with every switch forced on."""
    env = dict(os.environ)
    env.update({**OFFLINE, **FLOWER, **extra})
    return env


@contextlib.contextmanager
def scoped(**values: str) -> Iterator[None]:
    """Set environment variables for the processes started inside the block, and put the old values back after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
