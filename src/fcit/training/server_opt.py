"""Server optimizers (FedAvg, FedAvgM, FedAdam, FedAdagrad, FedYogi) over state dicts.

Plain code, independent of any engine: ``step`` takes the global state, the clients' uploads and their weights, and
returns new values for the uploaded keys. The adaptive optimizers follow Reddi et al. (2021, "Adaptive Federated
Optimization", Algorithm 2), FedAvgM follows Hsu et al. (2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification"):

* Delta = sum_k p_k (y_k - x)
* FedAvg:     x <- sum_k p_k y_k
* FedAvgM:    m <- beta1 m + Delta;                                      x <- x + eta m
* FedAdagrad: m <- beta1 m + (1 - beta1) Delta;  v <- v + Delta^2;       x <- x + eta m / (sqrt(v) + tau)
* FedAdam:    m as FedAdagrad;  v <- beta2 v + (1 - beta2) Delta^2;      x <- x + eta m / (sqrt(v) + tau)
* FedYogi:    m as FedAdagrad;  v <- v - (1 - beta2) Delta^2 sign(v - Delta^2);  x <- x + eta m / (sqrt(v) + tau)

with m_0 = 0 and v_0 = tau^2. The reference's unused flags come from OpenFedLLM (reference section 3.1), which
differs: it starts m at Delta, builds FedAdam's and FedYogi's v from m^2 instead of Delta^2, and runs FedAvgM's m as an
EMA; this module implemented that form before and no longer does.

Choices, all documented here because the papers leave them open:

* Weights. p_k = n_k / sum n ("samples") for every optimizer by default, so switching aggregator changes only the server
  rule and not the weighting of clients. Reddi et al. (and OpenFedLLM) use p_k = 1/m; that reading is
  ``weighting="uniform"``.
* FedAvgM's momentum is Hsu et al.'s beta (``beta1``), with no (1 - beta) factor, so with eta = 1 its first round is
  plain FedAvg and a steady Delta is amplified up to 1 / (1 - beta).
* FedAdagrad uses the first moment like the other two (Algorithm 2); ``beta1 = 0`` gives the momentum-free step
  eta Delta / (sqrt(v) + tau).
* No bias correction of m or v, as in Algorithm 2: with m_0 = 0 the first steps are (1 - beta1) of a full one, and
  with v_0 = tau^2 FedAdam/FedYogi then move each coordinate by about eta (m / sqrt(v) is about +-1 for a steady
  Delta), so eta is a step size in weight units.
* ``bias_correction=True`` (off by default) is Kingma & Ba's correction, in the form Flower's FedAdam applies it:
  the step's rate becomes eta_t = eta sqrt(1 - beta2^t) / (1 - beta1^t) for FedAdam and FedYogi (whose v grows as
  Adam's in its first rounds), eta / (1 - beta1^t) for FedAdagrad (its v is a sum, not a mean) and FedAvgM (so m
  is at its steady value, Delta / (1 - beta1) for a steady Delta, from the first round). t counts the updates of
  each (group, key) slot, not the server's rounds, because a continual method adds slots mid-run (DISCO's subspace
  of a new task) whose moments start at zero then: without the correction, at beta1 = 0.9 such a slot's m reaches
  65% of a steady Delta only after 10 rounds, a whole FCIT stage.
* State (m, v) is kept per (group, key) in fp32 on the tensor's device and persists across rounds and stages: a stage
  boundary is not a restart for the server. ``group`` lets a method with several subspaces keep separate moments per
  subspace even when the subspaces share tensor names.
* ``rate_scale`` multiplies the step of the tensors it names (the projector's, from ``federation.projector_rate_scale``,
  set where the model is built): the moments are unchanged, so it is a per-tensor eta.
* The returned tensors have the global state's dtype; all arithmetic is fp32 so bf16 models do not lose the small
  pseudo-gradients.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from fcit.errors import FcitError
from fcit.training.aggregation import fedavg
from fcit.models.lora import State

Weighting = Literal["samples", "uniform"]
_SEP = "::"  # state_dict key: "<slot>::<group>::<tensor name>"


def _normalise(weights: Sequence[float], n: int, weighting: str) -> list[float]:
    if n == 0:
        raise FcitError("aggregation: no client updates to aggregate")
    if len(weights) != n:
        raise FcitError(f"aggregation: {n} client states but {len(weights)} weights")
    if weighting == "uniform":
        return [1.0 / n] * n
    if any(w < 0 for w in weights):
        raise FcitError("aggregation: negative client weight")
    total = float(sum(weights))
    if total <= 0:
        raise FcitError("aggregation: client weights sum to zero")
    return [float(w) / total for w in weights]


def _check_keys(client_states: Sequence[State]) -> list[str]:
    keys = list(client_states[0])
    first = set(keys)
    for i, s in enumerate(client_states[1:], 1):
        if set(s) != first:
            diff = sorted(first.symmetric_difference(s))[:3]
            raise FcitError(f"aggregation: client {i} uploaded different tensors than client 0 (e.g. {diff})")
    return keys


class ServerOptimizer:
    """FedAvg; subclasses override ``_update`` with their rule on the pseudo-gradient."""

    name = "fedavg"
    # FedAvg needs no x, so it also handles tensors the global state does not hold yet (e.g. a newly added subspace).
    uses_pseudo_gradient = False

    def __init__(
        self,
        server_lr: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighting: Weighting = "samples",
        bias_correction: bool = False,
    ):
        if weighting not in ("samples", "uniform"):
            raise FcitError(f"server optimizer: weighting must be 'samples' or 'uniform', got {weighting!r}")
        self.server_lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), float(beta2), float(tau)
        self.weighting = weighting
        self.bias_correction = bool(bias_correction)
        # updates per slot, kept only with the correction (so the default's checkpoints hold what they always held)
        self.t: dict[tuple[str, str], int] = {}
        self.m: dict[tuple[str, str], torch.Tensor] = {}
        self.v: dict[tuple[str, str], torch.Tensor] = {}
        # key -> factor on the server step of that tensor (federation.projector_rate_scale); absent keys: 1
        self.rate_scale: dict[str, float] = {}

    def step(
        self, global_state: State, client_states: Sequence[State], weights: Sequence[float], group: str = ""
    ) -> State:
        """New values for the keys the clients uploaded (merge them into the global state yourself)."""
        if _SEP in group:
            raise FcitError(f"server optimizer: group name {group!r} must not contain {_SEP!r}")
        if not client_states:
            raise FcitError("aggregation: no client updates to aggregate")
        keys = _check_keys(client_states)
        p = _normalise(weights, len(client_states), self.weighting)
        if not self.uses_pseudo_gradient:
            return fedavg(client_states, weights if self.weighting == "samples" else [1.0] * len(client_states))
        out: State = {}
        for key in keys:
            if key not in global_state:
                raise FcitError(
                    f"aggregation: {self.name} needs the global value of {key!r} to form the pseudo-gradient"
                )
            x = global_state[key]
            xf = x.detach().float()
            delta = torch.zeros_like(xf)
            for s, pk in zip(client_states, p):
                delta += (s[key].detach().to(xf.device).float() - xf) * pk
            slot = (group, key)
            if self.bias_correction:
                self.t[slot] = self.t.get(slot, 0) + 1
            out[key] = (xf + self._update(slot, delta) * self.rate_scale.get(key, 1.0)).to(x.dtype)
        return out

    def _update(self, slot: tuple[str, str], delta: torch.Tensor) -> torch.Tensor:
        return delta

    # -- helpers for the momentum family -------------------------------------------------------------------------
    def _m0(self, slot: tuple[str, str], like: torch.Tensor) -> torch.Tensor:
        m = self.m.get(slot)
        return torch.zeros_like(like) if m is None else m.to(like.device)

    def _ema_momentum(self, slot: tuple[str, str], delta: torch.Tensor) -> torch.Tensor:
        """Reddi et al.'s first moment: m <- beta1 m + (1 - beta1) Delta, from m_0 = 0."""
        m = self.beta1 * self._m0(slot, delta) + (1.0 - self.beta1) * delta
        self.m[slot] = m
        return m

    def _v0(self, slot: tuple[str, str], like: torch.Tensor) -> torch.Tensor:
        v = self.v.get(slot)
        return torch.full_like(like, self.tau**2) if v is None else v.to(like.device)

    def _rate(self, slot: tuple[str, str], correct_v: bool) -> float:
        """eta, or with ``bias_correction`` eta_t for the slot's t-th update (see the module's docstring)."""
        if not self.bias_correction:
            return self.server_lr
        t = self.t[slot]
        rate = self.server_lr / (1.0 - self.beta1**t)
        return rate * (1.0 - self.beta2**t) ** 0.5 if correct_v else rate

    def _adaptive_step(self, slot: tuple[str, str], m: torch.Tensor, v: torch.Tensor, correct_v: bool) -> torch.Tensor:
        return self._rate(slot, correct_v) * m / (v.sqrt() + self.tau)

    # -- resumable runs ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for slot_name, table in (("m", self.m), ("v", self.v)):
            for (group, key), t in table.items():
                out[f"{slot_name}{_SEP}{group}{_SEP}{key}"] = t.detach().clone()
        for (group, key), n in self.t.items():
            out[f"t{_SEP}{group}{_SEP}{key}"] = torch.tensor(n, dtype=torch.int64)
        return out

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        self.m, self.v, self.t = {}, {}, {}
        for name, t in d.items():
            parts = name.split(_SEP, 2)
            if len(parts) != 3 or parts[0] not in ("m", "v", "t"):
                raise FcitError(f"server optimizer: unexpected state entry {name!r}")
            slot = (parts[1], parts[2])
            if parts[0] == "t":
                self.t[slot] = int(t)
            else:
                (self.m if parts[0] == "m" else self.v)[slot] = t.detach().float().clone()
        if self.bias_correction and set(self.m) - set(self.t):
            # A state saved without the correction has no counts: guessing them would change every later step.
            raise FcitError("server optimizer: the saved state has no update counts; it was saved without "
                            "federation.bias_correction, which a resumed run must keep as it was")


