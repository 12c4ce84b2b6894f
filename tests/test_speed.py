"""The fast training path (issue 13) against the reference computation it replaces."""

import copy
import dataclasses

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
from test_experiment import cache_dir, small_base, smoke_cfg  # noqa: F401 (fixtures)

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


# -- compiled decoder layers (train.compile) ----------------------------------------------------------------------
def _subspaces(base):
    # DISCO's layer as it trains: slot 1 learns while slot 0 is summed in frozen
    model = attach_subspace_lora(copy.deepcopy(base), SubspaceLoraConfig(num_subspaces=3, rank=4, alpha=8.0,
                                                                          target=TARGET))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every slot non-zero, the frozen one included
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    set_active(model, 1, frozen_on=[0])
    return model


def _lora_dropout(base):
    return _lora(base, dropout=0.2)  # the compiled layers must draw the eager layers' masks


@pytest.mark.parametrize("adapter", [_lora, _lora_dropout, _subspaces])
def test_compiled_layers_train_as_the_eager_ones_and_are_switched_off_afterwards(micro_backbone, micro_samples,
                                                                                adapter):
    from fcit.models.compiled import training_compiled
    from fcit.models.structure import decoder_layers

    base, processor = micro_backbone
    res = {}
    for compiled in (False, True):
        model = adapter(base)
        cfg = TrainConfig(local_epochs=3, batch_size=4, compile=compiled)  # batches of 4 and of 2: one graph
        res[compiled] = local_train(model, Batcher(model, processor), get_state(model), micro_samples, cfg, seed=7)
        _, layers = decoder_layers(model)
        # generation runs the eager layers, and a model sent to a worker carries no compiled function
        assert all(layer._compiled_call_impl is None for layer in layers)
        copy.deepcopy(model)
    assert res[True].loss == pytest.approx(res[False].loss, rel=1e-4)
    _close(res[True].state, res[False].state, tol=1e-4)
    assert res[True].state.keys() == res[False].state.keys()
    # the block really switches the layers to a compiled callable, and a one-sample batch runs them eagerly
    model = adapter(base)
    _, layers = decoder_layers(model)
    batcher = Batcher(model, processor)
    calls = []
    with training_compiled(model, True) as n:
        assert n == len(layers) and all(layer._compiled_call_impl is not None for layer in layers)
        real = layers[0]._compiled_call_impl
        layers[0]._compiled_call_impl = lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k)
        model.train()
        for k in (1, 3):
            answer_forward(model, batcher.train_batch(micro_samples[:k])).loss.backward()
    assert calls == [1, 3]
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_compile_auto_is_on_for_the_cpu_and_the_reference_path_stays_eager(micro_backbone, micro_samples,
                                                                           monkeypatch):
    import fcit.training.local as local
    from fcit.models.compiled import compiles, resolve_compile

    assert resolve_compile("auto", torch.device("cpu")) and not resolve_compile("auto", torch.device("cuda"))
    assert resolve_compile(True, torch.device("cuda")) and not resolve_compile(False, torch.device("cpu"))
    assert compiles(TrainConfig(), torch.device("cpu")) and not compiles(TrainConfig(fused=False, compile=True),
                                                                        torch.device("cpu"))
    seen = []
    real = local.training_compiled
    monkeypatch.setattr(local, "training_compiled", lambda m, on: seen.append(on) or real(m, False))
    base, processor = micro_backbone
    for fused in (True, False):
        model = _lora(base)
        local_train(model, Batcher(model, processor), get_state(model), micro_samples[:2], TrainConfig(fused=fused),
                    seed=0, epochs=1)
    assert seen == [True, False]


def test_smoke_run_fast_path_round_losses_match_the_fp32_reference(small_base, cache_dir, tmp_path):
    """Issue 13's equivalence bar: the whole fast path (answer-only loss, fused LoRA, fused AdamW, compiled layers)
    against the reference computation, both fp32, on the smoke run's per-round losses."""
    from fcit.launch import run

    losses = {}
    for name, over in (("fast", {"train.compile": True}), ("reference", {"train.fused": False})):
        cfg = smoke_cfg(small_base, cache_dir, tmp_path, **{"model.compute_dtype": "float32", **over})
        _, res = run(cfg, tmp_path / name, progress=False)
        losses[name] = [r.loss for r in res.rounds]
    assert len(losses["fast"]) == 4
    assert losses["fast"] == pytest.approx(losses["reference"], rel=1e-4)


