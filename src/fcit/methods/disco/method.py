"""DISCO: Dynamic Knowledge Organisation + Subspace Selective Activation (reference section 5, cleaned up as in 5.8).

Per round:

1. ``client_identity`` (client): the identity token, the mean frozen feature of the client's instructions (or
   images), before training.
2. ``plan_round`` (server): a client whose token is within cosine ``tau`` of a used global token trains that
   subspace; the others are grouped by greedy threshold clustering (disjoint groups) and each group gets a fresh
   subspace. Sharing a subspace always takes a similarity >= ``tau``: a small new group (``min_share``) joins
   another group of the round only when it is that close, and otherwise opens its own. In rounds after the first
   of a stage a client trains the nearest of the stage's subspaces (the ones its earlier rounds chose) when it is
   within ``tau`` of it, which is the slot its task got in round 0; a client below ``tau`` to all of them is routed
   as in round 0 (a used subspace within ``tau``, else a free one), where the reference takes the nearest stage slot
   at any similarity. Keying by identity rather than by position is what makes the same rule work in Hom and Het:
   a recurring task routes back to its subspace.
3. ``before_local`` (client): only that subspace (and the projector) is trainable, so the upload ``local_train``
   returns is that subspace plus the projector.
4. ``aggregate`` (server): each subspace is averaged over the clients that trained it (weighted by samples), the
   projector over all clients; then each used subspace's global token takes the running mean of its clients' tokens.

At inference (``inference_gate``) every test sample's instruction is encoded, compared with the used global tokens
and turned into a per-sample gate (softmax(cos / eps) by default) that the fused subspace layers apply.

Deviations from the reference that fix its bugs (section 8): routing is per client, once, before training; clusters
are disjoint; the centre update has the right precedence; centres and counts are fp32 server state outside the
model; slot indices never exceed E (overflow falls back to the nearest slot with a warning).
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator

from fcit.config import Config
from fcit.errors import FcitError
from fcit.methods.base import Artifacts, Heatmap, RoundPlan, StageInfo, Upload
from fcit.methods.disco.gate import gate_context
from fcit.methods.disco.routing import Variant, assign_slots, cosine_matrix, gates, sampling_corrected, update_centres
from fcit.methods.subspace import SlotMethod, SubspaceParams
from fcit.models.identity import ImageTokenEncoder, get_text_encoder, identity_token, instruction_text, vision_tower
from fcit.models.lora import State, sub_dict
from fcit.models.subspace_lora import SubspaceLoraConfig, set_active


class Params(SubspaceParams):
    tau: float = Field(0.9, ge=-1.0, le=1.0, description="cosine threshold: same subspace / same new group")
    eps: float = Field(0.05, gt=0, description="softmax temperature of the inference gate")
    variant: Variant = "softmax"
    identity: Literal["text", "image", "text+image"] = "text"
    encoder: str = Field("minilm", description="'minilm' or 'clip:<local path>' (text identity)")
    num_subspaces: int = Field(8, ge=1)
    rank: int = Field(8, ge=1, description="rank of each subspace")
    # None: keep Finetune's LoRA scaling model.lora.alpha / model.lora.r for the total rank.
    alpha: Optional[float] = Field(None, gt=0)
    scale_by: Literal["total", "subspace"] = "total"
    # "round0": only a stage's first round plans new groups from scratch (later rounds keep their stage's subspaces
    # and open one only for a client below tau to all of them); "any": every round routes like round 0.
    new_slots: Literal["round0", "any"] = "round0"
    # Later rounds, a client below tau to every subspace of its stage: "nearest" (the reference's rule) trains the
    # nearest stage subspace at any similarity; "tau" routes it as in round 0 (a free subspace unless a used one is
    # within tau). "nearest" is the default because it is what routes better here: on FCIT-Synth v3 one task's
    # clients sit at cosine 0.85-0.89 of each other, so "tau" lets a few-sample client open a slot and leaves a later
    # task none; replaying the committed runs, "tau" sent 563-1368 samples per seed to a foreign subspace, "nearest"
    # 0-866 (scripts/disco_routing_replay.py; on v4, "tau" splits FigureQA over two subspaces in Het seed 0,
    # docs/results-v4.md).
    late_route: Literal["tau", "nearest"] = "nearest"
    # A new group with less than this share of the round's samples joins another group of the round if its mean
    # similarity to that group's clients is >= tau, instead of founding a subspace on a noisy token; below tau it
    # opens its own (the reference merges tiny singletons by share alone, across tasks).
    min_share: float = Field(0.05, ge=0, lt=1)
    # Route on similarities corrected for each token's sampling noise (routing.sampling_corrected) where the identity
    # is a mean of unit vectors (the MiniLM text identity): a 1-3 sample client's token sits at cosine 0.80-0.92 of
    # its own task's on FCIT-Synth v4, below tau, and without the correction it opened a subspace of its own and left
    # the last task none (seeds 1 and 2 of the v4 comparison). False: the raw similarities, as before. The routing
    # log keeps the raw ones.
    sampling_correction: bool = True

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, v: str) -> str:
        if v != "minilm" and not (v.startswith("clip:") and len(v) > 5):
            raise ValueError("expected 'minilm' or 'clip:<local path>'")
        return v


class Disco(SlotMethod):
    name = "disco"
    summary = (
        "DISCO: one LoRA subspace per task found by identity-token clustering on the server, subspace-wise FedAvg, "
        "per-sample softmax gating of the subspaces at inference."
    )
    Params = Params
    uses_identity = True
    slot_key = "subspace"
    shared_group = "shared"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        p = self.params
        self.E = p.num_subspaces
        self.C: dict[str, torch.Tensor] = {}  # modality -> (E, d) fp32 global tokens
        self.N = torch.zeros(self.E)  # samples behind each global token (fp32: exact to 2^24)
        self.used = torch.zeros(self.E, dtype=torch.bool)
        self.routing_log: list[dict] = []
        # eval stage -> dataset -> {"n", "gate_sum" (E), "top" (E): how often each slot had the largest gate}
        self.gate_stats: dict[str, dict[str, dict]] = {}
        self._image_encoder: Optional[ImageTokenEncoder] = None
        self._image_cache: dict[str, torch.Tensor] = {}

    # -- model ---------------------------------------------------------------------------------------------------
    @property
    def lora_config(self) -> SubspaceLoraConfig:
        p, lc = self.params, self.cfg.model.lora
        ranks = p.num_subspaces * p.rank if p.scale_by == "total" else p.rank
        alpha = p.alpha if p.alpha is not None else lc.alpha / lc.r * ranks
        return self.subspace_config(p.num_subspaces, rank=p.rank, alpha=alpha, scale_by=p.scale_by)

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        if "image" in self._modalities():
            vision_tower(model)  # before any work: a backbone without a LLaVA-style tower cannot give image tokens
        return super().setup(model)

    def slot_group(self, slot: int) -> str:
        return f"subspace{slot}"

    # -- identity --------------------------------------------------------------------------------------------------
    def _modalities(self) -> list[str]:
        return {"text": ["text"], "image": ["image"], "text+image": ["text", "image"]}[self.params.identity]

    @property
    def text_encoder(self):
        return get_text_encoder(self.params.encoder)

    def _bound(self):
        if self.processor is None or self.batcher is None:
            raise FcitError("DISCO needs the backbone's processor and batcher: call Disco.bind(processor, batcher)")
        return self.processor

    def _image_encoder_for(self, model) -> ImageTokenEncoder:
        if self._image_encoder is None or self._image_encoder.tower is not vision_tower(model):
            self._image_encoder = ImageTokenEncoder(model)
            self._image_cache.clear()
        return self._image_encoder

    def _image_tokens(self, model, samples: Sequence) -> torch.Tensor:
        """Image tokens of the samples that have an image, cached per path (clients revisit them every round)."""
        self._bound()
        enc = self._image_encoder_for(model)
        paths = [s.image for s in samples if s.image]
        missing = [p for p in dict.fromkeys(paths) if p not in self._image_cache]
        for i in range(0, len(missing), enc.batch_size):
            chunk = missing[i : i + enc.batch_size]
            px = torch.stack([self.batcher.load_image(p) for p in chunk])
            self._image_cache.update(zip(chunk, enc.encode(px)))
        if not paths:
            return torch.zeros(0, enc.dim)
        return torch.stack([self._image_cache[p] for p in paths])

    def client_identity(self, model: torch.nn.Module, samples: Sequence, info: StageInfo) -> dict[str, Any]:
        # The sample count weighs the token on the server; which datasets the samples come from is not sent.
        out: dict[str, Any] = {"count": len(samples)}
        mods = self._modalities()
        if "text" in mods:
            out["text"], _ = identity_token(self.text_encoder, [instruction_text(s) for s in samples])
        if "image" in mods:
            feats = self._image_tokens(model, samples)
            out["image"] = feats.mean(0) if len(feats) else torch.zeros(self._image_encoder.dim)
        return out

    # -- server: routing -----------------------------------------------------------------------------------------
    def _similarities(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Similarity to the global tokens, averaged over the identity's modalities (the text+image ablation)."""
        sims = []
        for m, t in tokens.items():
            if m not in self.C:
                self.C[m] = torch.zeros(self.E, t.shape[-1])
            sims.append(cosine_matrix(t, self.C[m]))
        return torch.stack(sims).mean(0)

    def stage_slots(self, stage: int, before_round: int) -> list[int]:
        """The subspaces the stage's earlier rounds chose (a later round tries them first)."""
        return sorted({e["subspace"] for e in self.routing_log if e["stage"] == stage and e["round"] < before_round})

    def plan_round(self, info: StageInfo, identities: Sequence[dict], global_state: State) -> RoundPlan:
        if not identities:
            return RoundPlan([])
        tokens = {m: torch.stack([idt[m].float() for idt in identities]) for m in self._modalities()}
        counts = torch.tensor([float(idt["count"]) for idt in identities])
        sim_c = self._similarities(tokens)
        sim_pair = torch.stack([cosine_matrix(t, t) for t in tokens.values()]).mean(0)
        allow_new = info.round == 0 or self.params.new_slots == "any"
        stage_slots = self.stage_slots(info.stage, info.round) if info.round > 0 else []
        route_c, route_pair = sim_c, sim_pair
        if (self.params.sampling_correction and self._modalities() == ["text"]
                and getattr(self.text_encoder, "unit_norm", False)):
            route_c, route_pair = sampling_corrected(sim_c, sim_pair, tokens["text"], counts, self.C["text"])
        slots, kinds = assign_slots(route_c, route_pair, self.used, self.params.tau, allow_new=allow_new,
                                    counts=counts, min_share=self.params.min_share, stage_slots=stage_slots,
                                    late_route=self.params.late_route)
        for i, (idt, j, kind) in enumerate(zip(identities, slots, kinds)):
            self.routing_log.append({
                "stage": info.stage, "round": info.round, "position": i, "subspace": j, "kind": kind,
                "count": int(idt["count"]), "datasets": info.assigned[i] if info.assigned else [],
                "similarity": [round(float(s), 4) if u else None for s, u in zip(sim_c[i], self.used)],
            })
        return RoundPlan([{"subspace": int(j)} for j in slots], server={"tokens": tokens, "counts": counts})

    def before_local(self, model: torch.nn.Module, plan: dict[str, Any]) -> None:
        set_active(model, int(plan["subspace"]))

    # -- server: aggregation ---------------------------------------------------------------------------------------
    def aggregate(self, info: StageInfo, plan: RoundPlan, uploads: Sequence[Upload], global_state: State) -> State:
        new, groups = self.aggregate_slots(plan, uploads, global_state)
        self.update_tokens(plan, {slot: [uploads[i].index for i in idx] for slot, idx in groups.items()})
        return {**global_state, **new}

    def update_tokens(self, plan: RoundPlan, rows_of_slot: dict[int, list[int]]) -> None:
        """Running means of the global tokens: each slot absorbs the tokens of the plan entries whose update it
        aggregated (``rows_of_slot``: slot -> indices into the plan)."""
        tokens, counts = plan.server["tokens"], plan.server["counts"]
        for slot, rows in rows_of_slot.items():
            n_before = self.N
            for m, t in tokens.items():
                self.C[m], self.N = update_centres(self.C[m], n_before, slot, t[rows], counts[rows])
            self.used[slot] = True

    # -- inference -----------------------------------------------------------------------------------------------
    def sample_similarity(self, texts: Sequence[str], image_tokens: Optional[torch.Tensor] = None,
                          has_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Similarities (n, E) of instructions ``texts`` (and of the image tokens of the rows that have an image)
        to the global tokens, averaged over the identity's modalities."""
        n = len(texts)
        sims = []
        for m in self._modalities():
            if m == "text":
                tok = self.text_encoder.encode(list(texts))
            else:
                dim = image_tokens.shape[-1] if image_tokens is not None and len(image_tokens) else (
                    self.C["image"].shape[1] if "image" in self.C else 1)
                tok = torch.zeros(n, dim)
                if image_tokens is not None and len(image_tokens):
                    tok[has_image] = image_tokens.float()
            C = self.C.get(m)
            # A row without an image (or slots without a centre yet) has similarity 0 there.
            sims.append(cosine_matrix(tok, C) if C is not None else torch.zeros(n, self.E))
        return torch.stack(sims).mean(0)

    def inference_gate(self, model: torch.nn.Module, samples, stage: int) -> contextlib.AbstractContextManager:
        samples = list(samples)
        processor = self._bound()
        if "text" in self._modalities() and samples:
            # One batched encoding of every instruction up front; each generation batch then hits the cache.
            self.text_encoder.encode([instruction_text(s) for s in samples])
        return gate_context(
            model, samples, processor.tokenizer, self._modalities(), similarity=self.sample_similarity,
            to_gates=lambda sim: gates(sim, self.params.variant, self.params.eps, self.used), used=self.used,
            encode_images=lambda px: self._image_encoder_for(model).encode(px),
            stats=self.gate_stats.setdefault(str(stage), {}))

    # -- reporting -------------------------------------------------------------------------------------------------
    def slot_of_dataset(self) -> dict[str, int]:
        """Each dataset's subspace: the one that most of its training samples were routed to, by the task the server
        assigned each client (a task of several datasets counts all of a client's samples for each of them)."""
        votes: dict[str, Counter] = defaultdict(Counter)
        for e in self.routing_log:
            for d in e.get("datasets", []):
                votes[d][e["subspace"]] += e["count"]
        return {d: c.most_common(1)[0][0] for d, c in sorted(votes.items())}

    def routing_accuracy(self, stage: Optional[str] = None) -> Optional[float]:
        """Fraction of test samples whose largest gate is their dataset's subspace (datasets seen in training)."""
        if not self.gate_stats:
            return None
        stage = stage or max(self.gate_stats, key=int)
        slot_of = self.slot_of_dataset()
        hit = tot = 0
        for d, st in self.gate_stats.get(stage, {}).items():
            if d in slot_of:
                hit += st["top"][slot_of[d]]
                tot += st["n"]
        return hit / tot if tot else None

    def artifacts(self) -> Artifacts:
        slot_of = self.slot_of_dataset()
        used = [int(j) for j in self.used.nonzero().flatten()]
        names = {j: "+".join(d for d, s in slot_of.items() if s == j) for j in range(self.E)}
        out = Artifacts(files={"disco/routing.json": {
            "params": self.params.model_dump(mode="json"),
            "routing": self.routing_log,
            "counts": [float(n) for n in self.N],
            "used": used,
            "token_norms": {m: [round(float(x), 4) for x in c.norm(dim=1)] for m, c in self.C.items()},
            "slot_of_dataset": slot_of,
            "gate_stats": self.gate_stats,
        }})
        max_cross = None
        if used and self.C:
            sim = torch.stack([cosine_matrix(c[used], c[used]) for c in self.C.values()]).mean(0)
            if len(used) > 1:  # how far apart the tasks' tokens are: issue 16's overlap measure
                max_cross = float((sim - 3 * torch.eye(len(used))).max())
            labels = [f"{j}: {names[j]}" if names[j] else str(j) for j in used]
            out.heatmaps["disco/identity_similarity.png"] = Heatmap(
                sim.tolist(), labels, labels, "DISCO global identity tokens (cosine)", vmin=-1, vmax=1)
        final = max(self.gate_stats, key=int) if self.gate_stats else None
        mean_gate: dict[str, list[float]] = {}
        if final is not None and self.gate_stats[final]:
            rows = sorted(self.gate_stats[final])
            mean_gate = {d: [g / max(1, self.gate_stats[final][d]["n"]) for g in self.gate_stats[final][d]["gate_sum"]]
                         for d in rows}
            out.heatmaps["disco/activation.png"] = Heatmap(
                np.array([mean_gate[d] for d in rows]).tolist(), rows, [str(j) for j in range(self.E)],
                f"DISCO mean gate per test dataset (after stage {int(final) + 1})", vmin=0, vmax=1,
                xlabel="subspace", ylabel="dataset")
        out.summary = {
            "subspaces_formed": len(used),
            "routing_accuracy": self.routing_accuracy(final) if final is not None else None,
            "max_cross_cosine": max_cross,
            "slot_of_dataset": slot_of,
            "mean_gate": mean_gate,
        }
        return out

    # -- resumable runs ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"N": self.N.clone(), "used": self.used.to(torch.uint8)}
        state.update({f"C.{m}": c.clone() for m, c in self.C.items()})
        return {**super().state_dict(), **state}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if "N" not in state:
            return
        self.N = state["N"].float().clone()
        self.used = state["used"].bool().clone()
        self.C = {k: v.float().clone() for k, v in sub_dict(state, "C.").items()}

    def state_json(self) -> dict[str, Any]:
        return {"routing_log": self.routing_log, "gate_stats": self.gate_stats}

    def load_state_json(self, state: dict[str, Any]) -> None:
        self.routing_log = list(state.get("routing_log", []))
        self.gate_stats = dict(state.get("gate_stats", {}))
