"""``fcit pretrain``: build the embedded base model from scratch, in LLaVA-1.5's two phases and a replay of the first.

No pretrained network can be downloaded here, so the embedded default is a tiny LLaVA trained by fcit itself:

1. **Descriptions** (every weight trained): the model learns to see the benchmark's image families from full scene
   descriptions, in one register without any answer format.
2. **Generic instructions** (vision tower frozen, as in LLaVA's visual instruction tuning): questions in the
   benchmark's answer formats and LLaVA-1.5's two instruction suffixes, never asked as one of the 12 tasks asks
   (``synth.INSTRUCT``). The base then follows formats, as LLaVA-1.5 does, and the tasks are still to be learned.
   Optionally (``instruct_descriptions``) with some of phase 1's descriptions mixed in, as LLaVA-1.5's mixture keeps
   LLaVA-Instruct's detailed descriptions: without them the base forgets what phase 1 taught it to say about an
   image (a book's title, the highest bar), and only the instruction mixture's short captions remain.
   **Replay** (``replay_epochs``, default 1 on a new base): phase 2 once more with half of phase 1's descriptions
   mixed in (``replay_descriptions``). It gives back what phase 2 took from the descriptions (OCR-VQA's titles,
   the captions) without losing the formats; the embedded base is built with it (README, "Reproducing the embedded
   base model"; what it changes: docs/regime-investigation.md, "Descriptions kept in phase 2").
3. **Comparisons** (optional, ``binding_epochs``; vision tower frozen): the generic yes/no questions as minimal pairs
   (``synth.build_binding``), mixed with the instruction mixture again so that no format is lost. Without it the base
   answers yes/no at chance: it never learned to compare a word of the question with the image.

``start`` continues an existing base (recorded as ``start``) with phase 2 again (``instruct_epochs``), phase 3, or both.
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
# At 1e-3 the pairs stayed at chance for thousands of steps (and full fine-tuning on one question kind at 5e-4); at
# 3e-4 colour-at-position and presence on bar charts passed 80% within 1,000 steps (README, "FCIT-Synth in the
# paper's regime").
BINDING_TRAIN = TrainConfig(lr=3e-4, projector_lr_scale=1.0, weight_decay=0.01, warmup_ratio=0.03, batch_size=32,
                            max_length=192, local_epochs=1)


def tiny_spec(lm_hidden: Optional[int] = None, lm_intermediate: Optional[int] = None, lm_layers: Optional[int] = None,
              lm_heads: Optional[int] = None) -> TinySpec:
    """The embedded model's size with its language model resized. Unset widths follow ``lm_hidden`` in the default's
    proportions (feed-forward 8/3 of it in multiples of 64, heads of 48 dimensions), so ``lm_hidden=384`` is the
    default twice as wide. Raises FcitError for a size the model cannot take."""
    base = TinySpec()
    hidden = base.lm_hidden if lm_hidden is None else lm_hidden
    inter = lm_intermediate if lm_intermediate is not None else (
        base.lm_intermediate if lm_hidden is None else max(64, round(hidden * 8 / 3 / 64) * 64))
    heads = lm_heads if lm_heads is not None else (base.lm_heads if lm_hidden is None else max(1, hidden // 48))
    layers = base.lm_layers if lm_layers is None else lm_layers
    sizes = {"--lm-hidden": hidden, "--lm-intermediate": inter, "--lm-layers": layers, "--lm-heads": heads}
    for name, v in sizes.items():
        if v < 1:
            raise FcitError(f"pretrain: {name} must be >= 1 (got {v})")
    if hidden % heads or (hidden // heads) % 2:
        raise FcitError(f"pretrain: --lm-hidden {hidden} must split into --lm-heads {heads} heads of an even size "
                        "(rotary embeddings)")
    return TinySpec(lm_hidden=hidden, lm_intermediate=inter, lm_layers=layers, lm_heads=heads)


def _phase(model, processor, samples, train: TrainConfig, epochs: int, seed: int, desc: str, progress: bool,
           block: int = 1):
    from fcit.training.local import local_train
    from fcit.models.lora import get_state, set_state

    batcher = Batcher(model, processor, max_length=train.max_length)
    bar = tqdm(total=-(-len(samples) // train.batch_size) * epochs, desc=desc, disable=not progress)
    res = local_train(model, batcher, get_state(model), samples, train, seed=seed, epochs=epochs, progress=bar.update,
                      block=block)
    bar.close()
    set_state(model, res.state)
    return res


def pretrain(cfg: Config, out: Optional[Path] = None, epochs: Optional[int] = None, progress: bool = True,
             spec: TinySpec = TinySpec(), instruct_epochs: Optional[int] = None, binding_epochs: int = 0,
             start: Optional[Path] = None, binding_pairs: Optional[int] = None, instruct_descriptions: int = 0,
             replay_epochs: Optional[int] = None, replay_descriptions: Optional[int] = None) -> Path:
    """Phases 1 and 2, the replay, then phase 3 for ``binding_epochs`` > 0; ``instruct_epochs=0`` stops after the
    descriptions (a description-only base). With ``start`` (a base folder), that base continued with phase 2 for
    ``instruct_epochs`` (default 0 there) and then phase 3 for ``binding_epochs``. ``binding_pairs``: the first that
    many of the built pairs (default all, ``synth.BINDING_PAIRS``), a smaller share of phase 3.
    ``instruct_descriptions``: phase 2's mixture gains that many of phase 1's descriptions (a seeded draw).
    ``replay_epochs`` (default 1 on a new base with phase 2, else 0): phase 2 again with ``replay_descriptions``
    of phase 1's descriptions (default half of them), the same pass as continuing the two-phase base with
    ``start``, ``instruct_epochs=replay_epochs`` and ``instruct_descriptions=replay_descriptions``."""
    from fcit.data import synth
    from fcit.data.loader import load_train_file
    from fcit.models.compiled import compiles

    out = Path(out) if out else EMBEDDED_DIR
    epochs = epochs or 4
    instruct_epochs = (0 if start is not None else 3) if instruct_epochs is None else instruct_epochs
    if binding_pairs is not None and not 1 <= binding_pairs <= synth.BINDING_PAIRS:
        raise FcitError(f"pretrain: --binding-pairs must be 1..{synth.BINDING_PAIRS} (got {binding_pairs})")
    if instruct_epochs < 0 or epochs < 0 or binding_epochs < 0:
        raise FcitError(f"pretrain: epochs must be >= 0 (got --epochs {epochs}, --instruct-epochs {instruct_epochs}, "
                        f"--binding-epochs {binding_epochs})")
    if start is not None and spec != TinySpec():
        raise FcitError("pretrain: --from continues a base at its own size; --lm-* options only apply to a new base")
    if instruct_descriptions < 0 or (instruct_descriptions and not instruct_epochs):
        raise FcitError(f"pretrain: --instruct-descriptions {instruct_descriptions} needs phase 2 (--instruct-epochs "
                        f"N >= 1) and a count >= 0")
    if instruct_descriptions > cfg.data.synth.n_pretrain:  # checked before any training
        raise FcitError(f"pretrain: --instruct-descriptions {instruct_descriptions}: phase 1 has only "
                        f"{cfg.data.synth.n_pretrain} descriptions (data.synth.n_pretrain)")
    no_new_phase_2 = start is not None or not instruct_epochs  # a replay repeats phase 2 of a base built here
    if replay_epochs is not None and (replay_epochs < 0 or replay_epochs and no_new_phase_2):
        raise FcitError(f"pretrain: --replay-epochs {replay_epochs} repeats phase 2 of a new base (--instruct-epochs N "
                        ">= 1, no --from; with --from, --instruct-epochs N --instruct-descriptions M is the replay)")
    replay_epochs = (1 if start is None and instruct_epochs else 0) if replay_epochs is None else replay_epochs
    replay_descriptions = cfg.data.synth.n_pretrain // 2 if replay_descriptions is None else replay_descriptions
    if replay_epochs and not 0 <= replay_descriptions <= cfg.data.synth.n_pretrain:
        raise FcitError(f"pretrain: --replay-descriptions {replay_descriptions}: phase 1 has "
                        f"{cfg.data.synth.n_pretrain} descriptions (data.synth.n_pretrain)")
    if start is not None:
        return _continue(cfg, Path(start), out, instruct_epochs, instruct_descriptions, binding_epochs, progress,
                         binding_pairs)
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
    instruct_record, instruct, replay = None, [], None
    if instruct_epochs:
        instruct_record, instruct = _instruct_phase(cfg, root, model, processor, instruct_epochs,
                                                    instruct_descriptions, progress, descriptions=samples)
        instruct_record["seconds"] = round(time.perf_counter() - t1, 1)
    if replay_epochs:
        t = time.perf_counter()
        replay, _ = _instruct_phase(cfg, root, model, processor, replay_epochs, replay_descriptions, progress,
                                    descriptions=samples, desc="pretrain: replay")
        replay["seconds"] = round(time.perf_counter() - t, 1)
    t2 = time.perf_counter()
    binding = None
    if binding_epochs:
        binding = _binding_phase(cfg, scfg, model, processor, instruct, binding_epochs, progress, binding_pairs)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if binding is not None:
        binding["seconds"] = round(time.perf_counter() - t2, 1)
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
        "instruct": instruct_record,
        "replay": replay,
        "binding": binding,
        "params": sum(p.numel() for p in model.parameters()),
    }, sort_keys=False)
    return out


def _freeze_vision_only(model) -> None:
    """Phases 2 and 3 train the projector and the language model; the vision tower keeps phase 1's weights."""
    from fcit.models.identity import vision_tower

    for p in model.parameters():
        p.requires_grad_(True)
    for p in vision_tower(model).parameters():
        p.requires_grad_(False)


