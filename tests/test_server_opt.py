import math

import pytest
import torch

from fcit.config import FederationConfig
from fcit.errors import FcitError
from fcit.training.server_opt import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    build_server_optimizer,
)
from fcit.training.losses import combine_hooks, fedprox_hook

ETA, B1, B2, TAU = 0.5, 0.9, 0.99, 0.1

# Round 1: x0 and two clients with 1 and 3 samples (p = 0.25, 0.75). The third coordinate keeps |Delta| < tau so that
# FedYogi's sign(v - m^2) takes both values.
X0 = [1.0, -2.0, 0.0]
R1 = ([2.0, -1.0, 0.05], [0.0, 0.0, 0.05]), (1, 3)
# Round 2: two clients with equal weight (p = 0.5, 0.5).
R2 = ([1.5, 0.5, 0.0], [1.0, 1.0, 0.1]), (2, 2)


def _t(v):
    return {"w": torch.tensor(v, dtype=torch.float32)}


def _delta(x, ys, ns, uniform=False):
    p = [1 / len(ns)] * len(ns) if uniform else [n / sum(ns) for n in ns]
    return [sum(pk * (y[j] - x[j]) for y, pk in zip(ys, p)) for j in range(len(x))]


def _run(opt, uniform=False):
    """Two rounds through the optimizer; also returns the two Deltas as plain floats for the hand formulas."""
    x1 = opt.step(_t(X0), [_t(y) for y in R1[0]], R1[1])["w"]
    d1 = _delta(X0, R1[0], R1[1], uniform)
    x1l = x1.tolist()
    x2 = opt.step({"w": x1}, [_t(y) for y in R2[0]], R2[1])["w"]
    d2 = _delta(x1l, R2[0], R2[1], uniform)
    return x1l, x2.tolist(), d1, d2


def _close(a, b):
    assert a == pytest.approx(b, rel=0, abs=1e-6)


def test_delta_helper_matches_hand_values():
    # Delta_1 = 0.25 * (y1 - x0) + 0.75 * (y2 - x0) = 0.25 * [1, 1, 0.05] + 0.75 * [-1, 2, 0.05]
    _close(_delta(X0, R1[0], R1[1]), [-0.5, 1.75, 0.05])
    _close(_delta(X0, R1[0], R1[1], uniform=True), [0.0, 1.5, 0.05])


def test_fedavg_two_rounds():
    x1, x2, _, _ = _run(FedAvg())
    _close(x1, [0.25 * 2.0 + 0.75 * 0.0, 0.25 * -1.0 + 0.75 * 0.0, 0.05])
    _close(x2, [1.25, 0.75, 0.05])


# Each optimizer against its paper's formulas, written out per coordinate (m_0 = 0, v_0 = tau^2).
def test_fedavgm_two_rounds():
    # Hsu et al. (2019): m <- beta m + Delta; x <- x + eta m
    x1, x2, d1, d2 = _run(FedAvgM(server_lr=ETA, beta1=B1))
    m1 = [B1 * 0.0 + d1[j] for j in range(3)]
    _close(x1, [X0[j] + ETA * m1[j] for j in range(3)])
    m2 = [B1 * m1[j] + d2[j] for j in range(3)]
    _close(x2, [x1[j] + ETA * m2[j] for j in range(3)])


def test_fedavgm_first_round_is_fedavg_with_unit_lr():
    x1, _, _, _ = _run(FedAvgM(server_lr=1.0))
    _close(x1, [0.5, -0.25, 0.05])


def test_fedavgm_has_no_ema_factor():
    # A steady Delta: m_t = Delta (1 + beta + ... + beta^(t-1)), the heavy ball's 1 / (1 - beta) amplification,
    # where an EMA would stay at Delta.
    opt = FedAvgM(server_lr=1.0, beta1=0.5)
    x = _t([0.0])
    for _ in range(3):
        x = opt.step(x, [{"w": x["w"] + 1.0}], [1])
    _close(x["w"].tolist(), [1.0 + 1.5 + 1.75])


