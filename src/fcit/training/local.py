"""Local training: one party's update of the trainable tensors, the same function for every engine's clients, centralized
runs and pre-training."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from fcit.data.records import Sample
from fcit.models.answer_loss import answer_forward, answer_positions
from fcit.models.compiled import compiles, training_compiled
from fcit.models.device import autocast_for, base_dtype, enable_gradient_checkpointing, model_device
from fcit.models.fused_lora import set_fused
from fcit.models.inputs import Batcher
from fcit.models.lora import State, get_state, set_state
from fcit.models.structure import projector_param_names
from fcit.training.losses import LossHook
from fcit.training.guard import TrainingDiverged

if TYPE_CHECKING:  # the GPU benchmark imports this module where pydantic is not installed
    from fcit.config import TrainConfig


@dataclass
class LocalResult:
    state: State
    num_samples: int
    loss: float
    steps: int
    seconds: float


def _schedule(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def local_train(
    model: torch.nn.Module,
    batcher: Batcher,
    start: State,
    samples: Sequence[Sample],
    cfg: TrainConfig,
    seed: int,
    loss_hook: Optional[LossHook] = None,
    epochs: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
    block: int = 1,
) -> LocalResult:
    """Train the model's trainable tensors from ``start`` on ``samples`` and return the new trainable state.

    ``block`` > 1: the samples come in blocks of that many consecutive items which the shuffle keeps together in one
    batch (pre-training's minimal pairs: a pair split over two batches taught nothing in 1,000 steps, one batch
    holding both members did). ``block=1`` is the plain per-sample shuffle.

    As in the reference, every local run gets a fresh AdamW and a fresh warmup + cosine schedule spanning only this
    run (reference section 2). The shared model object is left holding the client's result; callers reload the global
    state before the next client.
    """
    t0 = time.perf_counter()
    # Dropout draws from the global RNG: seeding it per client makes an update depend only on (start, data, seed),
    # whichever engine, process or order runs the clients.
    with torch.random.fork_rng(devices=[]), training_compiled(model, compiles(cfg, model_device(model))):
        torch.manual_seed(seed)
        return _train(model, batcher, start, samples, cfg, seed, loss_hook, epochs, progress, t0, block)


def _shuffled(n: int, block: int, gen: torch.Generator) -> list[int]:
    if block == 1:
        return torch.randperm(n, generator=gen).tolist()
    blocks = torch.randperm(-(-n // block), generator=gen).tolist()
    return [j for b in blocks for j in range(b * block, min(n, (b + 1) * block))]


def _train(model, batcher, start, samples, cfg, seed, loss_hook, epochs, progress, t0, block=1) -> LocalResult:
    set_state(model, start)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    epochs = epochs or cfg.local_epochs
    bs = cfg.batch_size
    if block < 1 or bs % block:
        raise ValueError(f"block ({block}) must divide the batch size ({bs}), or a batch would split a block")
    steps_per_epoch = math.ceil(len(samples) / bs)
    total = max(1, steps_per_epoch * epochs)
    # The projector is shared by every task and subspace, so it gets its own (lower) rate: the reference scripts ask
    # for mm_projector_lr = lr / 10 (their trainer ignored it; reference section 2).
    proj_lr = cfg.lr * cfg.projector_lr_scale
    proj = set(projector_param_names(model))
    groups = [
        {"params": [p for n, p in named if n not in proj], "lr": cfg.lr},
        {"params": [p for n, p in named if n in proj], "lr": proj_lr},
    ]
    # fused: the LoRA addmm, the loss on answer positions only and AdamW's one-kernel step (a step of the embedded
    # model's 28 trainable tensors costs 1.1 ms as a loop over them, 0.4 ms fused); False runs the reference.
    fused = getattr(cfg, "fused", True)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                            fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup_ratio))
    gen = torch.Generator().manual_seed(seed)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    micro = min(cfg.micro_batch_size or bs, bs)
    set_fused(model, fused)
    # fp16 gradients underflow without loss scaling; disabled (a pass-through) for bf16 and fp32.
    scaler = torch.amp.GradScaler(model_device(model).type, enabled=base_dtype(model) == torch.float16)
    model.train()
    loss_sum, steps = 0.0, 0
    for _ in range(epochs):
        order = _shuffled(len(samples), block, gen)
        for i in range(0, len(order), bs):
            chosen = [samples[j] for j in order[i : i + bs]]
            parts = [batcher.train_batch(chosen[k : k + micro]) for k in range(0, len(chosen), micro)]
            step_loss = 0.0
            # The answer tokens each micro-batch carries: its weight in the accumulated step.
            shares = [int(answer_positions(b["labels"]).sum()) for b in parts] if len(parts) > 1 else [1]
            for batch, share in zip(parts, shares):
                with autocast_for(model):
                    out = answer_forward(model, batch, full=not fused)
                    loss = out.loss
                    if loss_hook is not None:
                        loss = loss_hook(model, batch, loss, out)
                if not torch.isfinite(loss.detach()):
                    # Stop at the first NaN step: every later step, and the upload, would only spread it.
                    raise TrainingDiverged(f"loss is {float(loss.detach())} at local step {steps + 1}; lower train.lr")
                if len(parts) > 1:
                    # The model's loss is a mean over a micro-batch's answer tokens; weighting it by its share of
                    # the whole batch's answer tokens makes the accumulated gradient the full batch's.
                    loss = loss * (share / sum(shares))
                scaler.scale(loss).backward()
                step_loss += float(loss.detach())
                del out, loss  # a 7B model's fp32 logits are over a GiB: free them before the next micro-batch
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)
            if fused:
                # The fused kernel writes the parameters in place without bumping their version counters, which
                # caches keyed on them (the subspace layers' concatenations) read to notice a change.
                torch.autograd.graph.increment_version(params)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += step_loss
            steps += 1
            if progress is not None:
                progress(1)
    model.eval()
    return LocalResult(
        state=get_state(model),
        num_samples=len(samples),
        loss=loss_sum / max(1, steps),
        steps=steps,
        seconds=time.perf_counter() - t0,
    )