def _instruct_phase(cfg: Config, root: Path, model, processor, instruct_epochs: int, n_descriptions: int,
                    progress: bool, descriptions: Optional[list] = None,
                    desc: str = "pretrain: instructions") -> tuple[dict, list]:
    """Phase 2: the instruction mixture under ``root`` (plus ``n_descriptions`` of phase 1's, drawn with the seed),
    vision tower frozen. Returns its record and the instruction samples (phase 3 mixes them in again)."""
    import random

    from fcit.data.loader import load_train_file
    instruct = load_train_file(root / "pretrain" / "instruct.json", "instruct", root)
    mixture = instruct
    if n_descriptions:
        if descriptions is None:
            descriptions = load_train_file(root / "pretrain" / "train.json", "pretrain", root)
        mixture = instruct + random.Random(cfg.seed).sample(descriptions, n_descriptions)
    _freeze_vision_only(model)
    res = _phase(model, processor, mixture, INSTRUCT_TRAIN, instruct_epochs, cfg.seed + 1, desc, progress)
    return {
        "mixture_sha256": hashlib.sha256((root / "pretrain" / "instruct.json").read_bytes()).hexdigest(),
        "epochs": instruct_epochs,
        "train": INSTRUCT_TRAIN.model_dump(),
        "frozen": "vision_tower",
        "samples": len(instruct),
        "descriptions": n_descriptions,
        "mean_loss": round(res.loss, 4),
    }, instruct


