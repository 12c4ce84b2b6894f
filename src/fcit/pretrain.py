"""``fcit pretrain``: build the embedded base model from scratch on the generic synthetic mixture.

No pretrained network can be downloaded here, so the embedded default is a tiny LLaVA that learns to see the
benchmark's image distribution from full scene descriptions. The mixture contains none of the 12 task formats, which
keeps zero-shot scores low and leaves every task to be learned by the continual run.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from fcit.config import Config, TrainConfig
from fcit.models.backbone import EMBEDDED_DIR, TinySpec, build_tiny, build_tokenizer
from fcit.jsonio import write_json
from fcit.models.inputs import Batcher

PRETRAIN_TRAIN = TrainConfig(lr=1e-3, projector_lr_scale=1.0, weight_decay=0.01, warmup_ratio=0.03, batch_size=32,
                             max_length=192, local_epochs=1)


def pretrain(cfg: Config, out: Optional[Path] = None, epochs: Optional[int] = None, progress: bool = True,
             spec: TinySpec = TinySpec()) -> Path:
    from fcit.data import synth
    from fcit.data.loader import load_train_file
    from fcit.training.local import local_train
    from fcit.models.lora import get_state, set_state

    out = Path(out) if out else EMBEDDED_DIR
    epochs = epochs or 6
    torch.set_num_threads(cfg.threads or max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    scfg = cfg.data.synth.model_copy(update={"image_size": spec.image_size})
    root = synth.build_pretrain(scfg, cache_dir=Path(cfg.data.root) if cfg.data.root else None, progress=progress)
    samples = load_train_file(root / "pretrain" / "train.json", "pretrain", root)
    tokenizer = build_tokenizer(synth.corpus_texts(scfg), spec.vocab_size)
    model, processor = build_tiny(tokenizer, spec, seed=cfg.seed)
    for p in model.parameters():
        p.requires_grad_(True)
    batcher = Batcher(model, processor, max_length=PRETRAIN_TRAIN.max_length)
    steps = -(-len(samples) // PRETRAIN_TRAIN.batch_size) * epochs
    bar = tqdm(total=steps, desc="pretrain", disable=not progress)
    res = local_train(model, batcher, get_state(model), samples, PRETRAIN_TRAIN, seed=cfg.seed, epochs=epochs,
                      progress=bar.update)
    bar.close()
    set_state(model, res.state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_json(out / "fcit_pretrain.json", {
        "spec": spec.__dict__,
        "synth": scfg.model_dump(),
        "generator_version": synth.GENERATOR_VERSION,
        # The mixture's own fingerprint: task makers may change between generator versions, the mixture may not.
        "mixture_sha256": hashlib.sha256((root / "pretrain" / "train.json").read_bytes()).hexdigest(),
        "epochs": epochs,
        "train": PRETRAIN_TRAIN.model_dump(),
        "seed": cfg.seed,
        "samples": len(samples),
        "mean_loss": round(res.loss, 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }, sort_keys=False)
    return out
