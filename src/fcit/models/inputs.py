"""Turning ``Sample`` objects into model batches: the prompt template, loss masks and cached image tensors."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from fcit.data.records import Sample
from fcit.errors import FcitError
from fcit.models.cache import TensorLRU
from fcit.models.device import base_dtype, default_cache_mb, model_device

IGNORE = -100
# Text tokens a derived max_length leaves beside the template and the image: every FCIT question + answer fits.
TEXT_BUDGET = 256
# Token ids kept per batcher (prompts and targets each): a few MB of ints, far above a run's distinct samples.
TOKEN_CACHE_ENTRIES = 200_000


def num_image_tokens(model) -> Optional[int]:
    """How many placeholder tokens every image expands to when the checkpoint fixes it (576 for LLaVA-1.5-336, 36 for
    the embedded 48 px model); None when the number depends on the image (Qwen2-VL's dynamic resolution, LLaVA-NeXT's
    tiles), which the Batcher then asks the processor for, image by image."""
    cfg = model.config
    if getattr(cfg, "image_grid_pinpoints", None):
        return None
    n = getattr(cfg, "image_seq_length", None)
    if n:
        return int(n)
    v = getattr(cfg, "vision_config", None)
    strategy = getattr(cfg, "vision_feature_select_strategy", None)
    if strategy is None or not getattr(v, "image_size", None):
        return None
    n = (v.image_size // v.patch_size) ** 2
    return n if strategy == "default" else n + 1


def _accepts(model, arg: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return arg in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return False


def _max_positions(model) -> Optional[int]:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if n else None


class Batcher:
    """Builds training and generation batches in the checkpoint's own prompt format.

    A checkpoint with a chat template (``llava-hf/llava-1.5-7b-hf`` has one) is prompted through it; one without
    (the embedded model) gets the vicuna_v1 form LLaVA-1.5 was trained with: ``{system} USER: <image>\\n{question}
    ASSISTANT:`` and target `` {answer}</s>``. Only target tokens carry loss (reference 1.1). Images are padded to a
    square with the processor's mean colour, as LLaVA-1.5's ``pad`` mode does, and the processor's outputs are cached
    by path (LRU, ``cache_mb``) because every client revisits its images each round. Batches live on the model's
    device; pixels are in the backbone's dtype.

    ``max_length`` None derives the budget from the checkpoint: template + image tokens + ``TEXT_BUDGET``, capped at
    the language model's positions. A prompt never gets cut (that would cut image tokens or the template);
    ``check_max_length`` rejects a budget too small for the longest prompt, and over-long answers lose their end.

    Image tokens: a fixed number per image when the checkpoint fixes it (LLaVA-1.5); otherwise (Qwen2-VL and
    Qwen2.5-VL) the processor's own count for the image's size, read from the file's header, and the image keeps its
    aspect ratio (no square padding, which is LLaVA-1.5's convention). Whatever the image processor returns
    (``pixel_values``, ``image_grid_thw``, ``image_sizes``, ...) goes into the batch, and ``mm_token_type_ids`` (1 at
    image tokens) when the model's forward takes it (Qwen2-VL's multimodal RoPE).
    """

    def __init__(self, model, processor, system_prompt: str = "", max_length: Optional[int] = None,
                 cache_images: bool = True, cache_mb: Optional[float] = None):
        self.model = model
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_token_id = self.tok.convert_tokens_to_ids(self.image_token)
        self.n_img = num_image_tokens(model)  # None: the processor counts each image's tokens
        self._mm_token_types = _accepts(model, "mm_token_type_ids")
        self._image_counts: OrderedDict[str, int] = OrderedDict()
        self.system = system_prompt.strip()
        if getattr(processor, "chat_template", None):
            self._template_owner = processor
        elif getattr(self.tok, "chat_template", None):
            self._template_owner = self.tok
        else:
            self._template_owner = None
        self._special = set(self.tok.all_special_ids)
        self._prompt_tokens: OrderedDict[tuple, list[int]] = OrderedDict()
        self._target_tokens: OrderedDict[tuple, list[int]] = OrderedDict()
        self._given: dict[str, dict[str, torch.Tensor]] = {}
        self._cache = TensorLRU(0 if not cache_images else default_cache_mb() if cache_mb is None else cache_mb)
        ip = processor.image_processor
        mean = getattr(ip, "image_mean", None) or [0.5, 0.5, 0.5]
        self.pad_colour = tuple(int(255 * m) for m in mean)
        self.max_length = self.derived_max_length() if max_length is None else int(max_length)

    # ---- text -------------------------------------------------------------------------------------------------
    @property
    def uses_chat_template(self) -> bool:
        return self._template_owner is not None

    def _messages(self, s: Sample, answer: Optional[str] = None) -> list[dict]:
        msgs: list[dict] = []
        if self.system:
            msgs.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        user = ([{"type": "image"}] if s.image else []) + [{"type": "text", "text": s.prompt}]
        msgs.append({"role": "user", "content": user})
        if answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        if self._template_owner is self.tok:
            # A tokenizer's template takes plain strings; the image placeholder goes where LLaVA puts it.
            for m in msgs:
                m["content"] = "".join(c["text"] if c["type"] == "text" else self.image_token + "\n"
                                       for c in m["content"])
        return msgs

    def _render(self, s: Sample, answer: Optional[str] = None) -> str:
        return self._template_owner.apply_chat_template(
            self._messages(s, answer), add_generation_prompt=answer is None, tokenize=False
        )

    def image_tokens(self, s: Sample) -> int:
        """How many image tokens the sample's prompt holds (0 without an image)."""
        if not s.image:
            return 0
        if self.n_img is not None:
            return self.n_img
        n = self._image_counts.get(s.image)
        if n is None:
            n = self._count_image_tokens(s.image)
            self._image_counts[s.image] = n
            if len(self._image_counts) > TOKEN_CACHE_ENTRIES:
                self._image_counts.popitem(last=False)
        return n

    def _count_image_tokens(self, path: str) -> int:
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is None:
            raise FcitError(f"model: {type(self.processor).__name__} cannot count the image tokens of an image")
        from PIL import Image

        try:
            with Image.open(path) as im:  # the header only: no pixels are decoded
                w, h = im.size
        except OSError as exc:
            raise FcitError(f"cannot read image {path}: {exc}") from None
        return int(count(image_sizes=[[h, w]])["num_image_tokens"][0])

    def _max_image_tokens(self) -> Optional[int]:
        """The most tokens one image can take: the fixed number, or the processor's pixel cap / (patch x merge)^2."""
        if self.n_img is not None:
            return self.n_img
        ip = self.processor.image_processor
        size = getattr(ip, "size", None)
        most = (size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)) \
            or getattr(ip, "max_pixels", None)
        patch, merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None)
        if most and isinstance(patch, int) and merge:
            return int(most) // (patch * merge) ** 2
        return None

    def prefix(self, s: Sample) -> str:
        return self._prefix(s, self.image_tokens(s))

    def _prefix(self, s: Sample, n_img: int) -> str:
        if self._template_owner is not None:
            text = self._render(s)
            return text.replace(self.image_token, self.image_token * n_img, 1) if s.image else text
        img = (self.image_token * n_img + "\n") if s.image else ""
        head = f"{self.system} " if self.system else ""
        return f"{head}USER: {img}{s.prompt} ASSISTANT:"

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _cached(self, table: OrderedDict, key: tuple, make) -> list[int]:
        hit = table.get(key)
        if hit is None:
            hit = table[key] = make()
            if len(table) > TOKEN_CACHE_ENTRIES:
                table.popitem(last=False)
        return hit

    def prompt_ids(self, s: Sample) -> list[int]:
        # Every client re-tokenizes its shard each epoch and round: the ids depend only on these fields (and on
        # this batcher's fixed template and system prompt), so they are computed once. Callers must not mutate them.
        n = self.image_tokens(s)
        return self._cached(self._prompt_tokens, (n, s.prompt), lambda: self._prompt_ids(s, n))

    def _prompt_ids(self, s: Sample, n_img: int) -> list[int]:
        text = self._prefix(s, n_img)
        bos = self.tok.bos_token
        # As the tokenizer's own add_special_tokens would, unless the template already wrote it.
        head = [self.tok.bos_token_id] if bos is not None and not text.startswith(bos) else []
        return head + self._ids(text)

    def target_ids(self, s: Sample) -> list[int]:
        """The answer and the end of the assistant's turn: exactly the tokens that carry loss."""
        return self._cached(self._target_tokens, (s.image is not None, s.prompt, s.answer), lambda: self._target_ids(s))

    def _target_ids(self, s: Sample) -> list[int]:
        eos = self.tok.eos_token_id
        if self._template_owner is None:
            return self._ids(" " + s.answer) + [eos]
        prompt, full = self._render(s), self._render(s, s.answer)
        # Trailing white space after the end-of-turn token is formatting, not something to generate.
        suffix = full[len(prompt):].rstrip() if full.startswith(prompt) else " " + s.answer
        ids = self._ids(suffix)
        if not ids or ids[-1] not in self._special:
            ids.append(eos)  # a template without an end-of-turn token: the model must still learn to stop
        return ids

    # ---- sequence length --------------------------------------------------------------------------------------
    def derived_max_length(self) -> int:
        cap = _max_positions(self.model)
        most = self._max_image_tokens()
        if most is None:
            if cap is None:
                raise FcitError("config: train.max_length: cannot be derived for this checkpoint (no bound on its "
                                "image tokens, no position limit); set it")
            return cap
        n = len(self._prompt_ids(Sample("", "", "image", "", ""), most)) + TEXT_BUDGET
        return min(n, cap) if cap else n

    def check_max_length(self, samples: Sequence[Sample]) -> int:
        """Raise a one-line config error if a prompt (template and image tokens included) plus one answer token
        does not fit ``max_length``; returns the longest prompt's length. Call it before any training."""
        longest, worst = 0, None
        for i in range(0, len(samples), 1024):
            chunk = samples[i : i + 1024]
            texts = [self.prefix(s) for s in chunk]
            # One batched call: the fast tokenizer does the whole training set in about a second.
            ids = self.tok(texts, add_special_tokens=False)["input_ids"]
            bos = self.tok.bos_token
            for s, t, row in zip(chunk, texts, ids):
                n = len(row) + (1 if bos is not None and not t.startswith(bos) else 0)
                if n > longest:
                    longest, worst = n, s
        if worst is not None and longest + 1 > self.max_length:
            raise FcitError(
                f"config: train.max_length: {self.max_length} tokens cannot hold the prompt of "
                f"{worst.dataset}/{worst.id} ({longest} tokens, {self.image_tokens(worst)} of them image "
                f"tokens) plus one answer token; raise it or leave it unset to derive it"
            )
        return longest

    # ---- images -----------------------------------------------------------------------------------------------
    def load_image(self, path: str) -> torch.Tensor:
        """One image's pixel tensor (C, H, W), as LLaVA's processor makes it."""
        return self.image_outputs(path)["pixel_values"][0]

    def image_outputs(self, path: str) -> dict[str, torch.Tensor]:
        """The image processor's outputs for one image (each with a leading image/patch dimension), on the CPU."""
        if path in self._given:
            return self._given[path]
        hit = self._cache.get(path) if self._cache.enabled else None
        if hit is not None:
            return hit
        from PIL import Image  # here, so that text and pre-processed inputs need no Pillow

        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except OSError as exc:
            raise FcitError(f"cannot read image {path}: {exc}") from None
        w, h = im.size
        if w != h and self.n_img is not None:  # LLaVA-1.5's pad mode; dynamic-resolution families keep the aspect
            side = max(w, h)
            sq = Image.new("RGB", (side, side), self.pad_colour)
            sq.paste(im, ((side - w) // 2, (side - h) // 2))
            im = sq
        out = self.processor.image_processor(images=[im], return_tensors="pt")
        feats = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        if self._cache.enabled:
            self._cache.put(path, feats)
        return feats

    def give_image(self, path: str, outputs: dict[str, torch.Tensor], image_tokens: Optional[int] = None) -> None:
        """Use these image-processor outputs for ``path`` instead of reading the file (pre-processed images);
        ``image_tokens``: their token count, needed where the checkpoint does not fix it."""
        self._given[path] = outputs
        if image_tokens is not None:
            self._image_counts[path] = int(image_tokens)

    def _images(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        outs = [self.image_outputs(s.image) for s in samples if s.image]
        if not outs:
            return {}
        dev, dt = model_device(self.model), base_dtype(self.model)
        batch = {}
        for k in outs[0]:
            t = torch.cat([o[k] for o in outs])
            batch[k] = t.to(dev, dt) if t.is_floating_point() else t.to(dev)
        return batch

    def _pixels(self, samples: Sequence[Sample]) -> Optional[torch.Tensor]:
        return self._images(samples).get("pixel_values")

    def _with_token_types(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # What the processor returns beside input_ids for Qwen2-VL: 1 at image tokens, 0 elsewhere (M-RoPE needs it).
        if self._mm_token_types:
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return batch

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = model_device(self.model)
        return {k: v.to(dev) for k, v in batch.items()}

    # ---- batches ----------------------------------------------------------------------------------------------
    def train_batch(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Right-padded ids with labels masked to the answer; an over-long answer is cut at its end."""
        rows, labels = [], []
        for s in samples:
            p = self.prompt_ids(s)
            room = self.max_length - len(p)
            if room < 1:
                self.check_max_length([s])
            a = self.target_ids(s)[:room]
            rows.append(p + a)
            labels.append([IGNORE] * len(p) + a)
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([lb + [IGNORE] * (width - len(lb)) for lb in labels]),
        }
        batch = self._to_device(self._with_token_types(batch))
        batch.update(self._images(samples))
        return batch

    def prompt_batch(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Left-padded prompts for batched greedy generation."""
        rows = [self.prompt_ids(s) for s in samples]
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }
        batch = self._to_device(self._with_token_types(batch))
        batch.update(self._images(samples))
        return batch

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tok.batch_decode(ids, skip_special_tokens=True)]
