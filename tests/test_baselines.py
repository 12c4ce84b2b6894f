"""M-LoRA, O-LoRA and MoELoRA (reference section 10) on the micro backbone."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fcit.config import Config
from fcit.errors import FcitError
from fcit.training.aggregation import fedavg
from fcit.training.local import local_train
from fcit.methods.base import StageInfo, Upload
from fcit.methods.mlora import MLora
from fcit.methods.moelora import MoELora, MoELoraLinear, moe_layers
from fcit.methods.olora import OLora, orthogonality_penalty
from fcit.models.inputs import Batcher
from fcit.models.lora import set_state, trainable_names
from fcit.models.subspace_lora import subspace_layers, subspace_names

PROJ = "multi_modal_projector"


def _cfg(name, stages=2, setting="task", train_projector=True, **params):
    # The projector trained, as the reference (and the llava-1.5-7b preset) does: it then travels with every upload.
    return Config.model_validate({
        "seed": 0,
        "model": {"train_projector": train_projector},
        "method": {"name": name, "params": params},
        "train": {"batch_size": 3, "lr": 1e-2},
        "scenario": {"setting": setting, "rounds": 1, "num_clients": 2, "clients_per_round": 2, "stages": stages},
    })


def _build(cls, micro_backbone, stages=2, train_projector=True, **params):
    base, processor = micro_backbone
    method = cls(_cfg(cls.name, stages=stages, train_projector=train_projector, **params))
    model = method.setup(copy.deepcopy(base))
    batcher = Batcher(model, processor)
    method.bind(processor, batcher)
    return method, model, batcher


@torch.no_grad()
def _randomise(model, seed=0, A=True):
    gen = torch.Generator().manual_seed(seed)
    for _, layer in subspace_layers(model):
        for p in (*layer.lora_A, *layer.lora_B) if A else layer.lora_B:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@torch.no_grad()
def _expected(layer, x, slots):
    """W x + s * sum over ``slots`` of B_j A_j x, written out by hand."""
    y = layer.base_layer(x)
    for j in slots:
        y = y + layer.scaling * F.linear(F.linear(x, layer.lora_A[j]), layer.lora_B[j])
    return y


def _names(model, *slots):
    return {n for j in slots for n in subspace_names(model, j)}


def _proj(model):
    return {n for n, _ in model.named_parameters() if PROJ in n}


def _stage(method, model, batcher, gs, t, shards, num_stages=2, after_client=None):
    """One stage of one round through the hooks, in the engine's order."""
    info = StageInfo(stage=t, num_stages=num_stages, tasks=[t])
    gs = method.before_stage(model, info, gs)
    plan = method.plan_round(info, [method.client_identity(model, s, info) for s in shards], gs)
    plans = plan.clients
    hook = method.client_loss(info, gs)
    results = []
    for i, (s, p) in enumerate(zip(shards, plans)):
        method.before_local(model, p)
        results.append(local_train(model, batcher, gs, s, method.cfg.train, seed=10 * t + i, loss_hook=hook))
        if after_client is not None:
            after_client(model, results[-1])
    new = method.aggregate(info, plan, [Upload(i, r) for i, r in enumerate(results)], gs)
    set_state(model, new)
    return method.after_stage(model, info, new, []), results, plans


# ---------------------------------------------------------------------------------------------------------------
# params
# ---------------------------------------------------------------------------------------------------------------
def test_slot_count_params_and_summaries():
    assert MLora(_cfg("mlora", stages=None)).num_slots == 8
    assert MLora(_cfg("mlora", stages=None, setting="capability")).num_slots == 4
    assert MLora(_cfg("mlora", stages=3)).num_slots == 3
    assert MLora(_cfg("mlora", stages=3, max_stages=5)).num_slots == 5
    assert OLora(_cfg("olora", **{"lambda": 0.1})).params.lambda_ == 0.1
    assert OLora(_cfg("olora", lambda_=0.2)).params.lambda_ == 0.2
    assert OLora(_cfg("olora")).params.lambda_ == 0.5
    with pytest.raises(FcitError, match="unknown key"):
        MoELora(_cfg("moelora", experts=3))
    for cls in (MLora, OLora, MoELora):
        assert cls.summary and "\n" not in cls.summary
    assert (MLora.name, OLora.name, MoELora.name) == ("mlora", "olora", "moelora")


def test_stage_beyond_the_slots_fails_loudly(micro_backbone):
    m, model, _ = _build(MLora, micro_backbone, stages=2, rank=2)
    with pytest.raises(FcitError, match="max_stages"):
        m.before_stage(model, StageInfo(stage=2, num_stages=3, tasks=[2]), {})


