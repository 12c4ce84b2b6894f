"""Tiny random-init Qwen2-VL / Qwen2.5-VL checkpoints, built offline the way the real ones are laid out on disk.

What a downloaded ``Qwen/Qwen2-VL-2B-Instruct`` folder holds, at micro widths: ``config.json`` + weights, a
byte-level BPE tokenizer with Qwen's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
``<|image_pad|>``, ...; eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos), ``preprocessor_config.json`` of the
Qwen2-VL image processor (naming ``Qwen2VLProcessor`` as its processor), ``chat_template.json`` with Qwen2-VL's chat
template, and a generation config that stops at ``<|im_end|>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]

# Qwen2-VL-Instruct's chat template (as shipped in its chat_template.json).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

CORPUS = ("what colour is the square ? red blue green yes no the a of in is how many which one object scene "
          "chart bar value title answer question image number left right above below You are a helpful assistant. "
          "system user assistant 0 1 2 3 4 5 6 7 8 9 [0.40, 0.55] A B C D").split()


def qwen_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(CORPUS)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


def build_qwen(out: Path, family: str = "qwen2_vl", seed: int = 0, max_pixels: int = 64 * 64) -> Path:
    """Write a micro ``family`` ("qwen2_vl" or "qwen2_5_vl") checkpoint to ``out``: vision patch 8, merge 2 (an image
    of H x W pixels takes about H*W/256 tokens, at most ``max_pixels``/256), LM width 32, 2 layers."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, bos_token_id=None,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg, cls, processor_class = Qwen2VLConfig(text_config=text, vision_config=vision, **special), \
            Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"
    elif family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=32, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
        cfg, cls, processor_class = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special), \
            Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor"
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ip = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                  max_pixels=max_pixels)
    ip.save_pretrained(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["processor_class"] = processor_class
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_TEMPLATE}))
    return out
