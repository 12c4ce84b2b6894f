"""Batched greedy generation on test sets, scored per dataset."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from fcit.data.records import Sample
from fcit.models.device import autocast_for
from fcit.models.inputs import Batcher


@torch.no_grad()
def generate(
    model,
    batcher: Batcher,
    samples: Sequence[Sample],
    batch_size: int,
    max_new_tokens: int,
    progress: Optional[Callable[[int], None]] = None,
) -> list[str]:
    model.eval()
    out: list[str] = []
    # Sorting by prompt length keeps left padding short; results are put back in input order.
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].prompt))
    preds: dict[int, str] = {}
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = batcher.prompt_batch([samples[j] for j in idx])
        with autocast_for(model):
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        texts = batcher.decode(gen[:, batch["input_ids"].shape[1] :])
        preds.update(zip(idx, texts))
        if progress is not None:
            progress(len(idx))
    out = [preds[i] for i in range(len(samples))]
    return out
