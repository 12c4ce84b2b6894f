"""SSA overhead: greedy generation with E subspaces and per-sample gates vs a single LoRA on the same batch.

    .venv/bin/python scripts/bench_ssa.py [--model PATH] [--subspaces 8] [--rank 8] [--batch 64] [--tokens 16]

Three timings on one batch of real FCIT-Synth test prompts (mixed datasets):
  gated     DISCO's layer: E subspaces, a different softmax gate per sample, one fused op per layer
  lora      one PEFT LoRA of the same total rank (E*q) on the same layers, unmerged
  merged    the same PEFT LoRA merged into the base weights (zero adapter cost)
and prints gated/lora and gated/merged (median of --repeats).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local LLaVA checkpoint (default: the embedded tiny model)")
    ap.add_argument("--subspaces", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from fcit.config import load_config
    from fcit.data.loader import open_benchmark
    from fcit.data.registry import TASK_ORDER
    from fcit.models.backbone import load_backbone
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

    batcher = Batcher(base, processor)
    batch = batcher.prompt_batch(samples)
    gates = torch.softmax(torch.randn(len(samples), E) / 0.05, dim=-1)

    def gen(model):
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(**batch, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            return time.perf_counter() - t0

    def timed(model, ctx=None):
        gen(model)  # warm-up
        out = []
        for _ in range(args.repeats):
            if ctx is None:
                out.append(gen(model))
            else:
                with ctx():
                    out.append(gen(model))
        return statistics.median(out)

    t_gated = timed(gated_model, lambda: gated(gated_model, gates))
    t_lora = timed(lora_model)
    t_merged = timed(merged_model)
    print(f"batch {len(samples)} x {args.tokens} new tokens, E={E} subspaces of rank {q}, threads {torch.get_num_threads()}")
    print(f"gated (per-sample softmax gates): {t_gated * 1000:.0f} ms")
    print(f"single LoRA r={E * q} (unmerged): {t_lora * 1000:.0f} ms")
    print(f"single LoRA merged into weights: {t_merged * 1000:.0f} ms")
    print(f"ratio gated / single LoRA: {t_gated / t_lora:.2f}")
    print(f"ratio gated / merged:      {t_gated / t_merged:.2f}")


if __name__ == "__main__":
    main()