class FedAvg(ServerOptimizer):
    name = "fedavg"


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    uses_pseudo_gradient = True

    def _update(self, slot, delta):
        # Hsu et al.: heavy-ball momentum on the pseudo-gradient, m <- beta m + Delta from m_0 = 0.
        m = self.beta1 * self._m0(slot, delta) + delta
        self.m[slot] = m
        return self._rate(slot, correct_v=False) * m


class FedAdagrad(ServerOptimizer):
    name = "fedadagrad"
    uses_pseudo_gradient = True

    def _update(self, slot, delta):
        m = self._ema_momentum(slot, delta)
        v = self._v0(slot, delta) + delta.square()
        self.v[slot] = v
        return self._adaptive_step(slot, m, v, correct_v=False)


class FedAdam(ServerOptimizer):
    name = "fedadam"
    uses_pseudo_gradient = True

    def _update(self, slot, delta):
        m = self._ema_momentum(slot, delta)
        v = self.beta2 * self._v0(slot, delta) + (1.0 - self.beta2) * delta.square()
        self.v[slot] = v
        return self._adaptive_step(slot, m, v, correct_v=True)


class FedYogi(ServerOptimizer):
    name = "fedyogi"
    uses_pseudo_gradient = True

    def _update(self, slot, delta):
        m = self._ema_momentum(slot, delta)
        v0 = self._v0(slot, delta)
        d2 = delta.square()
        v = v0 - (1.0 - self.beta2) * d2 * torch.sign(v0 - d2)
        self.v[slot] = v
        return self._adaptive_step(slot, m, v, correct_v=True)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    c.name: c for c in (FedAvg, FedAvgM, FedAdam, FedAdagrad, FedYogi)
}


def build_server_optimizer(cfg, weighting: Optional[Weighting] = None) -> ServerOptimizer:
    """From a ``FederationConfig``; ``weighting`` overrides ``cfg.weighting`` if the config has one (default samples).

    ``cfg.server_lr = None`` (if the config allows it) picks a per-optimizer default, see below."""
    cls = SERVER_OPTIMIZERS.get(cfg.aggregator)
    if cls is None:
        known = ", ".join(SERVER_OPTIMIZERS)
        raise FcitError(f"config: federation.aggregator: unknown {cfg.aggregator!r}; known: {known}")
    w = weighting or getattr(cfg, "weighting", None) or "samples"
    lr = cfg.server_lr
    if lr is None:
        # An unset eta: 1 keeps FedAvgM's first round equal to FedAvg (FedAvg itself has no eta); the adaptive ones
        # use the reference's fedopt_eta, 1e-3, since they move each coordinate by about eta per round whatever the
        # size of Delta (a LoRA weight here is of order 1e-2). Set federation.server_lr to tune it per run.
        lr = 1.0 if cls in (FedAvg, FedAvgM) else 1e-3
    return cls(server_lr=lr, beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.adaptivity, weighting=w,
               bias_correction=getattr(cfg, "bias_correction", False))
