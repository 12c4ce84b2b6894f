"""Turning ``Sample`` objects into model batches: the LLaVA-1.5 prompt, loss masks and cached image tensors."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from fcit.data.records import Sample
from fcit.errors import FcitError

IGNORE = -100


def num_image_tokens(model) -> int:
    """How many placeholder tokens one image expands to (576 for LLaVA-1.5-336, 36 for the embedded 48 px model)."""
    cfg = model.config
    n = getattr(cfg, "image_seq_length", None)
    if n:
        return int(n)
    v = cfg.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n if cfg.vision_feature_select_strategy == "default" else n + 1


class Batcher:
    """Builds training and generation batches with the vicuna_v1 template LLaVA-1.5 was trained with.

    Prompt: ``{system} USER: <image>\\n{question} ASSISTANT:`` and target `` {answer}</s>``; only target tokens carry
    loss (reference 1.1). Images are padded to a square with the processor's mean colour, as LLaVA-1.5's ``pad`` mode
    does, and their tensors are cached by path because every client revisits its images each round.
    """

    def __init__(self, model, processor, system_prompt: str = "", max_length: int = 256, cache_images: bool = True):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_token = getattr(processor, "image_token", "<image>")
        self.n_img = num_image_tokens(model)
        self.system = system_prompt.strip()
        self.max_length = max_length
        self._cache: dict[str, torch.Tensor] | None = {} if cache_images else None
        ip = processor.image_processor
        size = getattr(ip, "crop_size", None) or ip.size
        self.image_hw = (size.get("height") or size["shortest_edge"], size.get("width") or size["shortest_edge"])
        mean = getattr(ip, "image_mean", None) or [0.5, 0.5, 0.5]
        self.pad_colour = tuple(int(255 * m) for m in mean)

    # ---- text -------------------------------------------------------------------------------------------------
    def prefix(self, s: Sample) -> str:
        img = (self.image_token * self.n_img + "\n") if s.image else ""
        head = f"{self.system} " if self.system else ""
        return f"{head}USER: {img}{s.prompt} ASSISTANT:"

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    # ---- images -----------------------------------------------------------------------------------------------
    def load_image(self, path: str) -> torch.Tensor:
        if self._cache is not None and path in self._cache:
            return self._cache[path]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except OSError as exc:
            raise FcitError(f"cannot read image {path}: {exc}") from None
        w, h = im.size
        if w != h:
            side = max(w, h)
            sq = Image.new("RGB", (side, side), self.pad_colour)
            sq.paste(im, ((side - w) // 2, (side - h) // 2))
            im = sq
        px = self.processor.image_processor(images=[im], return_tensors="pt")["pixel_values"][0]
        if self._cache is not None:
            self._cache[path] = px
        return px

    def _pixels(self, samples: Sequence[Sample]) -> torch.Tensor | None:
        imgs = [self.load_image(s.image) for s in samples if s.image]
        return torch.stack(imgs) if imgs else None

    # ---- batches ----------------------------------------------------------------------------------------------
    def train_batch(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Right-padded ids with labels masked to the answer; over-long prompts are cut from the question's end."""
        rows, labels = [], []
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        for s in samples:
            p = bos + self._ids(self.prefix(s))
            a = self._ids(" " + s.answer) + [self.tok.eos_token_id]
            p = p[: max(self.max_length - len(a), self.n_img + len(bos) + 1)]
            ids = (p + a)[: self.max_length]
            rows.append(ids)
            labels.append(([IGNORE] * len(p) + a)[: self.max_length])
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([lb + [IGNORE] * (width - len(lb)) for lb in labels]),
        }
        px = self._pixels(samples)
        if px is not None:
            batch["pixel_values"] = px
        return batch

    def prompt_batch(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Left-padded prompts for batched greedy generation."""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        rows = [bos + self._ids(self.prefix(s)) for s in samples]
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }
        px = self._pixels(samples)
        if px is not None:
            batch["pixel_values"] = px
        return batch

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tok.batch_decode(ids, skip_special_tokens=True)]
