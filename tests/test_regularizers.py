import copy

import pytest
import torch

from fcit.config import Config, ModelConfig
from fcit.errors import FcitError
from fcit.methods.base import StageInfo
from fcit.methods.ewc import Ewc
from fcit.methods.lwf import Lwf, answer_positions, distill_kl
from fcit.models.inputs import IGNORE, Batcher
from fcit.models.lora import attach_lora, get_state, set_state


def _cfg(name, **params):
    return Config.model_validate({"method": {"name": name, "params": params}})


def _info(stage):
    return StageInfo(stage=stage, num_stages=3, tasks=[stage])


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
        self.frozen = torch.nn.Parameter(torch.tensor([9.0]), requires_grad=False)


# -- EWC on a toy model ---------------------------------------------------------------------------------------------
def test_ewc_params_alias_and_validation():
    assert Ewc(_cfg("ewc", **{"lambda": 5})).params.lambda_ == 5
    assert Ewc(_cfg("ewc", lambda_=7)).params.lambda_ == 7
    with pytest.raises(FcitError, match="method.params.lamda"):
        Ewc(_cfg("ewc", lamda=5))


def test_ewc_fisher_weighted_by_samples_and_accumulated_over_stages():
    ewc = Ewc(_cfg("ewc", **{"lambda": 4.0}))
    g0 = {"w": torch.tensor([0.0, 1.0]), "frozen": torch.tensor([0.0])}
    # Stage 1: clients with 1 and 3 samples -> F = 0.25 * [0, 0] + 0.75 * [4/3, 8/3] = [1, 2]
    payloads = [({"w": torch.tensor([0.0, 0.0])}, 1), ({"w": torch.tensor([4 / 3, 8 / 3])}, 3)]
    out = ewc.after_stage(Toy(), _info(0), g0, payloads)
    assert out is g0
    assert torch.allclose(ewc.fisher["w"], torch.tensor([1.0, 2.0]))
    assert set(ewc.star) == {"w"} and torch.equal(ewc.star["w"], g0["w"])

    # Penalty at stage 2 by hand: theta = [1, 3], theta* = [0, 1] -> 4/2 * (1 * 1 + 2 * 4) = 18; `frozen` adds nothing.
    toy = Toy()
    hook = ewc.client_loss(_info(1), g0)
    assert hook(toy, {}, torch.tensor(0.5)).item() == pytest.approx(0.5 + 18.0)
    assert ewc.penalty(toy).item() == pytest.approx(18.0)

    # Stage 2: equal weights -> F_stage = [2, 2]; accumulated sum = [3, 4]; the anchor moves to the new global state.
    g1 = {"w": torch.tensor([1.0, 1.0])}
    ewc.after_stage(Toy(), _info(1), g1, [({"w": torch.tensor([1.0, 1.0])}, 2), ({"w": torch.tensor([3.0, 3.0])}, 2)])
    assert torch.allclose(ewc.fisher["w"], torch.tensor([3.0, 4.0]))
    assert torch.equal(ewc.star["w"], g1["w"])
    # theta - theta* = [0, 2] -> 4/2 * (3 * 0 + 4 * 4) = 32
    assert ewc.client_loss(_info(2), g1)(toy, {}, torch.tensor(0.0)).item() == pytest.approx(32.0)


def test_ewc_decay_and_state_dict_round_trip():
    ewc = Ewc(_cfg("ewc", decay=0.5))
    ewc.after_stage(Toy(), _info(0), {"w": torch.zeros(2)}, [({"w": torch.tensor([2.0, 4.0])}, 5)])
    ewc.after_stage(Toy(), _info(1), {"w": torch.ones(2)}, [({"w": torch.tensor([1.0, 1.0])}, 5)])
    assert torch.allclose(ewc.fisher["w"], torch.tensor([0.5 * 2 + 1, 0.5 * 4 + 1]))
    other = Ewc(_cfg("ewc", decay=0.5))
    other.load_state_dict(ewc.state_dict())
    assert torch.equal(other.fisher["w"], ewc.fisher["w"]) and torch.equal(other.star["w"], ewc.star["w"])
    assert other.penalty(Toy()).item() == pytest.approx(ewc.penalty(Toy()).item())


def test_ewc_no_penalty_at_stage_zero():
    ewc = Ewc(_cfg("ewc"))
    assert ewc.client_loss(_info(0), {}) is None
    assert ewc.client_loss(_info(1), {}) is None  # no Fisher yet


# -- on the micro backbone ------------------------------------------------------------------------------------------
@pytest.fixture()
def lora_model(micro_backbone):
    base, processor = micro_backbone
    torch.manual_seed(0)
    model = attach_lora(copy.deepcopy(base), ModelConfig())
    model.train()
    return model, Batcher(model, processor)