# ---------------------------------------------------------------------------------------------------------------
# M-LoRA / O-LoRA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_projector", [True, False])
@pytest.mark.parametrize("cls", [MLora, OLora])
def test_slot_per_stage_frozen_slots_and_uploads(cls, train_projector, micro_backbone, micro_samples):
    m, model, batcher = _build(cls, micro_backbone, stages=2, rank=2, train_projector=train_projector)
    proj = _proj(model) if train_projector else set()  # a frozen projector neither trains nor travels
    gs = m.initial_state(model)
    assert set(gs) == _names(model, 0, 1) | proj
    shards = [micro_samples[:3], micro_samples[3:]]

    # ---- stage 0: slot 0 alone trains and travels
    assert m.client_loss(StageInfo(stage=0, num_stages=2, tasks=[0]), gs) is None
    gs1, results, plans = _stage(m, model, batcher, gs, 0, shards)
    assert plans == [{"slot": 0}, {"slot": 0}]
    for r in results:
        assert set(r.state) == _names(model, 0) | proj
    want = fedavg([r.state for r in results], [3, 3])
    assert all(torch.allclose(gs1[k], v) for k, v in want.items())
    assert all(torch.equal(gs1[k], gs[k]) for k in _names(model, 1))
    assert any(not torch.equal(gs1[k], gs[k]) for k in _names(model, 0) if "lora_B" in k)
    assert m.last_trained == 0
    frozen = {k: gs1[k].clone() for k in _names(model, 0)}

    # ---- stage 1: slot 0 is in the forward but frozen, bit for bit, through every client's local training
    if cls is OLora:
        assert m.client_loss(StageInfo(stage=1, num_stages=2, tasks=[1]), gs1) is not None
    params = dict(model.named_parameters())

    def check(model, res):
        assert set(res.state) == _names(model, 1) | proj
        assert all(torch.equal(params[k], v) for k, v in frozen.items())

    m.before_local(model, {"slot": 1})
    _, layer = subspace_layers(model)[0]
    x = torch.randn(2, 3, layer.base_layer.in_features)
    with torch.no_grad():
        assert torch.allclose(layer(x), _expected(layer, x, [0, 1]), atol=1e-6)
    gs2, results, plans = _stage(m, model, batcher, gs1, 1, shards, after_client=check)
    assert plans == [{"slot": 1}, {"slot": 1}]
    assert all(torch.equal(gs2[k], v) for k, v in frozen.items())
    assert any(not torch.equal(gs2[k], gs1[k]) for k in _names(model, 1) if "lora_B" in k)
    want = fedavg([r.state for r in results], [3, 3])
    assert all(torch.allclose(gs2[k], v) for k, v in want.items())
    # after the stage the model is left in inference mode: both slots on, nothing of the adapter trains
    assert m.last_trained == 1
    assert not any(params[k].requires_grad for k in _names(model, 0, 1))
    # the server-side bookkeeping survives a checkpoint
    again = cls(m.cfg)
    again.load_state_dict(m.state_dict())
    assert again.last_trained == 1


def test_mlora_inference_is_the_sum_of_the_learned_slots(micro_backbone, micro_samples):
    base, processor = micro_backbone
    m, model, batcher = _build(MLora, micro_backbone, stages=3, rank=2)
    _randomise(model)  # slot 2 too: it must stay out since it was never trained
    batch = batcher.train_batch(micro_samples[:2])
    model.eval()
    with torch.no_grad(), m.inference_gate(model, micro_samples, 0):
        plain = model(**batch).logits  # nothing learned yet: the bare backbone
    with torch.no_grad():
        assert torch.allclose(plain, copy.deepcopy(base).eval()(**batch).logits, atol=1e-5)

    m.before_local(model, {"slot": 1})  # a training mode to come back to
    m.after_stage(model, StageInfo(stage=1, num_stages=3, tasks=[1]), {}, [])
    m.before_local(model, {"slot": 1})
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in subspace_layers(model):
            w = merged.get_submodule(name).weight
            w += layer.scaling * sum(layer.lora_B[j] @ layer.lora_A[j] for j in (0, 1))
    with torch.no_grad(), m.inference_gate(model, micro_samples, 0):
        for _, layer in subspace_layers(model):
            x = torch.randn(2, 4, layer.base_layer.in_features)
            assert torch.allclose(layer(x), _expected(layer, x, [0, 1]), atol=1e-5)
        got = model(**batch).logits
        assert not any(p.requires_grad for n, p in model.named_parameters() if n in _names(model, 0, 1, 2))
    with torch.no_grad():
        assert torch.allclose(got, merged.eval()(**batch).logits, atol=1e-4)
    # the training mode comes back after the block
    assert all(p.requires_grad for n, p in model.named_parameters() if n in _names(model, 1))


