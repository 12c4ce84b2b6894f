"""SSA overhead: greedy generation with E subspaces and per-sample gates vs a single LoRA on the same batch.

    .venv/bin/python scripts/bench_ssa.py [--model PATH] [--subspaces 8] [--rank 8] [--batch 64] [--tokens 16]

Three timings on one batch of real FCIT-Synth test prompts (mixed datasets):
  gated     DISCO's layer: E subspaces, a different softmax gate per sample, one fused op per layer
  lora      one PEFT LoRA of the same total rank (E*q) on the same layers, unmerged
  merged    the same PEFT LoRA merged into the base weights (zero adapter cost)
and prints gated/lora and gated/merged (median of --repeats), and each variant's FLOPs over the same generation
(FlopCounterMode: matmuls and attention), whose ratio is the floor an exact gated layer cannot go under unless its
extra matmuls run faster per FLOP than the base's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local LLaVA checkpoint (default: the embedded tiny model)")
    ap.add_argument("--subspaces", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compute-dtype", default="auto",
                    help="the matmuls' dtype, as model.compute_dtype (auto: bfloat16 on a CPU with bf16 units)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from fcit.config import load_config
    from fcit.data.loader import open_benchmark
    from fcit.data.registry import TASK_ORDER
    from fcit.models.backbone import load_backbone
    from fcit.hardware import auto_compute_dtype
    from fcit.models.device import autocast_for, set_compute_dtype
    from fcit.models.inputs import Batcher
    from fcit.models.structure import ffn_target
    from fcit.models.subspace_lora import SubspaceLoraConfig, attach_subspace_lora, gated

    base, processor = load_backbone(args.model)
    bench = open_benchmark(load_config(), progress=False)
    per = -(-args.batch // len(TASK_ORDER))
    samples = [s for d in TASK_ORDER for s in bench.test(d)[:per]][: args.batch]
    E, q = args.subspaces, args.rank
    torch.manual_seed(0)

    gated_model = attach_subspace_lora(copy.deepcopy(base), SubspaceLoraConfig(num_subspaces=E, rank=q, alpha=2 * E * q))
    with torch.no_grad():  # non-zero B so every subspace does real work
        for n, p in gated_model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    lora_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=E * q, lora_alpha=2 * E * q,
                                                                target_modules=ffn_target(base)))
    with torch.no_grad():
        for n, p in lora_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    merged_model = copy.deepcopy(lora_model).merge_and_unload()
    compute = auto_compute_dtype("float32", "cpu") if args.compute_dtype == "auto" else args.compute_dtype
    compute = None if compute == "float32" else compute
    for m in (gated_model, lora_model, merged_model):
        set_compute_dtype(m, compute)

    batcher = Batcher(base, processor)
    batch = batcher.prompt_batch(samples)
    gates = torch.softmax(torch.randn(len(samples), E) / 0.05, dim=-1)

    def gen(model):
        with torch.no_grad(), autocast_for(model):
            t0 = time.perf_counter()
            model.generate(**batch, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            return time.perf_counter() - t0

    variants = {"gated": (gated_model, lambda: gated(gated_model, gates)), "lora": (lora_model, None),
                "merged": (merged_model, None)}
    flops = {}
    for name, (model, ctx) in variants.items():
        with ctx() if ctx is not None else contextlib.nullcontext(), FlopCounterMode(display=False) as counter:
            gen(model)
        flops[name] = counter.get_total_flops()
    times: dict[str, list[float]] = {k: [] for k in variants}
    # Round-robin, so that a drift of the machine's speed during the benchmark hits every variant alike.
    for rep in range(args.repeats + 1):
        for name, (model, ctx) in variants.items():
            with ctx() if ctx is not None else contextlib.nullcontext():
                t = gen(model)
            if rep:  # the first round warms up
                times[name].append(t)
    t_gated, t_lora, t_merged = (statistics.median(times[k]) for k in ("gated", "lora", "merged"))
    print(f"batch {len(samples)} x {args.tokens} new tokens, E={E} subspaces of rank {q}, threads "
          f"{torch.get_num_threads()}, matmuls in {compute or 'float32'}")
    print(f"gated (per-sample softmax gates): {t_gated * 1000:.0f} ms")
    print(f"single LoRA r={E * q} (unmerged): {t_lora * 1000:.0f} ms")
    print(f"single LoRA merged into weights: {t_merged * 1000:.0f} ms")
    print(f"ratio gated / single LoRA: {t_gated / t_lora:.2f}")
    print(f"ratio gated / merged:      {t_gated / t_merged:.2f}")
    print(f"FLOPs per generation: gated {flops['gated'] / 1e9:.2f} G, single LoRA {flops['lora'] / 1e9:.2f} G, "
          f"merged {flops['merged'] / 1e9:.2f} G; gated / merged {flops['gated'] / flops['merged']:.2f}")


if __name__ == "__main__":
    main()
