"""LwF (Li & Hoiem 2016) for instruction tuning: distil the previous stage's global model on the current local data.

From stage 2 on, local training adds alpha * T^2 * KL(softmax(z_old / T) || softmax(z_new / T)), averaged over the
answer tokens of the batch, where z_old are the logits of the model holding the previous stage's global trainable
state (teacher) and z_new the current logits (student). Details:

* Positions: a causal LM's logit at position i predicts token i + 1, so the distilled positions are those whose *next*
  label is an answer token (labels[:, 1:] != -100): the same positions the task loss trains, nothing from the prompt.
* The teacher is the same model object run through ``torch.func.functional_call`` with a frozen copy of the old
  trainable tensors: nothing is written into the live parameters, so there is nothing to restore, and no second copy
  of the backbone is needed. It runs under no_grad and in eval mode (no dropout), restoring the training flag after.
* The student logits are the answer-position logits of the ``outputs`` the training loop passes as the hook's 4th
  argument (``models.answer_loss``); both sides project only the answer positions onto the vocabulary.
* State: the previous stage's global state, copied in ``before_stage``. On resume the engine calls ``before_stage``
  with the checkpointed global state, which is exactly that state, so nothing extra is checkpointed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from fcit.methods.base import Method, Params, StageInfo
from fcit.models.answer_loss import answer_logits, answer_logits_with, answer_positions
from fcit.models.lora import State, sub_dict
from fcit.training.losses import LossHook


class LwfParams(Params):
    alpha: float = Field(1.0, ge=0, description="weight of the distillation term")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T (the term is scaled by T^2)")


def distill_kl(z_old: torch.Tensor, z_new: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(z_old / T) || softmax(z_new / T)), in fp32; rows are positions."""
    t = float(temperature)
    log_old = F.log_softmax(z_old.float() / t, dim=-1)
    log_new = F.log_softmax(z_new.float() / t, dim=-1)
    kl = F.kl_div(log_new, log_old, log_target=True, reduction="sum") / max(1, z_old.shape[0])
    return kl * t * t


class Lwf(Method):
    name = "lwf"
    summary = "LwF: one LoRA, distilling the previous stage's global model on the current data (alpha * T^2 * KL)."
    Params = LwfParams

    def __init__(self, cfg):
        super().__init__(cfg)
        self.old: State = {}

    def before_stage(self, model: torch.nn.Module, info: StageInfo, global_state: State) -> State:
        # Only stages > 0 distil; at stage 0 the copy would never be read.
        self.old = {k: v.detach().clone() for k, v in global_state.items()} if info.stage > 0 else {}
        return super().before_stage(model, info, global_state)

    def shared_with_clients(self) -> dict[str, torch.Tensor]:
        return {f"lwf/old/{k}": v for k, v in self.old.items()}

    def receive_from_server(self, state: dict[str, torch.Tensor]) -> None:
        self.old = sub_dict(state, "lwf/old/")

    def teacher_logits(self, model: torch.nn.Module, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        """The teacher's logits at ``mask``'s positions, (N, V)."""
        params = dict(model.named_parameters())
        old = {k: v.to(params[k].device, params[k].dtype) for k, v in self.old.items() if k in params}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return answer_logits_with(model, old, inputs, mask)
        finally:
            model.train(was_training)

    def client_loss(self, info: StageInfo, global_state: State) -> Optional[LossHook]:
        if info.stage == 0 or not self.old or self.params.alpha == 0:
            return None
        alpha, t = self.params.alpha, self.params.temperature

        def hook(model, batch, loss, outputs=None, *_):
            mask = answer_positions(batch["labels"])
            if not bool(mask.any()):
                return loss
            z_old = self.teacher_logits(model, batch, mask)
            if outputs is None:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                z_new = answer_logits(model, inputs, mask)
            else:
                # local_train passes answer_forward's output; a full causal-LM output still works
                z_new = outputs.answer_logits if hasattr(outputs, "answer_logits") else outputs.logits[mask]
            return loss + (alpha * distill_kl(z_old, z_new, t)).to(loss.dtype)

        return hook
