"""The one JSON reader and writer of the package.

Writes are atomic and durable (temp file, fsync, rename: a crash never leaves a truncated file) and strict (NaN or
Infinity is refused, naming the key, instead of being written as a token no JSON parser accepts). Reads turn a
missing or damaged file into one line naming it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from fcit.errors import FcitError


def _non_finite_at(obj: Any, path: str = "") -> Optional[str]:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "(top level)"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        hit = _non_finite_at(v, f"{path}.{k}" if path else str(k))
        if hit:
            return hit
    return None


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def dumps(obj: Any, indent: Optional[int] = 2, sort_keys: bool = True, where: str = "JSON") -> str:
    try:
        return json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
    except ValueError:
        raise FcitError(f"{where}: refusing to write a non-finite number (NaN or Infinity) at "
                        f"{_non_finite_at(obj)}") from None


def write_json(path: Path, obj: Any, indent: Optional[int] = 2, sort_keys: bool = True) -> None:
    """Atomic, durable and strict: a crash never leaves a truncated file, and no NaN/Infinity is ever written."""
    path = Path(path)
    text = dumps(obj, indent, sort_keys, where=str(path))
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_durable(tmp, text.encode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise FcitError(f"{path}: cannot write: {e.strerror or e}") from None


def read_json(path: Path, what: str = "") -> Any:
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FcitError(f"{label}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FcitError(f"{label}: cannot read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FcitError(f"{label}: damaged (truncated or not JSON: {e.msg} at line {e.lineno} col {e.colno})") from None