def test_fedadagrad_two_rounds():
    # Reddi et al. (2021), Algorithm 2: m <- b1 m + (1 - b1) Delta; v <- v + Delta^2; x <- x + eta m / (sqrt(v) + tau)
    x1, x2, d1, d2 = _run(FedAdagrad(server_lr=ETA, beta1=B1, tau=TAU))
    m1 = [(1 - B1) * d1[j] for j in range(3)]
    v1 = [TAU**2 + d1[j] ** 2 for j in range(3)]
    _close(x1, [X0[j] + ETA * m1[j] / (math.sqrt(v1[j]) + TAU) for j in range(3)])
    m2 = [B1 * m1[j] + (1 - B1) * d2[j] for j in range(3)]
    v2 = [v1[j] + d2[j] ** 2 for j in range(3)]
    _close(x2, [x1[j] + ETA * m2[j] / (math.sqrt(v2[j]) + TAU) for j in range(3)])


def test_fedadagrad_without_momentum_steps_on_delta():
    x1, x2, d1, d2 = _run(FedAdagrad(server_lr=ETA, beta1=0.0, tau=TAU))
    v1 = [TAU**2 + d1[j] ** 2 for j in range(3)]
    _close(x1, [X0[j] + ETA * d1[j] / (math.sqrt(v1[j]) + TAU) for j in range(3)])


def test_fedadam_two_rounds():
    # v <- b2 v + (1 - b2) Delta^2 (from Delta, not from m)
    x1, x2, d1, d2 = _run(FedAdam(server_lr=ETA, beta1=B1, beta2=B2, tau=TAU))
    m1 = [(1 - B1) * d1[j] for j in range(3)]
    v1 = [B2 * TAU**2 + (1 - B2) * d1[j] ** 2 for j in range(3)]
    _close(x1, [X0[j] + ETA * m1[j] / (math.sqrt(v1[j]) + TAU) for j in range(3)])
    m2 = [B1 * m1[j] + (1 - B1) * d2[j] for j in range(3)]
    v2 = [B2 * v1[j] + (1 - B2) * d2[j] ** 2 for j in range(3)]
    _close(x2, [x1[j] + ETA * m2[j] / (math.sqrt(v2[j]) + TAU) for j in range(3)])


def test_fedyogi_two_rounds():
    # v <- v - (1 - b2) Delta^2 sign(v - Delta^2)
    sign = lambda a: (a > 0) - (a < 0)  # noqa: E731
    x1, x2, d1, d2 = _run(FedYogi(server_lr=ETA, beta1=B1, beta2=B2, tau=TAU))
    m1 = [(1 - B1) * d1[j] for j in range(3)]
    v0 = TAU**2
    v1 = [v0 - (1 - B2) * d1[j] ** 2 * sign(v0 - d1[j] ** 2) for j in range(3)]
    assert v1[2] < v0 < v1[0]  # both branches of the sign are exercised
    _close(x1, [X0[j] + ETA * m1[j] / (math.sqrt(v1[j]) + TAU) for j in range(3)])
    m2 = [B1 * m1[j] + (1 - B1) * d2[j] for j in range(3)]
    v2 = [v1[j] - (1 - B2) * d2[j] ** 2 * sign(v1[j] - d2[j] ** 2) for j in range(3)]
    _close(x2, [x1[j] + ETA * m2[j] / (math.sqrt(v2[j]) + TAU) for j in range(3)])


def test_uniform_weighting_ignores_sample_counts():
    x1, x2, d1, d2 = _run(FedAvgM(server_lr=1.0, beta1=B1, weighting="uniform"), uniform=True)
    _close(d1, [0.0, 1.5, 0.05])
    _close(x1, [1.0, -0.5, 0.05])
    _close(x2, [x1[j] + B1 * d1[j] + d2[j] for j in range(3)])


@pytest.mark.parametrize("cls", [FedAvgM, FedAdam, FedAdagrad, FedYogi])
def test_state_dict_round_trip_continues_identically(cls):
    kw = dict(server_lr=ETA, beta1=B1, beta2=B2, tau=TAU)
    a = cls(**kw)
    x1 = a.step(_t(X0), [_t(y) for y in R1[0]], R1[1], group="g")
    b = cls(**kw)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    assert set(b.state_dict()) == set(a.state_dict()) and a.state_dict()
    xa = a.step(x1, [_t(y) for y in R2[0]], R2[1], group="g")
    xb = b.step(x1, [_t(y) for y in R2[0]], R2[1], group="g")
    assert torch.equal(xa["w"], xb["w"])
    # A fresh optimizer would take a different second step: the state really carries over.
    c = cls(**kw).step(x1, [_t(y) for y in R2[0]], R2[1], group="g")
    assert not torch.allclose(c["w"], xa["w"])