def _binding_phase(cfg: Config, scfg, model, processor, instruct: list, binding_epochs: int, progress: bool,
                   binding_pairs: Optional[int] = None) -> dict:
    """Phase 3: the minimal pairs and the instruction mixture together, vision tower frozen. Returns its record."""
    from fcit.data import synth
    from fcit.data.loader import load_train_file

    cache = Path(cfg.data.root) if cfg.data.root else None
    root = synth.build_binding(scfg, cache_dir=cache, progress=progress)
    pairs = load_train_file(root / synth.BINDING_FILE, "binding", root)
    if binding_pairs is not None:
        pairs = pairs[: 2 * binding_pairs]
    if not instruct:  # phase 3 alone (--from): the instruction mixture of the same benchmark root
        mixture = synth.build_pretrain(scfg, cache_dir=cache, progress=progress)
        instruct = load_train_file(mixture / "pretrain" / "instruct.json", "instruct", mixture)
    _freeze_vision_only(model)
    # Both members of a pair in one batch (block=2); the instructions ride along two by two, an even count.
    mixed = pairs + instruct[: len(instruct) // 2 * 2]
    res = _phase(model, processor, mixed, BINDING_TRAIN, binding_epochs, cfg.seed + 2, "pretrain: comparisons",
                 progress, block=2)
    return {
        "mixture_sha256": hashlib.sha256((root / synth.BINDING_FILE).read_bytes()).hexdigest(),
        "pairs": len(pairs) // 2,
        "with_instructions": len(mixed) - len(pairs),
        "pairs_per_batch": "both members in one batch",
        "epochs": binding_epochs,
        "train": BINDING_TRAIN.model_dump(),
        "frozen": "vision_tower",
        "mean_loss": round(res.loss, 4),
    }


def _continue(cfg: Config, start: Path, out: Path, instruct_epochs: int, instruct_descriptions: int,
              binding_epochs: int, progress: bool, binding_pairs: Optional[int] = None) -> Path:
    """Phase 2 and/or phase 3 from an existing base: its weights, tokenizer and record (kept under ``start``)."""
    import json

    from fcit.data import synth
    from fcit.models.backbone import load_backbone

    if not (instruct_epochs or binding_epochs):
        raise FcitError("pretrain: --from continues a base with phase 2 (--instruct-epochs N), phase 3 "
                        "(--binding-epochs N) or both; give at least one")
    record = start / "fcit_pretrain.json"
    if not record.is_file():
        raise FcitError(f"pretrain: --from {start}: no fcit_pretrain.json there (not a base fcit pre-trained)")
    if out.resolve() == start.resolve():
        raise FcitError(f"pretrain: --out must differ from --from ({start}): the base to continue is read, "
                        "not replaced")
    torch.set_num_threads(cfg.threads or max(1, torch.get_num_threads()))
    before = json.loads(record.read_text())
    model, processor = load_backbone(str(start))
    spec_size = int(before["spec"]["image_size"])
    scfg = cfg.data.synth.model_copy(update={"image_size": spec_size})
    run = {"seed": cfg.seed, "threads": torch.get_num_threads(), "generator_version": synth.generator_version(scfg)}
    instruct_record, instruct, binding = before.get("instruct"), [], None
    t0 = time.perf_counter()
    if instruct_epochs:
        root = synth.build_pretrain(scfg, cache_dir=Path(cfg.data.root) if cfg.data.root else None,
                                    progress=progress)
        instruct_record, instruct = _instruct_phase(cfg, root, model, processor, instruct_epochs,
                                                    instruct_descriptions, progress)
        instruct_record = {**instruct_record, "seconds": round(time.perf_counter() - t0, 1), **run}
    t1 = time.perf_counter()
    if binding_epochs:
        binding = _binding_phase(cfg, scfg, model, processor, instruct, binding_epochs, progress, binding_pairs)
        binding = {**binding, "seconds": round(time.perf_counter() - t1, 1), **run}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    weights = hashlib.sha256((start / "model.safetensors").read_bytes()).hexdigest()
    write_json(out / "fcit_pretrain.json", {
        **{k: v for k, v in before.items() if k not in ("instruct", "binding", "start")},
        "instruct": instruct_record,
        "start": {"path": str(start), "model_sha256": weights, "instruct": before.get("instruct"),
                  "binding": before.get("binding")},
        "binding": binding,
    }, sort_keys=False)
    return out
