"""DISCO: Dynamic Knowledge Organisation + Subspace Selective Activation (reference section 5, cleaned up as in 5.8).

Per round:

1. ``client_identity`` (client): the identity token, the mean frozen feature of the client's instructions (or
   images), before training.
2. ``plan_round`` (server): a client whose token is within cosine ``tau`` of a used global token trains that
   subspace; the others are grouped by greedy threshold clustering (disjoint groups) and each group gets a fresh
   subspace. New subspaces are opened only in round 0 of a stage (as in the reference; ``new_slots="any"`` allows
   them in every round); in later rounds every client trains the subspace of its nearest used global token, which
   is the slot its task got in round 0. Keying by identity rather than by position is what makes the same rule work
   in Hom and Het: a recurring task routes back to its subspace.
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
import json
import math
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator

from fcit.config import Config
from fcit.errors import FcitError
from fcit.federated.aggregation import aggregate_per_subspace
from fcit.federated.client import LocalResult
from fcit.methods.base import Method, StageInfo
from fcit.methods.base import Params as BaseParams
from fcit.models.identity import (
    ImageTokenEncoder,
    get_text_encoder,
    identity_token,
    instruction_from_prompt,
    instruction_text,
    vision_tower,
)
from fcit.models.lora import State, get_state
from fcit.rundir import write_json
from fcit.models.subspace_lora import (
    SubspaceLoraConfig,
    attach_subspace_lora,
    get_gate,
    set_active,
    set_gate,
    subspace_index,
    subspace_names,
)

NEW = -1  # route(): "no used subspace is close enough, open a new one"
Variant = Literal["softmax", "concat", "cosine", "argmax"]


# ---------------------------------------------------------------------------------------------------------------
# Pure server-side functions (tensors in, tensors out; no model)
# ---------------------------------------------------------------------------------------------------------------
def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarities in fp32; a zero vector (an unused centre) has similarity 0 to everything."""
    a = torch.nn.functional.normalize(torch.as_tensor(a).float().reshape(-1, a.shape[-1]), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(b).float().reshape(-1, b.shape[-1]), dim=-1)
    return a @ b.T


def route_sim(sim: torch.Tensor, used: torch.Tensor, tau: float) -> list[int]:
    """Per row: the most similar used slot if its similarity is >= tau, else ``NEW``."""
    used = torch.as_tensor(used, dtype=torch.bool)
    if not bool(used.any()):
        return [NEW] * sim.shape[0]
    masked = sim.float().masked_fill(~used, -math.inf)
    best, slot = masked.max(dim=1)
    return [int(j) if float(b) >= tau else NEW for b, j in zip(best, slot)]


def route(tokens: torch.Tensor, C: torch.Tensor, N: torch.Tensor, used: Optional[torch.Tensor] = None,
          tau: float = 0.9) -> list[int]:
    """Route client tokens (n, d) to global tokens C (E, d): a used slot with cos >= tau, else ``NEW``.

    ``used`` defaults to ``N > 0``.
    """
    used = torch.as_tensor(N) > 0 if used is None else used
    return route_sim(cosine_matrix(tokens, C), used, tau)


