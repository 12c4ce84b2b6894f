import copy

import pytest
import torch

from fcit.config import TrainConfig
from fcit.errors import FcitError
from fcit.eval.evaluate import generate
from fcit.training.local import local_train
from fcit.models.inputs import Batcher
from fcit.models.lora import get_state, trainable_names
from fcit.models.fused_lora import set_fused
from fcit.models.peft_export import export_peft
from fcit.models.subspace_lora import (
    SubspaceLinear,
    SubspaceLoraConfig,
    attach_subspace_lora,
    gated,
    set_active,
    split_state,
    subspace_index,
    subspace_layers,
    subspace_names,
)

TARGET = r".*language_model.*\.(gate_proj|up_proj|down_proj)"


def _attach(base, E, q=2, alpha=8.0, **kw):
    return attach_subspace_lora(copy.deepcopy(base), SubspaceLoraConfig(num_subspaces=E, rank=q, alpha=alpha, **kw))


@torch.no_grad()
def _randomise_B(model, seed=0):
    """B starts at zero; random B makes every subspace visible in the output."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in subspace_layers(model):
        for b in layer.lora_B:
            b.copy_(torch.randn(b.shape, generator=gen) * 0.5)


def test_attach_wraps_lm_ffn_only_and_trains_subspace0_and_projector(micro_backbone):
    base, _ = micro_backbone
    model = _attach(base, E=3)
    names = [n for n, _ in subspace_layers(model)]
    assert len(names) == 2 * 3 and all("language_model" in n and n.split(".")[-1].endswith("_proj") for n in names)
    assert not any("vision_tower" in n for n in names)
    tr = trainable_names(model)
    assert {subspace_index(n) for n in tr if subspace_index(n) is not None} == {0}
    assert all(subspace_index(n) == 0 or "multi_modal_projector" in n for n in tr)
    assert len(subspace_names(model)) == 3 * len(subspace_names(model, 1))
    # subspace j's init does not depend on E
    other = _attach(base, E=1)
    a3 = dict(model.named_parameters())
    for n, p in other.named_parameters():
        if subspace_index(n) == 0:
            assert torch.equal(p, a3[n])


def test_e1_is_bit_identical_to_peft_lora(micro_backbone, micro_samples):
    from peft import LoraConfig, get_peft_model

    base, processor = micro_backbone
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGET))
    ours = _attach(base, E=1, q=4, alpha=8.0)
    pparams = dict(peft_model.named_parameters())
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        for name, layer in subspace_layers(ours):
            layer.lora_A[0].copy_(pparams[f"base_model.model.{name}.lora_A.default.weight"])
            layer.lora_B[0].copy_(pparams[f"base_model.model.{name}.lora_B.default.weight"])
    batch = Batcher(ours, processor).train_batch(micro_samples[:3])
    # The reference forward on both sides: the same ops in the same order.
    set_fused(peft_model, False)
    set_fused(ours, False)
    with torch.no_grad():
        ref = peft_model(**batch)
        out = ours(**batch)
        assert torch.equal(out.logits, ref.logits)
        # the default fused forward (one addmm per layer) agrees to float rounding
        set_fused(ours, True)
        assert (ours(**batch).logits - ref.logits).abs().max() < 1e-5
        # the fused gated path with g = 1 is the same computation
        with gated(ours, [1.0]):
            assert (ours(**batch).logits - ref.logits).abs().max() < 1e-6


def test_default_init_is_peft_like_and_gaussian_is_reference(micro_backbone):
    base, _ = micro_backbone
    m = _attach(base, E=2, q=4)
    layer = subspace_layers(m)[0][1]
    bound = 1 / layer.base_layer.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on (q, d_in)
    assert all(float(a.detach().abs().max()) <= bound for a in layer.lora_A)
    assert not torch.equal(layer.lora_A[0], layer.lora_A[1])
    assert all(float(b.detach().abs().max()) == 0 for b in layer.lora_B)
    g = subspace_layers(_attach(base, E=2, q=4, init="gaussian"))[0][1]
    assert 0.005 < float(g.lora_A[0].detach().std()) < 0.02


def test_export_peft_loads_to_the_same_outputs(micro_backbone, micro_samples, tmp_path):
    from peft import PeftModel

    base, processor = micro_backbone
    model = _attach(base, E=3, alpha=6.0, dropout=0.1)
    _randomise_B(model)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight.add_(0.3)  # a trained projector must travel too
    model.eval()
    batch = Batcher(model, processor).train_batch(micro_samples[:3])
    with torch.no_grad():
        set_active(model, None, frozen_on=[0, 2])
        want_sum = model(**batch).logits
        with gated(model, [0.25, 0.0, 0.75]):
            want_gate = model(**batch).logits
        for path, kw, want in ((tmp_path / "sum", {"subspaces": [0, 2]}, want_sum),
                               (tmp_path / "gate", {"gate": [0.25, 0.0, 0.75]}, want_gate)):
            export_peft(model, path, **kw)
            assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
            got = loaded(**batch).logits
            assert (got - want).abs().max() < 1e-5


def test_client_trains_only_its_active_subspace_even_with_weight_decay(micro_backbone, micro_samples):
    base, processor = micro_backbone
    model = _attach(base, E=3)
    _randomise_B(model)
    set_active(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = get_state(model)
    cfg = TrainConfig(batch_size=3, lr=1e-2, weight_decay=0.5)
    res = local_train(model, Batcher(model, processor), start, micro_samples, cfg, seed=0)
    per, rest = split_state(res.state)
    assert set(per) == {1} and all("multi_modal_projector" in n for n in rest)
    for n, p in model.named_parameters():
        if subspace_index(n) != 1 and "multi_modal_projector" not in n:
            assert torch.equal(p, before[n]), f"{n} changed"
    assert any(not torch.equal(v, before[n]) for n, v in per[1].items())


def test_frozen_on_slots_stay_in_the_forward_but_do_not_train(micro_backbone, micro_samples):
    base, processor = micro_backbone
    model = _attach(base, E=3)
    _randomise_B(model)
    batcher = Batcher(model, processor)
    batch = batcher.train_batch(micro_samples[:2])
    set_active(model, 2, frozen_on=[0, 1])
    assert {subspace_index(n) for n in trainable_names(model) if subspace_index(n) is not None} == {2}
    model.eval()
    with torch.no_grad():
        got = model(**batch).logits
        with gated(model, [1.0, 1.0, 1.0]):
            want = model(**batch).logits
    assert (got - want).abs().max() < 1e-5
    before = {n: p.detach().clone() for n, p in model.named_parameters() if subspace_index(n) in (0, 1)}
    local_train(model, batcher, get_state(model), micro_samples, TrainConfig(batch_size=3, lr=1e-2), seed=0)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n])
    # the no-grad frozen sum sees the trained slot 2 (its cached concatenation follows parameter updates)
    with torch.no_grad():
        after = model(**batch).logits
        fresh = copy.deepcopy(model)
        for _, layer in subspace_layers(fresh):
            layer._A_cat = layer._B_cat = layer._cache_key = None
        assert not torch.equal(after, got)
        assert torch.equal(after, fresh(**batch).logits)


def _explicit(layer: SubspaceLinear, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """y = W x + s * sum_j g_j B_j A_j x, one subspace at a time."""
    y = layer.base_layer(x)
    for j in range(layer.num_subspaces):
        gj = g[:, j].view(-1, *([1] * (x.dim() - 1)))
        y = y + layer.scaling * gj * (x @ layer.lora_A[j].T @ layer.lora_B[j].T)
    return y


def test_gated_layer_equals_the_explicit_loop_per_sample(micro_backbone):
    base, _ = micro_backbone
    model = _attach(base, E=4, q=3)
    _randomise_B(model)
    layer = subspace_layers(model)[0][1]
    x = torch.randn(3, 5, layer.base_layer.in_features)
    g = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.5, 0.5]])
    with torch.no_grad(), gated(model, g):
        assert (layer(x) - _explicit(layer, x, g)).abs().max() < 1e-5
        with pytest.raises(FcitError, match="gate has 3 rows"):
            layer(x[:2])
    # the cache follows in-place updates once the gate is set again
    with torch.no_grad():
        layer.lora_B[2].mul_(2.0)
        with gated(model, g):
            assert (layer(x) - _explicit(layer, x, g)).abs().max() < 1e-5


def test_gate_holds_for_prompt_and_cached_decoding_in_generate(micro_backbone, micro_samples):
    base, processor = micro_backbone
    model = _attach(base, E=3)
    _randomise_B(model)
    model.eval()
    g = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    layers = subspace_layers(model)
    seen = {"prefill": 0, "decode": 0}

    def check(module, args, out):
        (x,) = args
        seen["decode" if x.shape[1] == 1 else "prefill"] += 1
        assert (out - _explicit(module, x, g)).abs().max() < 1e-5

    handles = [layer.register_forward_hook(check) for _, layer in layers]
    batcher = Batcher(model, processor)
    samples = micro_samples[:3]
    try:
        with gated(model, g):
            preds = generate(model, batcher, samples, batch_size=3, max_new_tokens=4)
    finally:
        for h in handles:
            h.remove()
    assert len(preds) == 3 and seen["prefill"] == len(layers) and seen["decode"] >= len(layers)
    # each row really gets its own gate: row 0 alone with gate row 0 generates what it generated in the batch
    one = micro_samples[0]
    with gated(model, g[:1]):
        alone = generate(model, batcher, [one], batch_size=1, max_new_tokens=4)
    with gated(model, g):
        batch_again = generate(model, batcher, [one, one, one], batch_size=3, max_new_tokens=4)
    assert alone[0] == batch_again[0]
