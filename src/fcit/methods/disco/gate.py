"""DISCO's Subspace Selective Activation at inference: a per-sample gate over the subspaces, set at each
generation batch's prefill forward from the batch itself.

The instruction is read back from the input ids (so any batching or ordering of the samples by the caller is fine)
and the image identity from the batch's pixels; cached decoding steps keep the prefill's gate.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict
from typing import Callable, Iterator, Optional, Sequence

import torch

from fcit.errors import FcitError
from fcit.models.identity import instruction_from_prompt, instruction_text, vision_tower
from fcit.models.subspace_lora import get_gate, set_gate

# (instruction texts, image tokens of the rows with an image or None, which rows have one) -> similarities (n, E)
Similarity = Callable[[Sequence[str], Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]


@contextlib.contextmanager
def gate_context(model: torch.nn.Module, samples: Sequence, tokenizer, modalities: Sequence[str],
                 similarity: Similarity, to_gates: Callable[[torch.Tensor], torch.Tensor], used: torch.Tensor,
                 encode_images: Callable[[torch.Tensor], torch.Tensor], stats: dict) -> Iterator[None]:
    """Generation inside the block runs with per-sample gates ``to_gates(similarity(...))``.

    ``stats`` (dataset -> {"n", "gate_sum", "top"}) receives, per test sample, its gate and which used subspace was
    the most similar; the dataset of a sample is found from its instruction."""
    samples = list(samples)
    E = int(used.numel())
    # The decoded prompt's white space may differ from the sample's; the snapshot maps it back to the exact text.
    snap = {" ".join(instruction_text(s).split()): instruction_text(s) for s in samples}
    ds_of: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        ds_of[instruction_text(s)][s.dataset] += 1
    one_ds = samples[0].dataset if samples and len({s.dataset for s in samples}) == 1 else None
    image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    captured: dict[str, torch.Tensor] = {}

    def recover(decoded: str) -> str:
        t = instruction_from_prompt(decoded)
        key = " ".join(t.split())
        if key in snap or "USER:" in decoded:
            return snap.get(key, t)
        # Another chat template (Qwen2-VL's: "system ... user {instruction} assistant"): the longest instruction
        # of these samples that the prompt contains.
        flat = " ".join(decoded.split())
        hits = [k for k in snap if k and k in flat]
        return snap[max(hits, key=len)] if hits else t

    def capture_pixels(module, args, kwargs):
        px = args[0] if args else kwargs.get("pixel_values")
        if px is not None:
            captured["px"] = px

    def prefill(module, args, kwargs):
        past = kwargs.get("past_key_values")
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            return None  # a cached decoding step: the gate of the prefill stays
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise FcitError("DISCO inference: the model was called without input_ids; cannot read the instruction")
        mask = kwargs.get("attention_mask")
        rows = list(ids) if mask is None else [r[m.bool()] for r, m in zip(ids, mask)]
        texts = [recover(tokenizer.decode(r, skip_special_tokens=True)) for r in rows]
        img_tok, has_img = None, None
        if "image" in modalities:
            px = kwargs.get("pixel_values")
            px = captured.pop("px", None) if px is None else px
            has_img = (ids == image_id).any(1) if image_id is not None else torch.ones(len(ids), dtype=torch.bool)
            if px is not None and int(has_img.sum()) == px.shape[0]:
                img_tok = encode_images(px)
            captured.clear()  # including what our own encode just ran through the tower
        sim = similarity(texts, img_tok, has_img)
        g = to_gates(sim)
        set_gate(model, g)
        # "top" is the most similar used slot, which is the largest gate for every variant but concat.
        top = sim.masked_fill(~used, -math.inf).argmax(1) if bool(used.any()) else None
        for i, (t, row) in enumerate(zip(texts, g)):
            d = one_ds or (ds_of[t].most_common(1)[0][0] if t in ds_of else "?")
            st = stats.setdefault(d, {"n": 0, "gate_sum": [0.0] * E, "top": [0] * E})
            st["n"] += 1
            st["gate_sum"] = [a + float(b) for a, b in zip(st["gate_sum"], row)]
            if top is not None:
                st["top"][int(top[i])] += 1
        return None

    prev = get_gate(model)
    hooks = [model.register_forward_pre_hook(prefill, with_kwargs=True)]
    if "image" in modalities:
        hooks.append(vision_tower(model).register_forward_pre_hook(capture_pixels, with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        set_gate(model, prev)