def greedy_threshold_clusters(tokens: Optional[torch.Tensor] = None, tau: float = 0.9, *,
                              sim: Optional[torch.Tensor] = None,
                              weights: Optional[Sequence[float]] = None) -> list[list[int]]:
    """Disjoint groups: the heaviest unassigned item opens a group and takes every *unassigned* item with cos >= tau.

    The reference lets a later group re-take items of an earlier one (section 5.4); here each item is in exactly one
    group. Anchors are taken in order of ``weights`` (a client's sample count; ties and no weights: input order)
    because a small client's mean token is noisy: anchored on a 3-sample client, a task's round split in two groups
    and took a second subspace (measured, seed 2 of the embedded benchmark), while every client of that round was
    >= tau from the largest one. Groups are returned in order of their first member, so the subspace numbering does
    not depend on the anchor order. Pass ``tokens`` (n, d) or a precomputed (n, n) similarity ``sim``.
    """
    if sim is None:
        if tokens is None:
            raise ValueError("greedy_threshold_clusters: pass tokens or sim")
        sim = cosine_matrix(tokens, tokens)
    n = sim.shape[0]
    order = list(range(n)) if weights is None else sorted(range(n), key=lambda i: -float(weights[i]))
    assigned = [False] * n
    groups: list[list[int]] = []
    for p in order:
        if assigned[p]:
            continue
        group = sorted([p] + [q for q in order if not assigned[q] and q != p and float(sim[p, q]) >= tau])
        for q in group:
            assigned[q] = True
        groups.append(group)
    return sorted(groups, key=min)


def assign_slots(sim_c: torch.Tensor, sim_pair: torch.Tensor, used: torch.Tensor, tau: float,
                 allow_new: bool = True, counts: Optional[torch.Tensor] = None, min_share: float = 0.0,
                 stage_slots: Optional[Sequence[int]] = None) -> tuple[list[int], list[str]]:
    """The server's plan: a slot per client and why (``matched`` | ``new`` | ``merged`` | ``overflow`` | ``nearest``).

    ``sim_c`` (n, E): clients vs global tokens; ``sim_pair`` (n, n): clients vs clients; ``used`` (E,) bool.
    With ``allow_new=False`` (rounds after the first of a stage) every client takes its nearest slot among
    ``stage_slots`` (the slots the stage's first round chose; all used slots when not given), so a client whose
    few samples give an off token cannot train another task's subspace. A new group holding less than ``min_share`` of
    the round's samples does not open a subspace (its token is too noisy to found one, the reference's tiny-singleton
    rule): it joins the most similar group or slot. When all E slots are taken, a group that needs a new one falls
    back to its nearest slot with a warning.
    """
    used = torch.as_tensor(used, dtype=torch.bool)
    n, E = sim_c.shape
    if not allow_new and bool(used.any()):
        allowed = used.clone()
        if stage_slots:
            allowed = torch.zeros_like(used)
            allowed[list(stage_slots)] = True
        nearest = sim_c.float().masked_fill(~allowed, -math.inf).argmax(dim=1)
        return [int(j) for j in nearest], ["nearest"] * n
    slots = route_sim(sim_c, used, tau)
    kinds = ["matched" if s != NEW else "" for s in slots]
    pending = [i for i, s in enumerate(slots) if s == NEW]
    if not pending:
        return slots, kinds
    counts = torch.ones(n) if counts is None else torch.as_tensor(counts, dtype=torch.float32)
    total = float(counts.sum()) or 1.0
    clusters = greedy_threshold_clusters(sim=sim_pair[pending][:, pending], tau=tau, weights=counts[pending].tolist())
    groups = [[pending[g] for g in group] for group in clusters]
    tiny = [g for g in groups if float(counts[g].sum()) / total < min_share]
    solid = [g for g in groups if g not in tiny]
    if not solid and not bool(used.any()):
        solid, tiny = tiny[:1], tiny[1:]  # the very first round must open something
    taken = used.clone()
    opened: dict[int, list[int]] = {}
    for members in solid:
        free = (~taken).nonzero().flatten()
        if len(free):
            slot, kind = int(free[0]), "new"
            taken[slot] = True
            opened[slot] = list(members)
        else:
            slot, kind = _nearest_slot(members, sim_c, sim_pair, used, opened), "overflow"
            warnings.warn(
                f"DISCO: all {E} subspaces are in use; clients {members} share subspace {slot} (the nearest) "
                f"instead of a new one; raise method.params.num_subspaces to keep them apart",
                RuntimeWarning,
                stacklevel=2,
            )
        for m in members:
            slots[m], kinds[m] = slot, kind
    # A tiny group joins what this round's other clients train (same stage, so most likely the same task); only
    # when every client of the round is tiny does it fall back to the nearest existing subspace.
    peers: dict[int, list[int]] = {}
    for i, j in enumerate(slots):
        if j != NEW and kinds[i] != "merged":
            peers.setdefault(j, []).append(i)
    for members in tiny:
        slot = _nearest_slot(members, sim_c, sim_pair, used if not peers else torch.zeros_like(used), peers)
        for m in members:
            slots[m], kinds[m] = slot, "merged"
    return slots, kinds


