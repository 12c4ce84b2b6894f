"""LLaVA-1.5-7B on one GPU through fcit's own code: client update step, batched greedy generation. One JSON line.

    python scripts/bench_gpu.py            # LLaVA-1.5-7B's architecture, random bf16 weights, on cuda (~3-5 min)
    python scripts/bench_gpu.py --tiny     # the same code path at tiny widths on the CPU (seconds; CI runs it)

Nothing is downloaded: the model is LLaVA-1.5-7B's exact architecture (CLIP ViT-L/14-336 + mlp2x_gelu + Vicuna-7B:
32 layers, d 4096, ffn 11008, vocab 32064) initialised at random directly on the device, prompts are random words of a
tokenizer trained here, images are random pixel tensors. The weights' values do not change the cost of a step.

It runs what a client runs: fcit's ``attach_lora`` (r 64, alpha 128, dropout 0.05 on the LM's FFN, projector
trainable), fp32 trainables on a bf16 base (``upcast_trainables``), fcit's ``Batcher`` (vicuna_v1 prompt with LLaVA's
system sentence, 576 image tokens), ``local_train`` (AdamW, warmup + cosine, autocast, micro-batches, optional
activation checkpointing) and ``eval.evaluate.generate`` (left-padded batched greedy decoding, LoRA unmerged).

Measured: (a) optimizer-step time, tokens/s, MFU (model FLOPs: 4 x LM params per token for forward + input gradients
of a frozen base, 2 x vision params per image patch; recomputation and attention not counted) against the bf16
matmul peak measured here, and peak memory, for micro-batches 4 / 8 / 16 with and without checkpointing; (b) new
tokens/s of greedy generation, 128 tokens at batch 64. Needs only torch, transformers, peft (and tokenizers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Kept equal to fcit.config's LoraConfig().target ("ffn": the LM's feed-forward layers, found from the model's
# structure) and LLAVA_SYSTEM (tests/test_bench_gpu.py checks): fcit.config needs pydantic, which the GPU machines
# do not have.
FFN_TARGET = "ffn"
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions.")

FULL = dict(image=336, patch=14, v_hidden=1024, v_layers=24, v_heads=16, v_inter=4096, hidden=4096, layers=32,
            heads=32, inter=11008, vocab=32064, positions=4096, micro=(4, 8, 16), batch=32, gen_batch=64,
            gen_tokens=128, words=(24, 8), matmul=8192)
TINY = dict(image=28, patch=14, v_hidden=32, v_layers=2, v_heads=2, v_inter=64, hidden=64, layers=2, heads=2,
            inter=128, vocab=1024, positions=512, micro=(1, 2), batch=4, gen_batch=4, gen_tokens=8, words=(6, 3),
            matmul=256)
WORDS = ("what colour shape count chart value title object scene red blue green left right above below bar plot "
         "table number answer question image large small how many which one the a of in is").split()


def build(spec: dict, device: torch.device, dtype: torch.dtype):
    """LLaVA-1.5's architecture at ``spec``'s widths, random weights created on ``device``; a matching tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from fcit.models.backbone import IMAGE_TOKEN, build_tokenizer

    tok = build_tokenizer([" ".join(WORDS)] * 50 + ["USER: ASSISTANT: " + LLAVA_SYSTEM], 400)
    vision = CLIPVisionConfig(hidden_size=spec["v_hidden"], intermediate_size=spec["v_inter"],
                              num_hidden_layers=spec["v_layers"], num_attention_heads=spec["v_heads"],
                              image_size=spec["image"], patch_size=spec["patch"], projection_dim=768,
                              hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["inter"], num_hidden_layers=spec["layers"],
                       num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
                       vocab_size=spec["vocab"], max_position_embeddings=spec["positions"], rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    n_img = (spec["image"] // spec["patch"]) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=n_img)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:  # weights are allocated (and initialised) on the GPU: no 14 GB pass through host memory
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    # Random weights emit EOS at random steps; generation must run all its steps to be measured.
    model.generation_config.eos_token_id = None
    model.eval()
    return model, tok, n_img


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """bf16 dense matmul TFLOP/s measured here (the MFU denominator)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batcher(model, tok, spec: dict, n_samples: int, seed: int = 0):
    from fcit.data.records import Sample
    from fcit.models.inputs import Batcher

    size = {"height": spec["image"], "width": spec["image"]}
    # The images are random tensors handed to the Batcher, so only the fields it reads about the processor matter.
    image_processor = SimpleNamespace(crop_size=size, size=size, image_mean=[0.48145466, 0.4578275, 0.40821073])
    processor = SimpleNamespace(tokenizer=tok, image_processor=image_processor, image_token="<image>",
                                chat_template=None)
    batcher = Batcher(model, processor, system_prompt=LLAVA_SYSTEM, cache_mb=0)
    rng = random.Random(seed)
    q, a = spec["words"]
    samples = []
    for i in range(n_samples):
        path = f"bench://{i}"
        batcher.give_image(path, {"pixel_values": torch.randn(1, 3, spec["image"], spec["image"])})
        samples.append(Sample("bench", str(i), path, " ".join(rng.choices(WORDS, k=q)) + " ?",
                              " ".join(rng.choices(WORDS, k=a))))
    return batcher, samples


def train_cfg(batch: int, micro: int, checkpointing: bool) -> SimpleNamespace:
    # The llava-1.5-7b preset's optimiser settings (fcit/config.py PRESETS); local_train reads only these fields.
    return SimpleNamespace(lr=2e-4, projector_lr_scale=0.1, weight_decay=0.0, warmup_ratio=0.03, local_epochs=1,
                           batch_size=batch, micro_batch_size=micro, gradient_checkpointing=checkpointing,
                           max_grad_norm=1.0)


def bench_train(model, batcher, samples, spec, device, peak_tflops, n_lm, n_vis, n_img) -> list[dict]:
    from fcit.training.local import local_train
    from fcit.models.lora import get_state

    start = get_state(model)
    bs = spec["batch"]
    steps = 3  # the first includes allocator and kernel warm-up and is not timed
    data = samples[: bs * steps]
    tokens_per_step = sum(int(batcher.train_batch([s])["attention_mask"].sum()) for s in data) / steps
    flops_per_step = 4 * n_lm * tokens_per_step + 2 * n_vis * (n_img + 1) * bs
    rows = []
    for ckpt in (False, True):
        for micro in spec["micro"]:
            if ckpt:
                from fcit.models.device import enable_gradient_checkpointing

                enable_gradient_checkpointing(model)
            row: dict = {"micro_batch": micro, "checkpointing": ckpt, "batch": bs}
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            stamps: list[float] = []

            def tick(_n: int) -> None:
                _sync(device)
                stamps.append(time.perf_counter())

            try:
                _sync(device)
                t0 = time.perf_counter()
                res = local_train(model, batcher, start, data, train_cfg(bs, micro, ckpt), seed=0, progress=tick)
                step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
                row.update(first_step_s=round(stamps[0] - t0, 3), step_s=round(step, 4),
                           tokens_per_s=round(tokens_per_step / step, 1),
                           mfu=round(flops_per_step / step / 1e12 / peak_tflops, 4), loss=round(res.loss, 4))
                if device.type == "cuda":
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                model.zero_grad(set_to_none=True)
            rows.append(row)
    return rows


def bench_generate(model, batcher, samples, spec, device) -> dict:
    from fcit.eval.evaluate import generate

    b, n = spec["gen_batch"], spec["gen_tokens"]
    chosen = samples[:b]
    generate(model, batcher, chosen[:2], batch_size=2, max_new_tokens=4)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    generate(model, batcher, chosen, batch_size=b, max_new_tokens=n)
    _sync(device)
    sec = time.perf_counter() - t0
    out = {"batch": b, "new_tokens": n, "seconds": round(sec, 3), "new_tokens_per_s": round(b * n / sec, 1),
           "prompt_tokens": int(batcher.prompt_batch(chosen)["attention_mask"].sum()) // b}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny widths on the CPU: checks the code path in seconds")
    ap.add_argument("--device", default=None, help="default: cuda (full), cpu (--tiny)")
    args = ap.parse_args(argv)
    import peft
    import transformers

    from fcit.models.device import enable_tf32, resolve_device, upcast_trainables
    from fcit.models.lora import attach_lora

    spec = TINY if args.tiny else FULL
    device = resolve_device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.bfloat16
    t_start = time.perf_counter()
    if device.type == "cuda":
        enable_tf32()
    peak = matmul_peak(device, dtype, spec["matmul"])
    t0 = time.perf_counter()
    base, tok, n_img = build(spec, device, dtype)
    build_s = time.perf_counter() - t0
    n_all = sum(p.numel() for p in base.parameters())
    n_vis = sum(p.numel() for p in base.model.vision_tower.parameters())
    lm = base.model.language_model
    n_lm = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel() + base.lm_head.weight.numel()
    lora = SimpleNamespace(r=64, alpha=128.0, dropout=0.05, target=FFN_TARGET)
    model = attach_lora(base, SimpleNamespace(lora=lora, train_projector=True))
    upcast_trainables(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batcher, samples = make_batcher(model, tok, spec, n_samples=max(spec["batch"] * 3, spec["gen_batch"]))
    result = {
        "bench": "bench_gpu", "tiny": args.tiny, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "params": n_all, "lm_params_for_flops": n_lm, "vision_params": n_vis,
        "trainable_params": n_train, "image_tokens": n_img, "seq_tokens": len(batcher.prompt_ids(samples[0])),
        "build_s": round(build_s, 2), "matmul_peak_tflops": round(peak, 3),
    }
    result["train"] = bench_train(model, batcher, samples, spec, device, peak, n_lm, n_vis, n_img)
    result["generate"] = bench_generate(model, batcher, samples, spec, device)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