def test_olora_penalty_zero_iff_orthogonal(micro_backbone):
    m, model, _ = _build(OLora, micro_backbone, stages=3, rank=2, **{"lambda": 0.25})
    layers = subspace_layers(model)
    with torch.no_grad():
        for _, layer in layers:
            eye = torch.eye(layer.lora_A[0].shape[1])
            for j in range(3):
                layer.lora_A[j].copy_(eye[2 * j : 2 * j + 2])  # disjoint coordinates: mutually orthogonal rows
    assert float(orthogonality_penalty(model, 0)) == 0.0
    assert float(orthogonality_penalty(model, 1)) == 0.0
    assert float(orthogonality_penalty(model, 2)) == 0.0
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_A[2][0, 0] = 3.0  # row 0 of A_2 now overlaps row 0 of A_0 (and only that)
            layer.lora_A[2][1, 2] = -0.5  # row 1 overlaps row 0 of A_1
    assert torch.isclose(orthogonality_penalty(model, 2), torch.tensor(3.5 * len(layers)))
    assert float(orthogonality_penalty(model, 1)) == 0.0

    # random A: the stacked product equals the per-slot sum of |A_t A_s^T|
    _randomise(model, seed=3)
    brute = sum((l.lora_A[2] @ l.lora_A[s].T).abs().sum() for _, l in layers for s in (0, 1))
    assert float(orthogonality_penalty(model, 2)) > 0
    assert torch.isclose(orthogonality_penalty(model, 2), brute)

    # the client hook: loss + lambda * penalty, whose gradient reaches only the slot being trained
    info = StageInfo(stage=2, num_stages=3, tasks=[2])
    m.before_stage(model, info, {})
    hook = m.client_loss(info, {})
    out = hook(model, {}, torch.tensor(1.0), None)
    assert torch.isclose(out, 1.0 + 0.25 * brute)
    out.backward()
    _, layer = layers[0]
    assert layer.lora_A[2].grad is not None and float(layer.lora_A[2].grad.abs().sum()) > 0
    assert layer.lora_A[0].grad is None and layer.lora_A[1].grad is None
    assert OLora(_cfg("olora", **{"lambda": 0})).client_loss(info, {}) is None


# ---------------------------------------------------------------------------------------------------------------
# MoELoRA
# ---------------------------------------------------------------------------------------------------------------
def test_moelora_per_token_router_forward_and_gradients(micro_backbone, micro_samples):
    m, model, batcher = _build(MoELora, micro_backbone)
    layers = moe_layers(model)
    assert layers and len(layers) == len(subspace_layers(model))
    _, layer = layers[0]
    assert isinstance(layer, MoELoraLinear) and layer.num_subspaces == 4 and layer.rank == 2
    assert layer.scaling == pytest.approx(16.0 / 8)  # Finetune's alpha / r
    expect = {n for n, _ in model.named_parameters() if ".lora_" in n or n.endswith(".router.weight")} | _proj(model)
    assert set(trainable_names(model)) == expect
    assert set(m.initial_state(model)) == expect

    _randomise(model, A=False)  # B = 0 at init would hide the router's and A's gradients
    x = torch.randn(2, 5, layer.base_layer.in_features)
    with torch.no_grad():
        g = torch.softmax(x @ layer.router.weight.T, dim=-1)  # (2, 5, E): one gate per token
        want = layer.base_layer(x)
        for e in range(4):
            want = want + layer.scaling * g[..., e : e + 1] * F.linear(F.linear(x, layer.lora_A[e]), layer.lora_B[e])
        assert torch.allclose(layer(x), want, atol=1e-6)  # cached (no-grad) path
    assert torch.allclose(layer(x), want, atol=1e-6)  # live (training) path
    assert not torch.allclose(g[0, 0], g[0, 1])  # tokens are routed differently

    model.train()
    loss = model(**batcher.train_batch(micro_samples[:3])).loss
    loss.backward()
    for _, layer in layers:
        assert float(layer.router.weight.grad.abs().sum()) > 0
        for p in (*layer.lora_A, *layer.lora_B):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)


def test_moelora_two_stages_through_the_hooks(micro_backbone, micro_samples):
    m, model, batcher = _build(MoELora, micro_backbone)
    gs = start = m.initial_state(model)
    names = set(gs)
    routers = [k for k in names if k.endswith(".router.weight")]
    shards = [micro_samples[:3], micro_samples[3:]]
    for t in range(2):
        new, results, _ = _stage(m, model, batcher, gs, t, shards)
        for r in results:
            assert set(r.state) == names  # every expert, every router, the projector
        want = fedavg([r.state for r in results], [3, 3])
        assert set(new) == names and all(torch.allclose(new[k], v) for k, v in want.items())
        gs = new
    # B starts at 0, so the routers get their first gradient once the experts have moved (stage 1 here)
    assert any(not torch.equal(gs[k], start[k]) for k in routers)
    model.eval()
    with torch.no_grad(), m.inference_gate(model, micro_samples, 0):
        assert torch.isfinite(model(**batcher.train_batch(micro_samples[:2])).logits).all()