def _nearest_slot(members: list[int], sim_c: torch.Tensor, sim_pair: torch.Tensor, used: torch.Tensor,
                  opened: dict[int, list[int]]) -> int:
    """The slot most similar to a group: a used slot by its global token, or one opened this round by its members."""
    cand: dict[int, float] = {int(j): float(sim_c[members, j].mean()) for j in used.nonzero().flatten()}
    for j, mem in opened.items():
        cand[j] = float(sim_pair[members][:, mem].mean())
    slot = max(cand.items(), key=lambda kv: kv[1])[0]
    if slot in opened:
        opened[slot].extend(members)
    return slot


def update_centres(C: torch.Tensor, N: torch.Tensor, slot: int, tokens: torch.Tensor,
                   counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running mean of slot's global token: C <- (N C + sum n mu) / (N + sum n); N <- N + sum n. Returns new tensors.

    The reference writes ``C*N + sum/(N + n)`` (section 5.4), scaling a re-used centre by about N; this is the
    intended formula, in fp32.
    """
    C, N = C.clone().float(), N.clone().float()
    tokens = torch.as_tensor(tokens).float().reshape(-1, C.shape[1])
    counts = torch.as_tensor(counts, dtype=torch.float32).reshape(-1)
    total = float(counts.sum())
    if total <= 0:
        return C, N
    C[slot] = (N[slot] * C[slot] + (counts[:, None] * tokens).sum(0)) / (N[slot] + total)
    N[slot] = N[slot] + total
    return C, N


def gates(sim: torch.Tensor, variant: Variant = "softmax", eps: float = 0.05,
          used: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample subspace weights (n, E) from similarities to the global tokens; unused slots always get 0.

    softmax: softmax(sim / eps) over used slots (the paper); concat: 1 for every used slot (plain concatenated LoRA);
    cosine: the raw similarity; argmax: one-hot at the most similar used slot. With no used slot: all zeros.
    """
    sim = torch.as_tensor(sim).float()
    if sim.dim() == 1:
        sim = sim.unsqueeze(0)
    n, E = sim.shape
    used = torch.ones(E, dtype=torch.bool) if used is None else torch.as_tensor(used, dtype=torch.bool)
    if not bool(used.any()):
        return torch.zeros(n, E)
    masked = sim.masked_fill(~used, -math.inf)
    if variant == "softmax":
        return torch.softmax(masked / eps, dim=1)
    if variant == "concat":
        return used.float().expand(n, E).clone()
    if variant == "cosine":
        return sim.masked_fill(~used, 0.0)
    if variant == "argmax":
        return torch.nn.functional.one_hot(masked.argmax(dim=1), E).float()
    raise ValueError(f"unknown gate variant {variant!r}")


def _json_tensor(obj: Any) -> torch.Tensor:
    # The checkpoint holds tensors only; logs ride along as UTF-8 bytes so a resumed run keeps its introspection.
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def _tensor_json(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode()) if t.numel() else None


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------
class Params(BaseParams):
    tau: float = Field(0.9, ge=-1.0, le=1.0, description="cosine threshold: same subspace / same new group")
    eps: float = Field(0.05, gt=0, description="softmax temperature of the inference gate")
    variant: Variant = "softmax"
    identity: Literal["text", "image", "text+image"] = "text"
    encoder: str = Field("minilm", description="'minilm' or 'clip:<local path>' (text identity)")
    num_subspaces: int = Field(8, ge=1)
    rank: int = Field(8, ge=1, description="rank of each subspace")
    # None: keep Finetune's LoRA scaling model.lora.alpha / model.lora.r for the total rank.
    alpha: Optional[float] = Field(None, gt=0)
    dropout: Optional[float] = Field(None, ge=0, lt=1)
    scale_by: Literal["total", "subspace"] = "total"
    init: Literal["peft", "gaussian"] = "peft"
    new_slots: Literal["round0", "any"] = "round0"
    # A new group with less than this share of the round's samples joins the nearest group instead of opening a
    # subspace: a client with a handful of samples has a noisy identity token (reference: tiny-singleton merge).
    min_share: float = Field(0.05, ge=0, lt=1)

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, v: str) -> str:
        if v != "minilm" and not (v.startswith("clip:") and len(v) > 5):
            raise ValueError("expected 'minilm' or 'clip:<local path>'")
        return v


