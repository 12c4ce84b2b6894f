"""``fcit pretrain``: build the embedded base model from scratch, in LLaVA-1.5's two phases.

No pretrained network can be downloaded here, so the embedded default is a tiny LLaVA trained by fcit itself:

1. **Descriptions** (every weight trained): the model learns to see the benchmark's image families from full scene
   descriptions, in one register without any answer format.
2. **Generic instructions** (vision tower frozen, as in LLaVA's visual instruction tuning): questions in the
   benchmark's answer formats and LLaVA-1.5's two instruction suffixes, never asked as one of the 12 tasks asks
   (``synth.INSTRUCT``). The base then follows formats, as LLaVA-1.5 does, and the tasks are still to be learned.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from fcit.config import Config, TrainConfig
from fcit.errors import FcitError
from fcit.models.backbone import EMBEDDED_DIR, TinySpec, build_tiny, build_tokenizer
from fcit.jsonio import write_json
from fcit.models.inputs import Batcher

PRETRAIN_TRAIN = TrainConfig(lr=1e-3, projector_lr_scale=1.0, weight_decay=0.01, warmup_ratio=0.03, batch_size=32,
                             max_length=192, local_epochs=1)
INSTRUCT_TRAIN = TrainConfig(lr=5e-4, projector_lr_scale=1.0, weight_decay=0.01, warmup_ratio=0.03, batch_size=32,
                             max_length=192, local_epochs=1)


def _phase(model, processor, samples, train: TrainConfig, epochs: int, seed: int, desc: str, progress: bool):
    from fcit.training.local import local_train
    from fcit.models.lora import get_state, set_state

    batcher = Batcher(model, processor, max_length=train.max_length)
    bar = tqdm(total=-(-len(samples) // train.batch_size) * epochs, desc=desc, disable=not progress)
    res = local_train(model, batcher, get_state(model), samples, train, seed=seed, epochs=epochs, progress=bar.update)
    bar.close()
    set_state(model, res.state)
    return res


def pretrain(cfg: Config, out: Optional[Path] = None, epochs: Optional[int] = None, progress: bool = True,
             spec: TinySpec = TinySpec(), instruct_epochs: Optional[int] = None) -> Path:
    """Both phases; ``instruct_epochs=0`` stops after the descriptions (a description-only base)."""
    from fcit.data import synth
    from fcit.data.loader import load_train_file
    from fcit.models.compiled import compiles

    out = Path(out) if out else EMBEDDED_DIR
    epochs = epochs or 4
    instruct_epochs = 3 if instruct_epochs is None else instruct_epochs
    if instruct_epochs < 0 or epochs < 0:
        raise FcitError(f"pretrain: epochs must be >= 0 (got --epochs {epochs}, --instruct-epochs {instruct_epochs})")
    torch.set_num_threads(cfg.threads or max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    scfg = cfg.data.synth.model_copy(update={"image_size": spec.image_size})
    root = synth.build_pretrain(scfg, cache_dir=Path(cfg.data.root) if cfg.data.root else None, progress=progress)
    samples = load_train_file(root / "pretrain" / "train.json", "pretrain", root)
    tokenizer = build_tokenizer(synth.corpus_texts(scfg), spec.vocab_size)
    model, processor = build_tiny(tokenizer, spec, seed=cfg.seed)
    for p in model.parameters():
        p.requires_grad_(True)
    res = _phase(model, processor, samples, PRETRAIN_TRAIN, epochs, cfg.seed, "pretrain: descriptions", progress)
    t1 = time.perf_counter()
    res2, instruct = None, []
    if instruct_epochs:
        instruct = load_train_file(root / "pretrain" / "instruct.json", "instruct", root)
        from fcit.models.identity import vision_tower

        for p in vision_tower(model).parameters():
            p.requires_grad_(False)
        res2 = _phase(model, processor, instruct, INSTRUCT_TRAIN, instruct_epochs, cfg.seed + 1,
                      "pretrain: instructions", progress)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_json(out / "fcit_pretrain.json", {
        "spec": spec.__dict__,
        "synth": scfg.model_dump(),
        "generator_version": synth.generator_version(scfg),
        # Each mixture's own fingerprint: which data this base saw, whatever the generator version says.
        "mixture_sha256": hashlib.sha256((root / "pretrain" / "train.json").read_bytes()).hexdigest(),
        "epochs": epochs,
        "train": PRETRAIN_TRAIN.model_dump(),
        "seed": cfg.seed,
        "threads": torch.get_num_threads(),  # matmul reductions, and so the weights, depend on it
        # and so do compiled layers (train.compile, fused kernels) against eager ones
        "compiled": compiles(PRETRAIN_TRAIN, torch.device("cpu")),
        "samples": len(samples),
        "mean_loss": round(res.loss, 4),
        "seconds": round(t1 - t0, 1),  # phase 1, with building both mixtures and the tokenizer
        "instruct": None if res2 is None else {
            "mixture_sha256": hashlib.sha256((root / "pretrain" / "instruct.json").read_bytes()).hexdigest(),
            "epochs": instruct_epochs,
            "train": INSTRUCT_TRAIN.model_dump(),
            "frozen": "vision_tower",
            "samples": len(instruct),
            "mean_loss": round(res2.loss, 4),
            "seconds": round(time.perf_counter() - t1, 1),
        },
        "params": sum(p.numel() for p in model.parameters()),
    }, sort_keys=False)
    return out
