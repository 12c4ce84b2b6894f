"""The fast training path (issue 13) against the reference computation it replaces."""

import copy

import pytest
import torch

from fcit.config import Config, ModelConfig, TrainConfig
from fcit.methods.base import StageInfo
from fcit.methods.lwf import Lwf
from fcit.models.answer_loss import answer_forward, answer_positions
from fcit.models.fused_lora import set_fused
from fcit.models.inputs import Batcher
from fcit.models.lora import attach_lora, get_state, set_state
from fcit.models.subspace_lora import SubspaceLoraConfig, attach_subspace_lora, gated, set_active
from fcit.training.local import local_train

TARGET = r".*language_model.*\.(gate_proj|up_proj|down_proj)"


def _perturb(model, scale=0.2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _lora(base, dropout=0.0):
    torch.manual_seed(0)
    model = attach_lora(copy.deepcopy(base), ModelConfig(lora={"dropout": dropout}))
    _perturb(model)  # B starts at zero: a zero LoRA would hide a wrong B path
    return model


def _loss_and_grads(model, batch, full, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = answer_forward(model, batch, full=full)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _close(a: dict, b: dict, tol=1e-5):
    assert a.keys() == b.keys() and a
    for k in a:
        assert (a[k] - b[k]).abs().max() <= tol * max(1.0, float(b[k].abs().max())), k


@pytest.mark.parametrize("fused_layers", [False, True])
def test_loss_on_answers_equals_full_logits_loss(micro_backbone, micro_samples, fused_layers):
    base, processor = micro_backbone
    model = _lora(base)
    model.train()
    set_fused(model, fused_layers)
    batch = Batcher(model, processor).train_batch(micro_samples[:5])
    ref, g_ref = _loss_and_grads(model, batch, full=True)
    out, g = _loss_and_grads(model, batch, full=False)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    _close(g, g_ref)
    # the logits LwF distils are the full forward's at the answer positions
    mask = answer_positions(batch["labels"])
    assert int(mask.sum()) == out.answer_logits.shape[0] > 0
    assert (out.answer_logits - ref.answer_logits).abs().max() < 1e-5


def test_fused_peft_layer_matches_peft_forward_and_grads_and_keeps_names(micro_backbone, micro_samples):
    base, processor = micro_backbone
    model = _lora(base, dropout=0.1)
    model.train()
    keys = list(model.state_dict())
    batch = Batcher(model, processor).train_batch(micro_samples[:5])
    assert set_fused(model, False) == 6
    ref, g_ref = _loss_and_grads(model, batch, full=True, seed=3)
    set_fused(model, True)
    assert {type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")} == {"FusedPeftLinear"}
    assert list(model.state_dict()) == keys
    out, g = _loss_and_grads(model, batch, full=True, seed=3)  # same seed: the same dropout masks
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    _close(g, g_ref)
    # a state saved from the fused model loads into a plain PEFT model and gives the same logits
    plain = _lora(base)
    set_fused(plain, False)
    set_state(plain, get_state(model))
    model.eval(), plain.eval()
    with torch.no_grad():
        assert (model(**batch).logits - plain(**batch).logits).abs().max() < 1e-5


def test_fused_subspace_layer_matches_reference_forward_and_grads(micro_backbone, micro_samples):
    base, processor = micro_backbone
    cfg = SubspaceLoraConfig(num_subspaces=3, rank=4, alpha=8.0, target=TARGET)
    model = attach_subspace_lora(copy.deepcopy(base), cfg)
    set_active(model, 1, frozen_on=[0])  # the multi-slot path, slot 1 training
    _perturb(model)
    batch = Batcher(model, processor).train_batch(micro_samples[:4])
    model.train()
    for mode in ("active", "gated"):
        res = {}
        for fused in (False, True):
            set_fused(model, fused)
            if mode == "gated":
                with gated(model, [[0.2, 0.5, 0.3]] * 4):
                    res[fused] = _loss_and_grads(model, batch, full=False)
            else:
                res[fused] = _loss_and_grads(model, batch, full=False)
        assert abs(res[True][0].loss.item() - res[False][0].loss.item()) <= 1e-5 * res[False][0].loss.item()
        _close(res[True][1], res[False][1])


def test_lwf_on_answer_logits_equals_lwf_on_full_logits(micro_backbone, micro_samples):
    base, processor = micro_backbone
    model = _lora(base)
    batcher = Batcher(model, processor)
    cfg = Config.model_validate({"method": {"name": "lwf", "params": {"alpha": 1.0, "temperature": 2.0}}})
    lwf = Lwf(cfg)
    info = StageInfo(stage=1, num_stages=2, tasks=[1])
    g = get_state(model)
    lwf.before_stage(model, info, g)
    _perturb(model, scale=0.1, seed=5)
    hook = lwf.client_loss(info, g)
    model.train()
    batch = batcher.train_batch(micro_samples[:4])
    full = model(**batch)
    ref = hook(model, batch, full.loss, full)
    fast = answer_forward(model, batch)
    got = hook(model, batch, fast.loss, fast)
    assert got.item() > fast.loss.item() + 1e-6  # the distillation term is there
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_batcher_tokenizes_each_sample_once(micro_backbone, micro_samples):
    base, processor = micro_backbone
    batcher = Batcher(base, processor)
    first = batcher.train_batch(micro_samples)
    calls = []
    real = batcher.tok.__call__
    batcher.tok = type("Counting", (), {"__call__": lambda self, *a, **k: calls.append(1) or real(*a, **k),
                                         "__getattr__": lambda self, n: getattr(processor.tokenizer, n)})()
    again = batcher.train_batch(micro_samples)
    assert not calls
    assert all(torch.equal(first[k], again[k]) for k in first)
    fresh = Batcher(base, processor).train_batch(micro_samples)
    assert all(torch.equal(first[k], fresh[k]) for k in first)


def test_local_train_fused_matches_reference_path(micro_backbone, micro_samples):
    base, processor = micro_backbone
    res = {}
    for fused in (False, True):
        model = _lora(base)
        cfg = TrainConfig(local_epochs=2, batch_size=3, fused=fused)
        start = get_state(model)
        res[fused] = local_train(model, Batcher(model, processor), start, micro_samples, cfg, seed=7)
    assert res[True].loss == pytest.approx(res[False].loss, rel=1e-4)
    _close(res[True].state, res[False].state, tol=1e-4)
