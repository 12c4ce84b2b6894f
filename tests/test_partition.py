import numpy as np
import pytest

from fcit.data.partition import dirichlet_sizes, gini, partition, seeded_rng, size_stats
from fcit.errors import FcitError

BETAS = [0.5, 1.0, 5.0]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("min_size", [1, 3])
def test_sizes_floor_and_sum(beta, min_size):
    for seed in range(20):
        for n in (50 * min_size, 101, 997):
            idx = partition(n, 50 if n >= 50 * min_size else 7, beta, seed, stage=seed % 3, min_size=min_size)
            sizes = np.array([len(ix) for ix in idx])
            assert sizes.sum() == n  # the remainder is distributed, not dropped
            assert sizes.min() >= min_size
            assert np.array_equal(np.sort(np.concatenate(idx)), np.arange(n))  # disjoint and covering


def test_exact_floor_case():
    sizes = dirichlet_sizes(20, 10, 0.5, 2, seeded_rng(0))
    assert np.array_equal(sizes, np.full(10, 2))


def test_tiny_beta_terminates():
    # rejection sampling (the reference) essentially never succeeds here
    sizes = dirichlet_sizes(200, 50, 0.05, 2, seeded_rng(1))
    assert sizes.sum() == 200 and sizes.min() >= 2


@pytest.mark.parametrize("beta", BETAS)
def test_pure_function(beta):
    a = partition(500, 10, beta, seed=3, stage=2)
    b = partition(500, 10, beta, seed=3, stage=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for other in (partition(500, 10, beta, seed=3, stage=3), partition(500, 10, beta, seed=4, stage=2)):
        assert not all(np.array_equal(x, y) for x, y in zip(a, other))


def test_negative_seed_allowed():
    assert len(partition(30, 3, 1.0, seed=-1, stage=0)) == 3


def test_smaller_beta_more_unequal():
    mean_gini = {
        beta: np.mean([gini(dirichlet_sizes(5000, 50, beta, 1, seeded_rng(s, 9))) for s in range(30)]) for beta in BETAS
    }
    assert mean_gini[0.5] > mean_gini[1.0] > mean_gini[5.0]


def test_validation():
    rng = seeded_rng(0)
    with pytest.raises(FcitError, match="beta"):
        dirichlet_sizes(100, 5, 0.0, 1, rng)
    with pytest.raises(FcitError, match="num_clients"):
        dirichlet_sizes(100, 0, 1.0, 1, rng)
    with pytest.raises(FcitError, match="49 samples cannot give 50 clients"):
        partition(49, 50, 1.0, 0, 0, min_size=1)


def test_size_stats():
    st = size_stats([1, 2, 3, 10])
    assert (st["min"], st["median"], st["max"], st["mean"]) == (1, 2.5, 10, 4.0)
    assert gini([5, 5, 5, 5]) == 0.0
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)
    # mean absolute difference / (2 * mean) for [1, 2, 3, 10]: sum |xi - xj| over ordered pairs = 56
    assert st["gini"] == pytest.approx(56 / (2 * 16 * 4.0))