def test_groups_keep_separate_state():
    opt = FedAvgM(server_lr=1.0, beta1=B1)
    opt.step(_t(X0), [_t(y) for y in R1[0]], R1[1], group="s0")
    # Same tensor name in another group: its first step starts again from m = 0 (plain FedAvg with eta = 1).
    out = opt.step(_t(X0), [_t(y) for y in R1[0]], R1[1], group="s1")
    _close(out["w"].tolist(), [0.5, -0.25, 0.05])
    assert {k.split("::")[1] for k in opt.state_dict()} == {"s0", "s1"}


def test_only_uploaded_keys_are_returned_and_dtype_kept():
    g = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "frozen": torch.zeros(3)}
    ys = [{"w": torch.tensor([2.0, 2.0], dtype=torch.bfloat16)}]
    out = FedAdam(server_lr=0.1).step(g, ys, [5])
    assert set(out) == {"w"} and out["w"].dtype == torch.bfloat16
    opt = FedAdam()
    opt.step(g, ys, [5])
    assert all(v.dtype == torch.float32 for v in opt.state_dict().values())


def test_errors_are_one_line_fcit_errors():
    with pytest.raises(FcitError):
        FedAvg().step(_t(X0), [], [])
    with pytest.raises(FcitError):
        FedAvg().step(_t(X0), [_t(X0), {"other": torch.zeros(3)}], [1, 1])
    with pytest.raises(FcitError):
        FedAvg().step(_t(X0), [_t(X0)], [0])
    with pytest.raises(FcitError):
        FedAdam().step({}, [_t(X0)], [1])
    with pytest.raises(FcitError):
        ServerOptimizer(weighting="median")


@pytest.mark.parametrize(
    "name,cls", [("fedavg", FedAvg), ("fedavgm", FedAvgM), ("fedadam", FedAdam), ("fedadagrad", FedAdagrad),
                 ("fedyogi", FedYogi)]
)
def test_build_from_config(name, cls):
    cfg = FederationConfig(aggregator=name, server_lr=0.3, beta1=0.8, beta2=0.95, adaptivity=0.01)
    opt = build_server_optimizer(cfg)
    assert type(opt) is cls and opt.weighting == "samples"
    assert (opt.server_lr, opt.beta1, opt.beta2, opt.tau) == (0.3, 0.8, 0.95, 0.01)
    assert build_server_optimizer(cfg, weighting="uniform").weighting == "uniform"


# -- FedProx ---------------------------------------------------------------------------------------------------------
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        self.b = torch.nn.Parameter(torch.tensor([5.0]), requires_grad=False)
        self.extra = torch.nn.Parameter(torch.tensor([3.0]))  # trainable but not in the global state


def test_fedprox_zero_at_the_anchor():
    m = Toy()
    g = {"w": m.w.detach().clone(), "b": torch.tensor([0.0])}
    loss = torch.tensor(2.0)
    assert fedprox_hook(g, mu=0.5)(m, {}, loss).item() == pytest.approx(2.0)


def test_fedprox_value_and_gradient():
    m = Toy()
    g = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0])}  # d = w - g = [1, -2]; b is frozen, extra absent
    mu = 0.5
    out = fedprox_hook(g, mu)(m, {}, torch.tensor(0.0))
    assert out.item() == pytest.approx(mu / 2 * (1 + 4))
    out.backward()
    assert torch.allclose(m.w.grad, mu * torch.tensor([1.0, -2.0]))
    assert m.extra.grad is None
    assert not g["w"].requires_grad


def test_fedprox_follows_what_trains_between_clients():
    # The same hook serves every client of a round; a method may freeze a different slice for each (before_local).
    m = Toy()
    hook = fedprox_hook({"w": torch.zeros(2), "extra": torch.zeros(1)}, 2.0)
    assert hook(m, {}, torch.tensor(0.0)).item() == pytest.approx(1.0 * (1 + 1 + 9))
    m.w.requires_grad_(False)
    assert hook(m, {}, torch.tensor(0.0)).item() == pytest.approx(1.0 * 9)
    m.extra.requires_grad_(False)
    assert hook(m, {}, torch.tensor(0.0)).item() == 0.0


