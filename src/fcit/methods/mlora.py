"""M-LoRA: one LoRA per stage on the multi-subspace layer, earlier stages frozen, all summed at inference.

Reference section 10 defines it as multi-LoRA expansion without routing. On ``fcit.models.subspace_lora``:

* Slots. E = the number of stages the scenario will run (``scenario.stages`` if set, else the setting's task count:
  task 8, capability 4; Het runs as many stages as Hom), or ``max_stages`` when given. The layer is built once at
  setup, so E cannot grow later; a stage beyond E fails loudly in ``before_stage``.
* Training, stage t: slot t trains; slots 0..t-1 are in the forward with weight 1 but frozen; slots > t are off
  (``set_active(model, t, frozen_on=range(t))``). Only slot t (and the projector) has ``requires_grad``, so the upload
  ``local_train`` returns is exactly that, and AdamW never touches the frozen slots.
* Aggregation: slot t is averaged over the round's clients by the server optimizer with its own moment group
  (``slot<t>``), the projector in the default group, as Finetune does.
* Inference: every learned slot (0..last stage trained) with weight 1, nothing trainable.
* Scaling: each slot is scaled like a standalone LoRA, s = alpha / rank (``scale_by="subspace"``), with rank and alpha
  defaulting to ``model.lora``'s r and alpha: slot t alone is Finetune's adapter, and E does not shrink anyone's step.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from pydantic import Field

from fcit.config import Config
from fcit.data import registry
from fcit.errors import FcitError
from fcit.methods.base import RoundPlan, StageInfo, Upload
from fcit.methods.subspace import SlotMethod, SubspaceParams
from fcit.models.lora import State
from fcit.models.subspace_lora import SubspaceLoraConfig, set_active

_LAST = "mlora/last_trained"


def scenario_stage_count(cfg: Config) -> int:
    """How many stages ``Scenario`` will run for this config, without building it (no data needed)."""
    sc = cfg.scenario
    if sc.setting == "task":
        n = len(sc.task_order or registry.TASK_ORDER)
    else:
        n = len(sc.capability_order or registry.CAPABILITY_ORDER)
    # Het tables have one row per task (the scenario enforces it), so Het and Hom agree.
    return min(n, sc.stages) if sc.stages else n


class MLoraParams(SubspaceParams):
    max_stages: Optional[int] = Field(
        None, ge=1, description="number of LoRA slots; None: the scenario's stage count (task 8, capability 4)"
    )
    rank: Optional[int] = Field(None, ge=1, description="rank of each stage's LoRA; None: model.lora.r")
    alpha: Optional[float] = Field(
        None, gt=0, description="LoRA alpha of each slot (s = alpha / rank); None: model.lora.alpha"
    )


class MLora(SlotMethod):
    name = "mlora"
    summary = "M-LoRA: a new LoRA per stage, earlier ones frozen but kept in the forward, all summed at inference."
    Params = MLoraParams

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        p = self.params
        self.num_slots = p.max_stages if p.max_stages is not None else scenario_stage_count(cfg)
        self.last_trained = -1  # highest slot that has been trained and aggregated; -1: none yet
        # (trainable slot, frozen-on slots) last applied through _activate, so inference_gate can put it back.
        self._mode: Optional[tuple[Optional[int], tuple[int, ...]]] = None

    # -- model ---------------------------------------------------------------------------------------------------
    @property
    def lora_config(self) -> SubspaceLoraConfig:
        p, lc = self.params, self.cfg.model.lora
        return self.subspace_config(self.num_slots, rank=p.rank if p.rank is not None else lc.r,
                                    alpha=p.alpha if p.alpha is not None else lc.alpha, scale_by="subspace")

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        model = super().setup(model)
        self._activate(model, 0, ())
        return model

    def _activate(self, model: torch.nn.Module, slot: Optional[int], frozen_on: Sequence[int]) -> None:
        frozen = tuple(int(i) for i in frozen_on)
        set_active(model, slot, frozen_on=frozen)
        self._mode = (slot, frozen)

    def training_mode(self, model: torch.nn.Module, slot: int) -> None:
        """Slot ``slot`` trains with every earlier slot frozen in the forward; later slots are off."""
        self._activate(model, slot, range(slot))

    def inference_mode(self, model: torch.nn.Module) -> None:
        """Every learned slot with weight 1, nothing trainable (the bare backbone before any stage is learned)."""
        self._activate(model, None, range(self.last_trained + 1))

    # -- stage hooks ---------------------------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, info: StageInfo, global_state: State) -> State:
        if not 0 <= info.stage < self.num_slots:
            raise FcitError(
                f"{self.name}: stage {info.stage + 1} needs LoRA slot {info.stage} but only {self.num_slots} were "
                f"built; raise method.params.max_stages to at least {info.num_stages}"
            )
        self.training_mode(model, info.stage)
        return global_state

    def plan_round(self, info: StageInfo, identities: Sequence[dict], global_state: State) -> RoundPlan:
        return RoundPlan([{"slot": int(info.stage)} for _ in identities])

    def before_local(self, model: torch.nn.Module, plan: dict) -> None:
        self.training_mode(model, int(plan["slot"]))

    def aggregate(self, info: StageInfo, plan: RoundPlan, uploads: Sequence[Upload], global_state: State) -> State:
        if not uploads:
            return global_state
        new, groups = self.aggregate_slots(plan, uploads, global_state)
        self.last_trained = max(self.last_trained, max(groups))
        return {**global_state, **new}

    def after_stage(
        self, model: torch.nn.Module, info: StageInfo, global_state: State, payloads: Sequence[tuple[State, int]]
    ) -> State:
        # A stage with no client updates still closes its slot (it stays at its init, B = 0, so it adds nothing).
        self.last_trained = max(self.last_trained, info.stage)
        # Leave the model as inference will use it, for any caller that evaluates without inference_gate.
        self.inference_mode(model)
        return global_state

    # -- inference -----------------------------------------------------------------------------------------------
    def inference_gate(self, model: torch.nn.Module, samples, stage: int) -> contextlib.AbstractContextManager:
        return self._inference_context(model)

    @contextlib.contextmanager
    def _inference_context(self, model: torch.nn.Module) -> Iterator[None]:
        prev = self._mode
        self.inference_mode(model)
        try:
            yield
        finally:
            if prev is not None:
                self._activate(model, *prev)

    # -- resumable runs ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = dict(super().state_dict())
        out[_LAST] = torch.tensor([self.last_trained], dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if _LAST in state:
            self.last_trained = int(state[_LAST].reshape(-1)[0])
        super().load_state_dict({k: v for k, v in state.items() if k != _LAST})
