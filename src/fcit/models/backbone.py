"""The backbone: a local Hugging Face checkpoint (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL), or the embedded tiny LLaVA.

Everything goes through ``AutoModelForImageTextToText`` / ``AutoProcessor`` so the code that tunes the 2.4 M-parameter
embedded model is the code that tunes ``llava-hf/llava-1.5-7b-hf`` or a Qwen2-VL checkpoint from a local directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from fcit.embedded import EMBEDDED_DIR
from fcit.errors import FcitError

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]


@dataclass(frozen=True)
class TinySpec:
    """Size of the embedded model; chosen so a full 8-stage run fits in minutes on 2 CPU cores."""

    image_size: int = 48
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    lm_hidden: int = 192
    lm_intermediate: int = 512
    lm_layers: int = 4
    lm_heads: int = 4
    vocab_size: int = 2048
    max_positions: int = 256


def build_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on the benchmark's own corpus: no hub download, exact decode of boxes and numbers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_tiny(tokenizer, spec: TinySpec = TinySpec(), seed: int = 0):
    """A randomly initialised LlavaForConditionalGeneration (CLIP ViT + 2-layer projector + Llama) and its processor."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    n_patches = (spec.image_size // spec.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=spec.lm_hidden,
        intermediate_size=spec.lm_intermediate,
        num_hidden_layers=spec.lm_layers,
        num_attention_heads=spec.lm_heads,
        num_key_value_heads=spec.lm_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=n_patches,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def resolve_model_path(path: str | None) -> Path:
    if path is None:
        if not (EMBEDDED_DIR / "config.json").is_file():
            raise FcitError(
                f"embedded base model missing at {EMBEDDED_DIR}; run `fcit pretrain` to build it"
            )
        return EMBEDDED_DIR
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FcitError(f"model.path: no Hugging Face checkpoint (config.json) in {p}")
    return p


def check_loading_info(info: dict, path: Path, allow_missing: bool = False) -> None:
    """A checkpoint whose weights do not cover the model's parameters would train a randomly initialised backbone
    with no other sign than bad scores; refuse it unless ``model.allow_missing`` says it is meant."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [k for k, *_ in info.get("mismatched_keys") or []]
    if allow_missing or not (missing or mismatched):
        return
    keys = missing or mismatched
    shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    unexpected = sorted(info.get("unexpected_keys") or [])
    hint = f"; the file has {len(unexpected)} unexpected keys, e.g. {unexpected[0]} (misnamed?)" if unexpected else ""
    what = "missing weights for" if missing else "weights of the wrong shape for"
    raise FcitError(f"model.path: {path}: {what} {len(keys)} parameters: {shown}{hint}; "
                    f"set model.allow_missing=true if a partial checkpoint is intended")


class ImageTextProcessor:
    """The image-and-text half of a checkpoint's processor, from ``AutoTokenizer`` + ``AutoImageProcessor`` and the
    checkpoint's chat template: what fcit uses when ``AutoProcessor`` cannot be built because a part fcit never
    uses is missing a backend (Qwen2-VL's and Qwen2.5-VL's video processor needs torchvision, which does not install
    beside a CPU build of torch). It offers what the ``Batcher`` reads: ``tokenizer``, ``image_processor``,
    ``chat_template``, ``image_token``, ``apply_chat_template`` and the image-token count of an image size."""

    def __init__(self, tokenizer, image_processor, chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, path: Path) -> "ImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        return cls(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path), template)

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Image tokens per (height, width), as the family's processor counts them: patches / merge_size^2."""
        from transformers.processing_utils import MultiModalData

        ip = self.image_processor
        merge = getattr(ip, "merge_size", None)
        if merge is None or not hasattr(ip, "get_number_of_image_patches"):
            raise FcitError(f"model: cannot count the image tokens of {type(ip).__name__} without its processor")
        n = [ip.get_number_of_image_patches(int(h), int(w), {}) // merge**2 for h, w in image_sizes or []]
        return MultiModalData(num_image_tokens=n)

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.chat_template:
            (Path(path) / "chat_template.jinja").write_text(self.chat_template)


def _first_line(exc: BaseException) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def load_processor(p: Path):
    """``AutoProcessor``; if one of its parts needs a backend that is not installed (an ImportError), the
    ``ImageTextProcessor`` made of the tokenizer, the image processor and the chat template."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(p)
    except ImportError:
        return ImageTextProcessor.from_pretrained(p)


def load_backbone(path: str | None, dtype: str = "float32", device: str = "cpu", attn_implementation: str = "sdpa",
                  allow_missing: bool = False):
    """Load (model, processor) from a local directory with the generic Auto classes onto ``device``; never touches
    a hub. ``device`` is a config value (auto, cpu, cuda:N)."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from fcit.models.device import enable_tf32, resolve_device

    hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    p = resolve_model_path(path)
    try:
        processor = load_processor(p)
        # Its multi-line load report would bury the one-line error check_loading_info gives for the same keys.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        # device_map loads the weights straight onto the GPU: a 7B model never sits in host memory first.
        placement = {"device_map": dev} if dev.type != "cpu" else {}
        try:
            model, info = AutoModelForImageTextToText.from_pretrained(
                p, dtype=getattr(torch, dtype), attn_implementation=attn_implementation, output_loading_info=True,
                **placement)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as exc:  # noqa: BLE001 - surface the first line of whatever HF raised
        raise FcitError(f"model.path: cannot load {p}: {_first_line(exc)}") from None
    check_loading_info(info, p, allow_missing)
    if dev.type == "cuda":
        enable_tf32()
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, processor