class Disco(Method):
    name = "disco"
    summary = (
        "DISCO: one LoRA subspace per task found by identity-token clustering on the server, subspace-wise FedAvg, "
        "per-sample softmax gating of the subspaces at inference."
    )
    Params = Params

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
        self._pending: Optional[dict] = None
        self._stage = 0
        self._stage_slots: set[int] = set()  # slots chosen in round 0 of the current stage
        self._processor = None
        self._image_encoder: Optional[ImageTokenEncoder] = None
        self._image_cache: dict[str, torch.Tensor] = {}
        self._batcher = None

    # -- model ---------------------------------------------------------------------------------------------------
    @property
    def lora_config(self) -> SubspaceLoraConfig:
        p, lc = self.params, self.cfg.model.lora
        ranks = p.num_subspaces * p.rank if p.scale_by == "total" else p.rank
        alpha = p.alpha if p.alpha is not None else lc.alpha / lc.r * ranks
        return SubspaceLoraConfig(
            num_subspaces=p.num_subspaces, rank=p.rank, alpha=alpha,
            dropout=lc.dropout if p.dropout is None else p.dropout, target=lc.target, scale_by=p.scale_by,
            init=p.init, init_seed=self.cfg.seed, train_projector=self.cfg.model.train_projector,
        )

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        return attach_subspace_lora(model, self.lora_config)

    def initial_state(self, model: torch.nn.Module) -> State:
        # Every subspace travels in the global state (not just the one active now), plus the projector.
        names = subspace_names(model) + [
            n for n, p in model.named_parameters() if p.requires_grad and subspace_index(n) is None
        ]
        return get_state(model, names)

    def bind(self, processor) -> None:
        """The backbone's processor: its tokenizer reads instructions back at inference, its image processor makes
        pixels for the image identity. Loaded from ``model.path`` on first need when not bound."""
        self._processor = processor

    # -- identity --------------------------------------------------------------------------------------------------
    def _modalities(self) -> list[str]:
        return {"text": ["text"], "image": ["image"], "text+image": ["text", "image"]}[self.params.identity]

    @property
    def text_encoder(self):
        return get_text_encoder(self.params.encoder)

    def _processor_or_load(self):
        if self._processor is None:
            from transformers import AutoProcessor

            from fcit.models.backbone import resolve_model_path

            try:
                self._processor = AutoProcessor.from_pretrained(resolve_model_path(self.cfg.model.path))
            except Exception as exc:  # noqa: BLE001
                raise FcitError(
                    f"DISCO needs the backbone's processor (call Disco.bind(processor)): {str(exc).splitlines()[0]}"
                ) from None
        return self._processor

    def _image_encoder_for(self, model) -> ImageTokenEncoder:
        if self._image_encoder is None or self._image_encoder.tower is not vision_tower(model):
            self._image_encoder = ImageTokenEncoder(model)
            self._image_cache.clear()
        return self._image_encoder

    def _image_tokens(self, model, samples: Sequence) -> torch.Tensor:
        """Image tokens of the samples that have an image, cached per path (clients revisit them every round)."""
        from fcit.models.inputs import Batcher

        enc = self._image_encoder_for(model)
        if self._batcher is None:
            self._batcher = Batcher(model, self._processor_or_load(), cache_images=False)
        paths = [s.image for s in samples if s.image]
        missing = [p for p in dict.fromkeys(paths) if p not in self._image_cache]
        for i in range(0, len(missing), enc.batch_size):
            chunk = missing[i : i + enc.batch_size]
            px = torch.stack([self._batcher.load_image(p) for p in chunk])
            self._image_cache.update(zip(chunk, enc.encode(px)))
        if not paths:
            return torch.zeros(0, enc.dim)
        return torch.stack([self._image_cache[p] for p in paths])

    def client_identity(self, model: torch.nn.Module, samples: Sequence, info: StageInfo) -> dict[str, Any]:
        out: dict[str, Any] = {"count": len(samples), "datasets": dict(Counter(s.dataset for s in samples))}
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

    def plan_round(self, info: StageInfo, identities: Sequence[dict], global_state: State) -> list[dict[str, Any]]:
        self._stage = info.stage
        if not identities:
            return []
        tokens = {m: torch.stack([idt[m].float() for idt in identities]) for m in self._modalities()}
        counts = torch.tensor([float(idt["count"]) for idt in identities])
        sim_c = self._similarities(tokens)
        sim_pair = torch.stack([cosine_matrix(t, t) for t in tokens.values()]).mean(0)
        allow_new = info.round == 0 or self.params.new_slots == "any"
        if info.round == 0:
            self._stage_slots = set()
        slots, kinds = assign_slots(sim_c, sim_pair, self.used, self.params.tau, allow_new=allow_new, counts=counts,
                                    min_share=self.params.min_share, stage_slots=sorted(self._stage_slots))
        if info.round == 0:
            self._stage_slots = set(slots)
        for i, (idt, j, kind) in enumerate(zip(identities, slots, kinds)):
            self.routing_log.append({
                "stage": info.stage, "round": info.round, "position": i, "subspace": j, "kind": kind,
                "count": int(idt["count"]), "datasets": idt.get("datasets", {}),
                "similarity": [round(float(s), 4) if u else None for s, u in zip(sim_c[i], self.used)],
            })
        self._pending = {"slots": slots, "tokens": tokens, "counts": counts}
        # "client" indexes this round's identities, so aggregation can match uploads to tokens when some of the
        # planned clients never reply (a crashed or timed-out Flower node).
        return [{"subspace": int(j), "client": i} for i, j in enumerate(slots)]

    def before_local(self, model: torch.nn.Module, plan: dict[str, Any]) -> None:
        set_active(model, int(plan["subspace"]))

    # -- server: aggregation ---------------------------------------------------------------------------------------
    def aggregate_subspace(self, slot: int, states: Sequence[State], weights: Sequence[float],
                           global_state: State) -> State:
        """One subspace from the clients that trained it, with the server optimizer's own state per subspace."""
        return self.server_opt.step(global_state, states, weights, group=f"subspace{slot}")

    def aggregate_shared(self, states: Sequence[State], weights: Sequence[float], global_state: State) -> State:
        """Tensors every client trains (the projector): aggregated over all clients of the round."""
        return self.server_opt.step(global_state, states, weights, group="shared")

    def aggregate(self, info: StageInfo, results: Sequence[LocalResult], plans: Sequence[dict],
                  global_state: State) -> State:
        new, groups = aggregate_per_subspace(
            [r.state for r in results],
            [r.num_samples for r in results],
            [int(plan["subspace"]) for plan in plans],
            lambda slot, states, w: self.aggregate_subspace(slot, states, w, global_state),
            lambda states, w: self.aggregate_shared(states, w, global_state),
        )
        self._update_tokens(groups, [int(plan.get("client", i)) for i, plan in enumerate(plans)])
        return {**global_state, **new}

    def _update_tokens(self, groups: dict[int, list[int]], planned: list[int]) -> None:
        """Running means of the global tokens from the clients whose update was aggregated (``groups`` index the
        uploads; ``planned[i]`` is upload i's position in the round's plan)."""
        pend, self._pending = self._pending, None
        if pend is None or (planned and max(planned) >= len(pend["slots"])):
            warnings.warn("DISCO: aggregate without a matching plan_round; global tokens not updated", RuntimeWarning)
            return
        for slot, idx in groups.items():
            rows = [planned[i] for i in idx]
            n_before = self.N
            for m, t in pend["tokens"].items():
                self.C[m], self.N = update_centres(self.C[m], n_before, slot, t[rows], pend["counts"][rows])
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

    def inference_gate(self, model: torch.nn.Module, samples) -> contextlib.AbstractContextManager:
        return self._gate_context(model, samples)

    @contextlib.contextmanager
    def _gate_context(self, model: torch.nn.Module, samples) -> Iterator[None]:
        """Per-sample SSA gates for every generation batch run inside the block.

        The gate is computed at each batch's prefill forward from the batch itself: the instruction is read back
        from the input ids (so any batching or ordering of ``samples`` by the caller is fine) and the image
        identity from the batch's pixels. Cached decoding steps keep the prefill's gate.
        """
        samples = list(samples)
        tok = self._processor_or_load().tokenizer
        mods = self._modalities()
        if "text" in mods and samples:
            self.text_encoder.encode([instruction_text(s) for s in samples])  # one batched warm-up of the cache
        snap = {" ".join(instruction_text(s).split()): instruction_text(s) for s in samples}
        ds_of: dict[str, Counter] = defaultdict(Counter)
        for s in samples:
            ds_of[instruction_text(s)][s.dataset] += 1
        one_ds = samples[0].dataset if samples and len({s.dataset for s in samples}) == 1 else None
        image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
        captured: dict[str, torch.Tensor] = {}
        stats = self.gate_stats.setdefault(str(self._stage), {})
        hooks = []

        def capture_pixels(module, args, kwargs):
            px = args[0] if args else kwargs.get("pixel_values")
            if px is not None:
                captured["px"] = px

        def prefill(module, args, kwargs):
            past = kwargs.get("past_key_values")
            if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
                return None  # a cached decoding step: the gate of the prefill stays
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise FcitError("DISCO inference: the model was called without input_ids; cannot read the instruction")
            mask = kwargs.get("attention_mask")
            rows = list(ids) if mask is None else [r[m.bool()] for r, m in zip(ids, mask)]
            texts = [instruction_from_prompt(tok.decode(r, skip_special_tokens=True)) for r in rows]
            texts = [snap.get(" ".join(t.split()), t) for t in texts]
            img_tok, has_img = None, None
            if "image" in mods:
                px = kwargs.get("pixel_values")
                px = captured.pop("px", None) if px is None else px
                has_img = (ids == image_id).any(1) if image_id is not None else torch.ones(len(ids), dtype=torch.bool)
                if px is not None and int(has_img.sum()) == px.shape[0]:
                    img_tok = self._image_encoder_for(model).encode(px)
                captured.clear()  # including what our own encode just ran through the tower
            sim = self.sample_similarity(texts, img_tok, has_img)
            g = gates(sim, self.params.variant, self.params.eps, self.used)
            set_gate(model, g)
            # "top" is the most similar used slot, which is the largest gate for every variant but concat.
            top = sim.masked_fill(~self.used, -math.inf).argmax(1) if bool(self.used.any()) else None
            for i, (t, row) in enumerate(zip(texts, g)):
                d = one_ds or (ds_of[t].most_common(1)[0][0] if t in ds_of else "?")
                st = stats.setdefault(d, {"n": 0, "gate_sum": [0.0] * self.E, "top": [0] * self.E})
                st["n"] += 1
                st["gate_sum"] = [a + float(b) for a, b in zip(st["gate_sum"], row)]
                if top is not None:
                    st["top"][int(top[i])] += 1
            return None

        prev = get_gate(model)
        hooks.append(model.register_forward_pre_hook(prefill, with_kwargs=True))
        if "image" in mods:
            hooks.append(vision_tower(model).register_forward_pre_hook(capture_pixels, with_kwargs=True))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            set_gate(model, prev)

    # -- reporting -------------------------------------------------------------------------------------------------
    def slot_of_dataset(self) -> dict[str, int]:
        """Each dataset's subspace: the one that most of its training samples were routed to."""
        votes: dict[str, Counter] = defaultdict(Counter)
        for e in self.routing_log:
            for d, n in e.get("datasets", {}).items():
                votes[d][e["subspace"]] += n
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

    def write_artifacts(self, run_dir) -> dict[str, Any]:
        from fcit.report.plots import heatmap

        out = Path(run_dir) / "disco"
        out.mkdir(parents=True, exist_ok=True)
        slot_of = self.slot_of_dataset()
        used = [int(j) for j in self.used.nonzero().flatten()]
        names = {j: "+".join(d for d, s in slot_of.items() if s == j) for j in range(self.E)}
        write_json(out / "routing.json", {
            "params": self.params.model_dump(mode="json"),
            "routing": self.routing_log,
            "counts": [float(n) for n in self.N],
            "used": used,
            "token_norms": {m: [round(float(x), 4) for x in c.norm(dim=1)] for m, c in self.C.items()},
            "slot_of_dataset": slot_of,
            "gate_stats": self.gate_stats,
        }, indent=1, sort_keys=False)
        files = ["routing.json"]
        if used and self.C:
            sim = torch.stack([cosine_matrix(c[used], c[used]) for c in self.C.values()]).mean(0)
            labels = [f"{j}: {names[j]}" if names[j] else str(j) for j in used]
            heatmap(sim.numpy(), labels, labels, out / "identity_similarity.png",
                    "DISCO global identity tokens (cosine)", vmin=-1, vmax=1)
            files.append("identity_similarity.png")
        final = max(self.gate_stats, key=int) if self.gate_stats else None
        mean_gate: dict[str, list[float]] = {}
        if final is not None and self.gate_stats[final]:
            rows = sorted(self.gate_stats[final])
            mean_gate = {d: [g / max(1, self.gate_stats[final][d]["n"]) for g in self.gate_stats[final][d]["gate_sum"]]
                         for d in rows}
            heatmap(np.array([mean_gate[d] for d in rows]), rows, [str(j) for j in range(self.E)],
                    out / "activation.png", f"DISCO mean gate per test dataset (after stage {int(final) + 1})",
                    vmin=0, vmax=1, xlabel="subspace", ylabel="dataset")
            files.append("activation.png")
        return {
            "subspaces_formed": len(used),
            "routing_accuracy": self.routing_accuracy(final) if final is not None else None,
            "slot_of_dataset": slot_of,
            "mean_gate": mean_gate,
            "files": [f"disco/{f}" for f in files],
        }

    # -- resumable runs ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"N": self.N.clone(), "used": self.used.to(torch.uint8),
                 "routing_log": _json_tensor(self.routing_log), "gate_stats": _json_tensor(self.gate_stats)}
        state.update({f"C.{m}": c.clone() for m, c in self.C.items()})
        return {**super().state_dict(), **state}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if "N" not in state:
            return
        self.N = state["N"].float().clone()
        self.used = state["used"].bool().clone()
        self.C = {k[2:]: v.float().clone() for k, v in state.items() if k.startswith("C.")}
        self.routing_log = _tensor_json(state["routing_log"]) or []
        self.gate_stats = _tensor_json(state["gate_stats"]) or {}
