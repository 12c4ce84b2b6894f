"""DISCO's server-side routing as plain functions (tensors in, tensors out; no model): similarities, the
threshold routing of client identity tokens to subspaces, greedy disjoint grouping of new clients, the running mean
of the global tokens, and the inference gate's weights from similarities.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional, Sequence

import torch

NEW = -1  # route(): "no used subspace is close enough, open a new one"
Variant = Literal["softmax", "concat", "cosine", "argmax"]


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarities in fp32; a zero vector (an unused centre) has similarity 0 to everything."""
    a = torch.nn.functional.normalize(torch.as_tensor(a).float().reshape(-1, a.shape[-1]), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(b).float().reshape(-1, b.shape[-1]), dim=-1)
    return a @ b.T


def task_overlap(tokens: dict[str, torch.Tensor]) -> list[tuple[float, str, str]]:
    """(cosine, task, task) for every pair of tasks' identity tokens, highest first."""
    names = list(tokens)
    if len(names) < 2:
        return []
    stacked = torch.stack([tokens[n] for n in names])
    sims = cosine_matrix(stacked, stacked)
    pairs = [(float(sims[i, j]), names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    return sorted(pairs, key=lambda p: -p[0])


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
                 stage_slots: Optional[Sequence[int]] = None,
                 late_route: Literal["tau", "nearest"] = "nearest") -> tuple[list[int], list[str]]:
    """The server's plan: a slot per client and why (``matched`` | ``nearest`` | ``new`` | ``merged`` | ``overflow``).

    ``sim_c`` (n, E): clients vs global tokens; ``sim_pair`` (n, n): clients vs clients; ``used`` (E,) bool.
    Every decision to share a subspace needs a similarity of at least ``tau``; below it a client's group opens a
    free slot, whatever its size or round:

    * a client within ``tau`` of a used global token trains that subspace (``matched``). With ``allow_new=False``
      (rounds after the first of a stage) the stage's own slots (``stage_slots``; all used slots when not given)
      come first: the nearest of them if it is within ``tau`` (``nearest``), so a client whose few samples give an
      off token does not drift to another task's subspace. ``late_route="nearest"`` is the reference's rule
      instead: every such client takes its nearest stage slot at any similarity (kept for comparison: with as many
      slots as tasks, a noisy small client that opens a slot can leave the last task none);
    * the others are grouped by greedy threshold clustering, and each group opens a free slot (``new``). A group
      holding less than ``min_share`` of the round's samples has a noisy token, so it joins one of this round's
      groups if its mean similarity to that group's clients reaches ``tau`` (``merged``; the reference's
      tiny-singleton rule, which merges by share alone, put a new task's small client into another task's subspace);
      otherwise it opens its own slot like any group.

    When no free slot is left, a group that needs one trains its nearest slot (``overflow``, with a warning that names
    ``num_subspaces``), in later rounds the nearest of the stage's slots: the run goes on as the reference's capped
    bank does, rather than failing a long run at its last stage over a capacity the user can raise.
    """
    used = torch.as_tensor(used, dtype=torch.bool)
    n, E = sim_c.shape
    sim_c = sim_c.float()
    fallback = used.clone()  # where an overflowing group goes
    if not allow_new and bool(used.any()):
        if stage_slots:
            fallback = torch.zeros_like(used)
            fallback[list(stage_slots)] = True
        slots = route_sim(sim_c, fallback, -math.inf if late_route == "nearest" else tau)
        kinds = ["nearest" if s != NEW else "" for s in slots]
        # Below tau to every slot of the stage: route as in a stage's first round (a used slot within tau, or new).
        rest = [i for i, s in enumerate(slots) if s == NEW]
        for i, s in zip(rest, route_sim(sim_c[rest], used, tau) if rest else []):
            if s != NEW:
                slots[i], kinds[i] = s, "matched"
    else:
        slots = route_sim(sim_c, used, tau)
        kinds = ["matched" if s != NEW else "" for s in slots]
    pending = [i for i, s in enumerate(slots) if s == NEW]
    if not pending:
        return slots, kinds
    counts = torch.ones(n) if counts is None else torch.as_tensor(counts, dtype=torch.float32)
    total = float(counts.sum()) or 1.0
    clusters = greedy_threshold_clusters(sim=sim_pair[pending][:, pending], tau=tau, weights=counts[pending].tolist())
    groups = [[pending[g] for g in group] for group in clusters]
    # Groups that may found a subspace on their own first, so that a tiny group can join one of them.
    tiny = [g for g in groups if float(counts[g].sum()) / total < min_share]
    solid = [g for g in groups if float(counts[g].sum()) / total >= min_share]
    # This round's clients by slot: the groups a tiny group may join.
    peers: dict[int, list[int]] = {}
    for i, j in enumerate(slots):
        if j != NEW:
            peers.setdefault(j, []).append(i)
    taken = used.clone()
    opened: dict[int, list[int]] = {}  # slots opened in this call -> their clients
    for members in solid + tiny:
        if float(counts[members].sum()) / total < min_share and peers:
            slot, sim = _nearest_group(members, sim_pair, peers)
            if sim >= tau:
                peers[slot].extend(members)
                for m in members:
                    slots[m], kinds[m] = slot, "merged"
                continue
        free = (~taken).nonzero().flatten()
        if len(free):
            slot, kind = int(free[0]), "new"
            taken[slot] = True
            opened[slot] = []
        else:
            slot, kind = _nearest_slot(members, sim_c, sim_pair, fallback, opened), "overflow"
            warnings.warn(
                f"DISCO: all {E} subspaces are in use; clients {members} share subspace {slot} (the nearest) "
                f"instead of a new one; raise method.params.num_subspaces to keep them apart",
                RuntimeWarning,
                stacklevel=2,
            )
        peers.setdefault(slot, []).extend(members)
        if slot in opened:
            opened[slot].extend(members)
        for m in members:
            slots[m], kinds[m] = slot, kind
    return slots, kinds


def _nearest_group(members: list[int], sim_pair: torch.Tensor, peers: dict[int, list[int]]) -> tuple[int, float]:
    """The slot whose clients of this round are most similar to ``members`` (mean pairwise cosine), and that cosine."""
    cand = {j: float(sim_pair[members][:, mem].mean()) for j, mem in peers.items()}
    slot = max(cand.items(), key=lambda kv: kv[1])[0]
    return slot, cand[slot]


def _nearest_slot(members: list[int], sim_c: torch.Tensor, sim_pair: torch.Tensor, allowed: torch.Tensor,
                  opened: dict[int, list[int]]) -> int:
    """The slot most similar to a group: an allowed used slot by its global token, or one opened in this call by its
    members (which have no global token yet)."""
    cand: dict[int, float] = {int(j): float(sim_c[members, j].mean()) for j in allowed.nonzero().flatten()}
    for j, mem in opened.items():
        cand[j] = float(sim_pair[members][:, mem].mean())
    return max(cand.items(), key=lambda kv: kv[1])[0]


# A task whose instructions share almost no direction would make every small token look "expectedly" far; the
# correction never assumes less common direction than this.
RHO_MIN = 0.25


def same_task_cosine(n, rho) -> torch.Tensor:
    """The expected cosine between the mean of ``n`` unit vectors drawn from one task and that task's mean direction
    (elementwise over tensors or numbers).

    ``rho`` is the squared norm of the task's mean unit vector (1: every instruction embeds the same; near 0: no
    common direction). The mean of n samples has squared norm about rho + (1 - rho) / n, so its cosine to the
    task's direction is sqrt(rho / (rho + (1 - rho) / n)).
    """
    rho = torch.as_tensor(rho, dtype=torch.float32).clamp(RHO_MIN, 1.0)
    n = torch.as_tensor(n, dtype=torch.float32).clamp_min(1.0)
    return (rho / (rho + (1.0 - rho) / n)).sqrt()


def sampling_corrected(sim_c: torch.Tensor, sim_pair: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor,
                       C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sim_c`` (clients x slots) and ``sim_pair`` (clients x clients) divided by the cosine that two tokens of one
    task would have at their sample counts, for tokens that are means of unit vectors (the MiniLM identity).

    A client's token averages its few instructions, so it sits off its task's direction by sampling noise alone
    (FCIT-Synth v4 with MiniLM: cosine 0.80-0.92 to its own task for 1-3 samples, against tau 0.9; 0.97-0.99 for
    20-50). Held against tau as it is, such a client opened a subspace of its own and left the last task none
    (seeds 1 and 2 of the v4 comparison). Divided by ``same_task_cosine``, a similarity reads as if both tokens were
    exact: a small client of the round's task then reaches tau, one of another task stays far below it. A task's
    rho is estimated where it can be: a slot's global token averages hundreds of instructions (rho ~ |C|^2); a
    client's from its own token (|m|^2 = rho + (1 - rho) / n, so rho = (n |m|^2 - 1) / (n - 1), n >= 2); a pair of
    clients uses the larger one's, and a pair of one-sample clients is left as it is.
    """
    n = torch.as_tensor(counts, dtype=torch.float32).clamp_min(1.0)
    sq = tokens.float().pow(2).sum(1)
    rho_client = torch.where(n >= 2, (n * sq - 1.0) / (n - 1.0).clamp_min(1.0), torch.full_like(n, float("nan")))
    a_c = same_task_cosine(n[:, None], C.float().pow(2).sum(1)[None, :])
    # A pair takes the rho of its larger client (the row's on ties); no estimate there, or the diagonal: no correction.
    rho_pair = torch.where(n[:, None] >= n[None, :], rho_client[:, None], rho_client[None, :])
    a_p = same_task_cosine(n[:, None], rho_pair) * same_task_cosine(n[None, :], rho_pair)
    a_p = torch.where(rho_pair.isnan() | torch.eye(len(n), dtype=torch.bool), torch.ones_like(a_p), a_p)
    return sim_c.float() / a_c, sim_pair.float() / a_p


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
