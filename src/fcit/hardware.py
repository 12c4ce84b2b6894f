"""What this machine's processors can do, as far as fcit's defaults depend on it.

Kept below the configuration, which settles ``model.compute_dtype=auto`` with it before any model exists.
"""

from __future__ import annotations

import torch


def cpu_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16), which oneDNN uses for bf16 matmuls.

    Measured at the embedded model's shapes: AMX runs them 5-6x faster than fp32 (README "Speed of the embedded
    engine"), AVX512-BF16 about 2x; without either, bf16 is emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    try:  # not Linux: torch's own cpuinfo (a private helper, so any failure means "unknown": no)
        caps = torch._C._cpu._get_cpu_capability()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    except Exception:  # noqa: BLE001
        return False


def auto_compute_dtype(base: str, device: str) -> str | None:
    """``model.compute_dtype=auto``: bfloat16 for an fp32 base trained on a CPU with bf16 matrix instructions, where
    it is the fastest path; else None (the base's own dtype: fp32, or the half-precision base of a GPU run)."""
    if base != "float32":
        return None
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return "bfloat16" if on_cpu and cpu_bf16_matmul() else None
