"""Quantity-skew Dirichlet partition of one task's training data over K clients (reference section 1.5, fixed).

The reference draws ``w ~ Dirichlet(beta)``, gives client i ``floor(w_i * n)`` items, drops the leftover, and redraws
until every client reaches ``min_size`` (which, by a bug, equals beta). Here every client first gets ``min_size``
items and the remaining ``n - K * min_size`` are shared in proportion to ``w`` (largest remainders get the rounding
leftovers), so the sizes sum to exactly n, the floor holds by construction, and small beta never loops forever
(rejection sampling at beta = 0.1 and K = 50 almost never succeeds). The two differ by at most ``min_size`` per client.
"""

from __future__ import annotations

import numpy as np

from fcit.errors import FcitError

# Independent random streams for the different draws of one experiment seed.
STREAM_PARTITION = 1
STREAM_SELECTION = 2
STREAM_SHUFFLE = 3
STREAM_HET_TABLE = 4


def seeded_rng(*keys: int) -> np.random.Generator:
    """A generator determined by integer keys; negative keys are allowed (SeedSequence wants non-negative)."""
    return np.random.default_rng([int(k) % 2**64 for k in keys])


def dirichlet_sizes(n: int, num_clients: int, beta: float, min_size: int, rng: np.random.Generator) -> np.ndarray:
    if num_clients < 1:
        raise FcitError(f"partition: num_clients must be >= 1 (got {num_clients})")
    if not beta > 0:
        raise FcitError(f"partition: beta must be > 0 (got {beta})")
    if min_size < 0:
        raise FcitError(f"partition: min_size must be >= 0 (got {min_size})")
    if n < num_clients * min_size:
        raise FcitError(
            f"partition: {n} samples cannot give {num_clients} clients at least {min_size} each "
            f"(need {num_clients * min_size}); lower num_clients or min_size, or use more data"
        )
    rest = n - num_clients * min_size
    w = rng.dirichlet(np.full(num_clients, float(beta)))
    if not np.all(np.isfinite(w)) or w.sum() <= 0:  # extreme beta underflow; one client takes everything
        w = np.eye(num_clients)[rng.integers(num_clients)]
    share = w / w.sum() * rest
    sizes = np.floor(share).astype(np.int64)
    leftover = rest - int(sizes.sum())
    if leftover:
        sizes[np.argsort(-(share - sizes), kind="stable")[:leftover]] += 1
    return sizes + min_size


def partition(
    n: int, num_clients: int, beta: float, seed: int, stage: int, min_size: int = 1
) -> list[np.ndarray]:
    """Client index arrays over ``range(n)``: a pure function of (n, K, beta, seed, stage, min_size)."""
    rng = seeded_rng(seed, stage, STREAM_PARTITION)
    sizes = dirichlet_sizes(n, num_clients, beta, min_size, rng)
    perm = rng.permutation(n)
    return np.split(perm, np.cumsum(sizes)[:-1])


def gini(sizes) -> float:
    x = np.sort(np.asarray(sizes, dtype=np.float64))
    k = len(x)
    if k == 0 or x.sum() == 0:
        return 0.0
    ranks = np.arange(1, k + 1)
    return float(np.sum((2 * ranks - k - 1) * x) / (k * x.sum()))


def size_stats(sizes) -> dict:
    x = np.asarray(sizes, dtype=np.float64)
    return {
        "min": int(x.min()),
        "median": float(np.median(x)),
        "max": int(x.max()),
        "mean": float(x.mean()),
        "gini": gini(x),
    }