# -- DISCO's gated layer under autocast --------------------------------------------------------------------------
def test_gated_layer_casts_its_concatenations_once_under_autocast_and_again_after_an_update(micro_backbone,
                                                                                        micro_samples):
    base, processor = micro_backbone
    cfg = SubspaceLoraConfig(num_subspaces=3, rank=4, alpha=8.0, target=TARGET)
    model = attach_subspace_lora(copy.deepcopy(base), cfg)
    _perturb(model)
    model.eval()
    batch = Batcher(model, processor).prompt_batch(micro_samples[:3])
    gate = [[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.0, 0.1, 0.9]]
    layer = next(m for m in model.modules() if hasattr(m, "_cast"))

    def logits():
        with torch.no_grad(), gated(model, gate), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).logits.float()

    first = logits()
    cast = layer._cast[torch.bfloat16]
    assert cast[0].dtype == torch.bfloat16 and torch.equal(cast[0], layer._A_cat.to(torch.bfloat16))
    assert torch.equal(logits(), first) and layer._cast[torch.bfloat16] is cast  # reused, not cast again
    with torch.no_grad():
        layer.lora_B[2].add_(1.0)  # an update: the next gate rebuilds the concatenation and its cast
    after = logits()
    assert layer._cast[torch.bfloat16] is not cast
    assert torch.equal(layer._cast[torch.bfloat16][1], layer._B_cat.to(torch.bfloat16))
    assert not torch.equal(after, first)


def _rows_spy(monkeypatch):
    from fcit.models import answer_loss

    calls = []
    real = answer_loss._rows_forward

    def spy(layer, hidden, *args):
        calls.append(tuple(hidden.shape))
        return real(layer, hidden, *args)

    monkeypatch.setattr(answer_loss, "_rows_forward", spy)
    return calls


def _gqa(base):
    """The micro backbone with one key/value head for its two query heads (grouped-query attention)."""
    from transformers import LlavaForConditionalGeneration

    cfg = copy.deepcopy(base.config)
    cfg.text_config.num_key_value_heads = 1
    torch.manual_seed(3)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True])
def test_last_layer_runs_on_answer_rows_with_the_full_paths_loss_and_grads(micro_backbone, micro_samples,
                                                                           monkeypatch, heads, padded):
    base, processor = micro_backbone
    model = _lora(base if heads == "mha" else _gqa(base))
    model.train()
    # padded: answers of 1 to ~6 tokens, so a 4D mask and rows with fewer answer positions than others; else one
    # answer, no padding, and transformers gives the layers no mask (causal)
    answers = ["red", "a red square", "blue green red", "0.12 [0.40, 0.55]"] if padded else ["red"] * 4
    samples = [dataclasses.replace(s, answer=a, refs=(a,)) for s, a in zip(micro_samples, answers)]
    batch = Batcher(model, processor).train_batch(samples)
    assert (batch["attention_mask"] == 0).any() == padded
    calls = _rows_spy(monkeypatch)
    ref, g_ref = _loss_and_grads(model, batch, full=True)
    assert not calls  # the model's own forward runs every position
    from fcit.models import answer_loss

    mask = answer_positions(batch["labels"])
    assert int(mask.sum(1).max()) < batch["input_ids"].shape[1]  # the rows are a subset
    # a right-padded batch runs without its padding mask (causal); the rows also take transformers' 4D mask
    for keep_mask in ([False, True] if padded else [False]):
        monkeypatch.setattr(answer_loss, "_right_padded", (lambda m: False) if keep_mask else answer_loss._right_padded)
        calls.clear()
        out, g = _loss_and_grads(model, batch, full=False)
        assert calls == [tuple(batch["input_ids"].shape) + (base.config.text_config.hidden_size,)]
        assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
        _close(g, g_ref)
        assert (out.answer_logits - ref.answer_logits).abs().max() < 1e-5


def test_right_padded_masks_are_recognised():
    from fcit.models.answer_loss import _right_padded

    assert _right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not _right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding
    assert not _right_padded(torch.tensor([[1, 0, 1]])) and not _right_padded(None)


def test_answer_rows_compiled_match_eager_and_checkpointing_or_dropout_keep_the_full_layer(micro_backbone,
                                                                                          micro_samples, monkeypatch):
    from fcit.models import answer_loss
    from fcit.models.compiled import training_compiled
    from fcit.models.device import enable_gradient_checkpointing

    base, processor = micro_backbone
    model = _lora(base)
    model.train()
    batch = Batcher(model, processor).train_batch(micro_samples[:4])
    eager, g_eager = _loss_and_grads(model, batch, full=False)
    used = []
    real = answer_loss._compiled_rows
    monkeypatch.setattr(answer_loss, "_compiled_rows", lambda: used.append(1) or real())
    with training_compiled(model, True):
        out, g = _loss_and_grads(model, batch, full=False)
    assert used == [1]
    assert abs(out.loss.item() - eager.loss.item()) <= 1e-4 * eager.loss.item()
    _close(g, g_eager, tol=1e-4)
    # activation checkpointing would recompute the last layer in the backward, outside the rows' context
    assert answer_loss._rows_layer(model) is not None
    enable_gradient_checkpointing(model)
    model.train()
    assert answer_loss._rows_layer(model) is None
    calls = _rows_spy(monkeypatch)
    ck, g_ck = _loss_and_grads(model, batch, full=False)
    assert not calls and abs(ck.loss.item() - eager.loss.item()) <= 1e-5 * eager.loss.item()
    # LoRA dropout would draw masks for the answer rows only, not the reference path's masks
    dropped = _lora(base, dropout=0.2).train()
    assert answer_loss._rows_layer(dropped) is None and answer_loss._rows_layer(dropped.eval()) is not None
