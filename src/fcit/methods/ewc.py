"""EWC (Kirkpatrick et al. 2017), federated: clients estimate a diagonal Fisher, the server averages and accumulates it.

* Fisher (client, ``client_after_stage``): the clients of a stage's last round load the final global model and
  average, over up to ``fisher_samples`` of their local samples, the squared gradient of the task loss with respect to
  every trainable tensor. With ``fisher_batch_size = 1`` (default) that is the empirical Fisher diagonal
  E[(d log p(answer | image, prompt) / d theta)^2], where log p is the *mean* per-token log-likelihood of the answer
  (exactly the training loss), so the Fisher scale, and thus lambda, does not depend on answer lengths. A larger
  ``fisher_batch_size`` squares batch-mean gradients instead: fewer backward passes, but a smaller estimate (the
  per-sample noise averages out), so lambda must grow with it. Gradients use eval mode (no dropout).
* Aggregation (server, ``after_stage``): sample-weighted mean of the clients' Fisher, then accumulation across stages,
  F <- decay * F + F_stage (``decay = 1``: the plain sum of reference section 10). The anchor theta* is the global state
  at the end of the stage. This is online EWC: one accumulated Fisher and one (the latest) anchor, instead of one
  penalty per past task.
* Penalty (client, ``client_loss``): loss + lambda / 2 * sum F (theta - theta*)^2 from stage 2 on (no Fisher before).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from pydantic import ConfigDict, Field

from fcit.errors import FcitError
from fcit.methods.base import Method, Params, StageInfo
from fcit.models.answer_loss import answer_forward
from fcit.models.device import autocast_for
from fcit.models.lora import State, sub_dict
from fcit.training.losses import LossHook

_PREFIX_F, _PREFIX_STAR = "ewc/fisher/", "ewc/star/"


class EwcParams(Params):
    # `lambda` is a Python keyword, hence the alias; both spellings are accepted in configs.
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    lambda_: float = Field(1000.0, ge=0, alias="lambda", description="penalty strength; tune with the Fisher scale")
    fisher_samples: int = Field(64, ge=1, description="cap on local samples per client used for the Fisher")
    fisher_batch_size: int = Field(1, ge=1, description="1 = per-sample empirical Fisher")
    decay: float = Field(1.0, ge=0, le=1, description="F <- decay * F + F_stage (1 = sum over stages)")


class Ewc(Method):
    name = "ewc"
    summary = "EWC: one LoRA, penalty lambda/2 * F (theta - theta*)^2 with a federated Fisher accumulated over stages."
    Params = EwcParams

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fisher: State = {}
        self.star: State = {}

    # -- client: Fisher estimate ---------------------------------------------------------------------------------
    def client_after_stage(self, model: torch.nn.Module, samples: Sequence, info: StageInfo) -> Optional[State]:
        if not samples:
            return None
        batcher = self.batcher
        if batcher is None:
            raise FcitError("ewc: no batcher to build Fisher batches with (Method.bind was not called)")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            return None
        # A seeded subset, so the estimate does not depend on how the shard happens to be ordered.
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + info.stage)
        idx = torch.randperm(len(samples), generator=gen)[: self.params.fisher_samples].tolist()
        chosen = [samples[i] for i in idx]
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
        params = [p for _, p in named]
        bs = self.params.fisher_batch_size
        was_training = model.training
        model.eval()
        n_batches = 0
        try:
            for i in range(0, len(chosen), bs):
                batch = batcher.train_batch(chosen[i : i + bs])
                with autocast_for(model):
                    loss = answer_forward(model, batch, full=not self.cfg.train.fused).loss
                # autograd.grad leaves .grad untouched, so the caller's next local_train starts clean.
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for (n, _), g in zip(named, grads):
                    if g is not None:
                        acc[n] += g.detach().float().square()
                n_batches += 1
        finally:
            model.train(was_training)
        return {n: a / n_batches for n, a in acc.items()}

    # -- server: aggregate + accumulate ----------------------------------------------------------------------------
    def after_stage(
        self, model: torch.nn.Module, info: StageInfo, global_state: State, payloads: Sequence[tuple[State, int]]
    ) -> State:
        if payloads:
            total = float(sum(n for _, n in payloads))
            if total <= 0:
                raise FcitError("ewc: Fisher payloads carry zero samples")
            stage_f: State = {}
            for f, n in payloads:
                for k, v in f.items():
                    term = v.float() * (n / total)
                    stage_f[k] = stage_f[k] + term if k in stage_f else term
            d = self.params.decay
            for k, v in stage_f.items():
                old = self.fisher.get(k)
                self.fisher[k] = v if old is None else d * old.to(v.device) + v
        self.star = {k: v.detach().float().clone() for k, v in global_state.items() if k in self.fisher}
        return global_state

    # -- client: penalty ---------------------------------------------------------------------------------------------
    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """lambda / 2 * sum F (theta - theta*)^2 over the model's trainable tensors that have a Fisher."""
        params = dict(model.named_parameters())
        terms = [
            (self.fisher[k].to(p.device) * (p.float() - self.star[k].to(p.device)) ** 2).sum()
            for k, p in params.items()
            if p.requires_grad and k in self.fisher and k in self.star
        ]
        if not terms:
            return torch.zeros(())
        return 0.5 * self.params.lambda_ * torch.stack(terms).sum()

    def client_loss(self, info: StageInfo, global_state: State) -> Optional[LossHook]:
        if info.stage == 0 or not self.fisher or self.params.lambda_ == 0:
            return None
        lam = self.params.lambda_
        cache: dict[int, list] = {}

        def hook(model, batch, loss, *_):
            triples = cache.get(id(model))
            if triples is None:
                # Names and device moves once per round (every simulated client shares this model object);
                # requires_grad is read per call because before_local may change what trains between clients.
                params = dict(model.named_parameters())
                triples = [
                    (params[k], f.to(params[k].device), self.star[k].to(params[k].device))
                    for k, f in self.fisher.items()
                    if k in params and k in self.star
                ]
                cache.clear()
                cache[id(model)] = triples
            terms = [(f * (p.float() - s) ** 2).sum() for p, f, s in triples if p.requires_grad]
            if not terms:
                return loss
            return loss + (0.5 * lam * torch.stack(terms).sum()).to(loss.dtype)

        return hook

    # -- what a remote client needs for the penalty (and, with the server optimizer's state, a resumed run) --------
    def shared_with_clients(self) -> dict[str, torch.Tensor]:
        return {**{_PREFIX_F + k: v for k, v in self.fisher.items()},
                **{_PREFIX_STAR + k: v for k, v in self.star.items()}}

    def receive_from_server(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k: v.float().clone() for k, v in sub_dict(state, _PREFIX_F).items()}
        self.star = {k: v.float().clone() for k, v in sub_dict(state, _PREFIX_STAR).items()}

    # -- resumable runs ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **self.shared_with_clients()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.receive_from_server(state)
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("ewc/")})