def _perturb(model, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def test_ewc_fisher_is_mean_squared_per_sample_gradient(lora_model, micro_samples):
    model, batcher = lora_model
    ewc = Ewc(_cfg("ewc", fisher_samples=100))
    ewc.batcher = batcher
    fisher = ewc.client_after_stage(model, micro_samples, _info(0))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(fisher) == set(names)
    assert all(p.grad is None for p in model.parameters())  # the next local_train starts with clean grads
    assert model.training  # the training flag is restored
    # By hand: the mean over the six samples of each sample's squared task-loss gradient (eval mode).
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in names}
    model.eval()
    for s in micro_samples:
        model.zero_grad(set_to_none=True)
        model(**batcher.train_batch([s])).loss.backward()
        for n in names:
            expected[n] += params[n].grad.square() / len(micro_samples)
    model.zero_grad(set_to_none=True)
    model.train()
    for n in names:
        assert torch.allclose(fisher[n], expected[n], rtol=1e-4, atol=1e-12), n
    assert any(float(f.sum()) > 0 for n, f in fisher.items() if "lora_B" in n)

    capped = Ewc(_cfg("ewc", fisher_samples=2, fisher_batch_size=2))
    capped.batcher = batcher
    assert set(capped.client_after_stage(model, micro_samples, _info(0))) == set(names)


def test_ewc_hook_on_micro_backbone(lora_model, micro_samples):
    model, batcher = lora_model
    ewc = Ewc(_cfg("ewc", **{"lambda": 1e4}))
    ewc.batcher = batcher
    g = get_state(model)
    assert ewc.client_loss(_info(0), g) is None  # stage 0: plain task loss
    f = ewc.client_after_stage(model, micro_samples, _info(0))
    ewc.after_stage(model, _info(0), g, [(f, len(micro_samples))])
    hook = ewc.client_loss(_info(1), g)
    batch = batcher.train_batch(micro_samples[:3])

    loss = model(**batch).loss
    assert hook(model, batch, loss).item() == pytest.approx(loss.item(), abs=1e-7)  # theta == theta*

    _perturb(model)
    loss = model(**batch).loss
    total = hook(model, batch, loss)
    params = dict(model.named_parameters())
    by_hand = 0.5 * 1e4 * sum(float((f[n] * (params[n].detach() - g[n]) ** 2).sum()) for n in f)
    assert total.item() > loss.item()
    assert total.item() - loss.item() == pytest.approx(by_hand, rel=1e-4)
    total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# -- LwF ---------------------------------------------------------------------------------------------------------------
def test_distill_kl_and_positions():
    z = torch.randn(4, 7)
    assert distill_kl(z, z.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    old, new = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    # T = 2: p = [0.5, 0.5], q = softmax([0, 1]); KL = sum p log(p / q), times T^2
    q = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    by_hand = 4.0 * float((0.5 * (torch.log(torch.tensor(0.5)) - torch.log(q))).sum())
    assert distill_kl(old, new, 2.0).item() == pytest.approx(by_hand, rel=1e-5)
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 4, IGNORE, IGNORE]])
    # logit i predicts token i + 1: the answer tokens at 2, 3 are predicted from 1, 2
    assert answer_positions(labels).tolist() == [[False, True, True, False], [True, False, False, False]]


def test_lwf_stage_zero_is_task_loss(lora_model):
    model, _ = lora_model
    lwf = Lwf(_cfg("lwf"))
    g = get_state(model)
    lwf.before_stage(model, _info(0), g)
    assert lwf.client_loss(_info(0), g) is None


def test_lwf_hook_on_micro_backbone(lora_model, micro_samples):
    model, batcher = lora_model
    lwf = Lwf(_cfg("lwf", alpha=1.0, temperature=2.0))
    _perturb(model, seed=3)  # a non-trivial "previous stage" model (LoRA B starts at zero)
    g = get_state(model)
    lwf.before_stage(model, _info(1), g)
    hook = lwf.client_loss(_info(1), g)
    batch = batcher.train_batch(micro_samples[:4])

    out = model(**batch)
    assert hook(model, batch, out.loss).item() == pytest.approx(out.loss.item(), abs=1e-6)  # old == new: KL = 0

    _perturb(model, scale=0.2, seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(**batch)
    total = hook(model, batch, out.loss)
    assert total.item() > out.loss.item() + 1e-6
    # The teacher pass must leave the live parameters exactly as they were.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # Passing the training forward's outputs avoids a second student forward and gives the same value.
    assert hook(model, batch, out.loss, out).item() == pytest.approx(total.item(), rel=1e-6)
    total.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.requires_grad)
    # By hand: teacher = the model with the old state loaded.
    mask = answer_positions(batch["labels"])
    z_new = out.logits[mask].detach()
    set_state(model, g)
    with torch.no_grad():
        z_old = model(**batch).logits[mask]
    set_state(model, {n: before[n] for n in g})
    assert total.item() - out.loss.item() == pytest.approx(distill_kl(z_old, z_new, 2.0).item(), rel=1e-4)