def test_build_with_unset_server_lr_picks_per_optimizer_default():
    class Cfg:  # a FederationConfig that allows server_lr = None
        server_lr, beta1, beta2, adaptivity = None, 0.9, 0.99, 1e-3

    for name, lr in (("fedavgm", 1.0), ("fedadam", 1e-3), ("fedyogi", 1e-3)):
        c = Cfg()
        c.aggregator = name
        assert build_server_optimizer(c).server_lr == lr


def test_combine_hooks():
    assert combine_hooks() is None and combine_hooks(None, None) is None
    h = fedprox_hook({"w": torch.zeros(2)}, 2.0)
    assert combine_hooks(None, h) is h
    m = Toy()
    both = combine_hooks(h, lambda model, batch, loss: loss + 10)
    assert both(m, {}, torch.tensor(1.0)).item() == pytest.approx(1.0 + 0.5 * 2.0 * 2.0 + 10)


@pytest.mark.parametrize("cls", [FedAvgM, FedAdam, FedYogi, FedAdagrad])
def test_rate_scale_multiplies_the_step_of_the_named_tensors_only(cls):
    def two_rounds(opt):
        x0 = {"w": torch.tensor(X0), "p": torch.tensor(X0)}
        ys1 = [{"w": torch.tensor(y), "p": torch.tensor(y)} for y in R1[0]]
        x1 = {**x0, **opt.step(x0, ys1, R1[1])}
        ys2 = [{"w": torch.tensor(y), "p": torch.tensor(y)} for y in R2[0]]
        return x1, opt.step(x1, ys2, R2[1])

    plain = cls(server_lr=ETA, tau=TAU)
    scaled = cls(server_lr=ETA, tau=TAU)
    scaled.rate_scale = {"p": 0.1}
    (a1, a2), (b1, b2) = two_rounds(plain), two_rounds(scaled)
    assert torch.equal(a1["w"], b1["w"]) and torch.equal(a2["w"], b2["w"])
    x0 = torch.tensor(X0)
    _close((b1["p"] - x0).tolist(), (0.1 * (a1["p"] - x0)).tolist())  # round 1: a tenth of the step
    assert not torch.allclose(b2["p"], a2["p"])


def test_projector_rate_scale_reaches_the_server_optimizer(tmp_path):
    from fcit.config import load_config
    from fcit.methods import build_method
    from fcit.models.backbone import load_backbone
    from fcit.models.structure import projector_param_names
    from fcit.runtime import prepare_model

    cfg = load_config(preset="smoke", overrides={"federation.aggregator": "fedadam",
                                                 "federation.projector_rate_scale": 0.1})
    model, processor = load_backbone(None)  # the embedded model
    method = build_method(cfg)
    prepared = prepare_model(cfg, method, model, processor)
    names = projector_param_names(prepared.model)
    assert names and method.server_opt.rate_scale == dict.fromkeys(names, 0.1)


# -- bias correction (Kingma & Ba, in Flower's FedAdam form) ---------------------------------------------------------
def _rate(t, v):
    # eta_t for the t-th update of a slot; v: whether the optimizer's v is a mean (FedAdam, FedYogi) and corrected too
    return ETA * (math.sqrt(1 - B2**t) if v else 1.0) / (1 - B1**t)


def test_bias_corrected_fedadam_two_rounds():
    x1, x2, d1, d2 = _run(FedAdam(server_lr=ETA, beta1=B1, beta2=B2, tau=TAU, bias_correction=True))
    m1 = [(1 - B1) * d1[j] for j in range(3)]
    v1 = [B2 * TAU**2 + (1 - B2) * d1[j] ** 2 for j in range(3)]
    _close(x1, [X0[j] + _rate(1, True) * m1[j] / (math.sqrt(v1[j]) + TAU) for j in range(3)])
    m2 = [B1 * m1[j] + (1 - B1) * d2[j] for j in range(3)]
    v2 = [B2 * v1[j] + (1 - B2) * d2[j] ** 2 for j in range(3)]
    _close(x2, [x1[j] + _rate(2, True) * m2[j] / (math.sqrt(v2[j]) + TAU) for j in range(3)])


