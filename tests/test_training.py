import copy

import torch

from fcit.config import ModelConfig, TrainConfig
from fcit.training.aggregation import fedavg
from fcit.training.local import local_train
from fcit.models.inputs import IGNORE, Batcher
from fcit.models.lora import attach_lora, get_state, trainable_names


def test_fedavg_weights_by_samples():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    out = fedavg([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(out["b"], torch.tensor([3.0]))


def test_labels_cover_only_the_answer(micro_backbone, micro_samples):
    model, processor = micro_backbone
    batcher = Batcher(model, processor)
    batch = batcher.train_batch(micro_samples[:2])
    tok = processor.tokenizer
    for row, lab in zip(batch["input_ids"], batch["labels"]):
        target = [t for t in lab.tolist() if t != IGNORE]
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]).strip() in {"red", "blue"}
    n_img = int((batch["input_ids"][0] == model.config.image_token_index).sum())
    assert n_img == (16 // 8) ** 2


def test_lora_client_update_changes_only_trainable_tensors(micro_backbone, micro_samples):
    base, processor = micro_backbone
    model = attach_lora(copy.deepcopy(base), ModelConfig(train_projector=True))
    names = trainable_names(model)
    assert names and all(("lora_" in n and "language_model" in n) or "multi_modal_projector" in n for n in names)
    assert not any("vision_tower" in n and "lora" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = get_state(model)
    res = local_train(model, Batcher(model, processor), start, micro_samples, TrainConfig(batch_size=4, lr=1e-2, local_epochs=1),
                      seed=0)
    assert set(res.state) == set(names)
    after = dict(model.named_parameters())
    for n, p in after.items():
        if n in names:
            continue
        assert torch.equal(p, before[n]), f"frozen tensor {n} changed"
    assert any(not torch.equal(res.state[n], before[n]) for n in names if "lora_B" in n)
    assert any(not torch.equal(res.state[n], before[n]) for n in names if "multi_modal_projector" in n)
    # the embedded default freezes the projector: only the LoRA trains
    default = trainable_names(attach_lora(copy.deepcopy(base), ModelConfig()))
    assert default == [n for n in names if "lora_" in n]
    assert res.num_samples == len(micro_samples) and res.steps == 2


def test_local_train_is_deterministic(micro_backbone, micro_samples):
    base, processor = micro_backbone
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = attach_lora(copy.deepcopy(base), ModelConfig())
        res = local_train(model, Batcher(model, processor), get_state(model), micro_samples, TrainConfig(batch_size=2),
                          seed=7)
        outs.append(res.state)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_vision_cache_gives_the_same_loss_and_skips_the_tower(micro_backbone, micro_samples):
    from fcit.models.vision_cache import VisionFeatureCache

    base, processor = micro_backbone
    model = attach_lora(copy.deepcopy(base), ModelConfig(train_projector=True))  # gradients to the projector
    batch = Batcher(model, processor).train_batch(micro_samples)
    with torch.no_grad():
        plain = model(**batch).loss
    cache = VisionFeatureCache(model, budget_mb=16)
    cached_first = model(**batch).loss  # grad enabled, tower frozen: still served from the cache path
    cached_again = model(**batch).loss
    assert cache.misses == len(micro_samples) and cache.hits == len(micro_samples)
    assert torch.allclose(plain, cached_first, atol=1e-6) and torch.equal(cached_first, cached_again)
    cached_again.backward()  # gradients still reach the projector through cached features
    proj = [p for n, p in model.named_parameters() if "multi_modal_projector" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj)


def test_blocks_stay_together_in_one_batch(micro_backbone, micro_samples):
    """``block=2`` (pre-training's minimal pairs): every batch holds whole pairs, in an order that still varies."""
    import pytest

    base, processor = micro_backbone
    model = attach_lora(copy.deepcopy(base), ModelConfig())
    batcher = Batcher(model, processor)
    seen = []
    real = batcher.train_batch
    batcher.train_batch = lambda ss: seen.append([int(s.id) for s in ss]) or real(ss)
    local_train(model, batcher, get_state(model), micro_samples, TrainConfig(batch_size=4), seed=3, epochs=3, block=2)
    assert len(seen) == 6 and sorted(sum(seen[:2], [])) == list(range(6))
    for ids in seen:
        pairs = [ids[k:k + 2] for k in range(0, len(ids), 2)]
        assert all(len(p) == 2 and p[0] % 2 == 0 and p[1] == p[0] + 1 for p in pairs)
    assert len({tuple(sum(seen[e * 2:e * 2 + 2], [])) for e in range(3)}) > 1  # reshuffled per epoch
    with pytest.raises(ValueError, match="must divide the batch size"):
        local_train(model, batcher, get_state(model), micro_samples, TrainConfig(batch_size=3), seed=3, block=2)