def test_bias_corrected_fedyogi_and_fedadagrad_two_rounds():
    sign = lambda a: (a > 0) - (a < 0)  # noqa: E731
    x1, x2, d1, d2 = _run(FedYogi(server_lr=ETA, beta1=B1, beta2=B2, tau=TAU, bias_correction=True))
    m1 = [(1 - B1) * d1[j] for j in range(3)]
    v1 = [TAU**2 - (1 - B2) * d1[j] ** 2 * sign(TAU**2 - d1[j] ** 2) for j in range(3)]
    _close(x1, [X0[j] + _rate(1, True) * m1[j] / (math.sqrt(v1[j]) + TAU) for j in range(3)])
    m2 = [B1 * m1[j] + (1 - B1) * d2[j] for j in range(3)]
    v2 = [v1[j] - (1 - B2) * d2[j] ** 2 * sign(v1[j] - d2[j] ** 2) for j in range(3)]
    _close(x2, [x1[j] + _rate(2, True) * m2[j] / (math.sqrt(v2[j]) + TAU) for j in range(3)])

    x1, x2, d1, d2 = _run(FedAdagrad(server_lr=ETA, beta1=B1, tau=TAU, bias_correction=True))
    m1 = [(1 - B1) * d1[j] for j in range(3)]
    v1 = [TAU**2 + d1[j] ** 2 for j in range(3)]
    _close(x1, [X0[j] + _rate(1, False) * m1[j] / (math.sqrt(v1[j]) + TAU) for j in range(3)])
    m2 = [B1 * m1[j] + (1 - B1) * d2[j] for j in range(3)]
    v2 = [v1[j] + d2[j] ** 2 for j in range(3)]
    _close(x2, [x1[j] + _rate(2, False) * m2[j] / (math.sqrt(v2[j]) + TAU) for j in range(3)])


def test_bias_corrected_fedavgm_takes_its_steady_step_from_the_first_round():
    # A steady Delta of 1: Hsu's m_t = 1 + beta + ... + beta^(t-1) grows to 1 / (1 - beta); corrected, every step is
    # already 1 / (1 - beta).
    opt = FedAvgM(server_lr=1.0, beta1=0.5, bias_correction=True)
    x = _t([0.0])
    steps = []
    for _ in range(3):
        new = opt.step(x, [{"w": x["w"] + 1.0}], [1])
        steps.append((new["w"] - x["w"]).item())
        x = new
    _close(steps, [2.0, 2.0, 2.0])


def test_bias_correction_counts_each_slot_from_its_own_first_update():
    # A subspace added in a later stage (a new group) gets the corrected first step, not the server's round count's.
    opt = FedAdam(server_lr=ETA, beta1=B1, beta2=B2, tau=TAU, bias_correction=True)
    x = _t(X0)
    for _ in range(3):
        x = opt.step(x, [_t(y) for y in R1[0]], R1[1], group="s0")
    late = opt.step(_t(X0), [_t(y) for y in R1[0]], R1[1], group="s1")["w"]
    first = FedAdam(server_lr=ETA, beta1=B1, beta2=B2, tau=TAU, bias_correction=True).step(
        _t(X0), [_t(y) for y in R1[0]], R1[1], group="s1")["w"]
    assert torch.equal(late, first)
    assert opt.t == {("s0", "w"): 3, ("s1", "w"): 1}
    # Without the correction no counts are kept, so the default's checkpoints hold m and v only.
    plain = FedAdam(server_lr=ETA)
    plain.step(_t(X0), [_t(y) for y in R1[0]], R1[1])
    assert plain.t == {} and {k.split("::")[0] for k in plain.state_dict()} == {"m", "v"}


def test_bias_corrected_state_round_trips_and_an_uncorrected_one_is_refused():
    kw = dict(server_lr=ETA, beta1=B1, beta2=B2, tau=TAU, bias_correction=True)
    a = FedYogi(**kw)
    x1 = a.step(_t(X0), [_t(y) for y in R1[0]], R1[1])
    b = FedYogi(**kw)
    b.load_state_dict(a.state_dict())
    assert b.t == a.t == {("", "w"): 1}
    assert torch.equal(a.step(x1, [_t(y) for y in R2[0]], R2[1])["w"], b.step(x1, [_t(y) for y in R2[0]], R2[1])["w"])
    plain = FedYogi(server_lr=ETA)
    plain.step(_t(X0), [_t(y) for y in R1[0]], R1[1])
    with pytest.raises(FcitError, match="bias_correction"):
        FedYogi(**kw).load_state_dict(plain.state_dict())


def test_bias_correction_reaches_the_server_optimizer_from_the_config():
    assert build_server_optimizer(FederationConfig(aggregator="fedadam", bias_correction=True)).bias_correction
    assert not build_server_optimizer(FederationConfig(aggregator="fedadam")).bias_correction
