"""Codebook initialisation: exact 1-D k-means and window plans."""
import itertools

import numpy as np
import pytest

from sqs_pyro.guides import iqr_fences, kmeans_1d, plan_windows
from sqs_pyro.guides.kmeans import gmm_from_centres
from sqs_pyro.guides.windows import allocate_levels, kmeans_sse


def brute_force_sse(x, k):
    x = np.sort(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        parts = np.split(x, cuts)
        best = min(best, sum(((p - p.mean()) ** 2).sum() for p in parts))
    return best


def sse(x, centres):
    return (np.min((x[:, None] - centres[None, :]) ** 2, axis=1)).sum()


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_is_exact_on_small_inputs(seed):
    x = np.random.default_rng(seed).standard_t(3, size=11)
    centres = kmeans_1d(x, 3)
    assert sse(x, centres) == pytest.approx(brute_force_sse(x, 3), rel=1e-9)


def test_kmeans_finds_planted_clusters_on_large_inputs():
    rng = np.random.default_rng(0)
    truth = np.array([-2.0, -0.5, 0.0, 1.0, 3.0])
    x = np.concatenate([c + 0.01 * rng.standard_normal(20_000) for c in truth])
    np.testing.assert_allclose(kmeans_1d(x, 5), truth, atol=1e-3)


def test_kmeans_is_deterministic_and_caps_k_at_distinct_values():
    x = np.random.default_rng(1).standard_normal(50_000)
    np.testing.assert_array_equal(kmeans_1d(x, 16), kmeans_1d(x.copy(), 16))
    np.testing.assert_array_equal(kmeans_1d(np.array([1.0, 1.0, 2.0]), 4), [1.0, 2.0])


def test_gmm_from_centres_weighs_nearest_centre_clusters_with_valid_scales():
    x = np.array([-5.0, -1.0, -0.9, 0.0, 0.1, 0.2, 7.0])
    locs, weights, scales = gmm_from_centres(x, np.array([-1.0, 0.1, 3.0]))
    np.testing.assert_array_equal(locs, [-1.0, 0.1, 3.0])  # the centres, as given
    np.testing.assert_allclose(weights, np.array([3, 3, 1]) / 7)  # clusters split at -0.45 and 1.55
    assert scales[1] == pytest.approx(np.std([0.0, 0.1, 0.2]))
    assert np.all(scales > 0) and np.all(np.isfinite(scales))


def test_outlier_windows_isolate_exactly_the_planted_tails():
    rng = np.random.default_rng(2)
    bulk = rng.uniform(-1, 1, 1000)
    x = np.concatenate([bulk, [-30.0, -25.0, 40.0]])
    lo, hi = iqr_fences(x, 5.0)
    plan = plan_windows(x, 16, "outlier", iqr_factor=5.0)
    assert set(np.flatnonzero(plan.window_ids == 0)) == {1000, 1001}
    assert set(np.flatnonzero(plan.window_ids == 2)) == {1002}
    assert plan.levels == (2, 13, 1)  # tails get min(K // 8, size) levels; the bulk the rest
    assert lo > -30 and hi < 40 and np.all((bulk > lo) & (bulk < hi))


def test_equal_windows_are_equal_count_and_ordered():
    x = np.random.default_rng(3).standard_normal(1000)
    plan = plan_windows(x, 8, "equal", equal_windows=4)
    assert plan.levels == (2, 2, 2, 2)
    assert np.bincount(plan.window_ids).tolist() == [250] * 4
    assert all(x[plan.window_ids == w].max() <= x[plan.window_ids == w + 1].min() for w in range(3))


def test_equal_windows_split_a_layer_by_sign_when_the_kept_tails_are_unequal():
    """Fit values = the two tails of a magnitude cut, with more negatives kept than positives: two
    equal-count windows still split the layer at its median (near 0), each window one sign. Cut at
    the fit values' median (the earlier rule, the negative control) a window spans both signs."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0.0, 0.1, 4000), -rng.uniform(0.3, 0.6, 300), rng.uniform(0.3, 0.6, 200)])
    fit = np.abs(x) > 0.28
    plan = plan_windows(x, 4, "equal", equal_windows=2, fit=fit)
    kept = [x[fit & (plan.window_ids == w)] for w in (0, 1)]
    assert kept[0].max() < 0 < kept[1].min()
    cut = np.sort(x[fit])[fit.sum() // 2]  # the fit values' median
    assert (x[fit] < cut).sum() and (x[fit & (x >= cut)] < 0).any()  # a window that spans both signs


def test_no_window_mode_and_no_outliers():
    x = np.random.default_rng(4).uniform(-1, 1, 100)
    assert plan_windows(x, 4, "none").levels == (4,)
    assert plan_windows(x, 4, "outlier").levels == (4,)  # uniform data has no IQR outliers


def _naive_allocation(groups, total):
    """The greedy split recomputing every k-means SSE it compares (the reference)."""
    levels = [1] * len(groups)
    distinct = [len(np.unique(g)) for g in groups]
    for _ in range(total - len(groups)):
        gains = [kmeans_sse(g, k) - kmeans_sse(g, k + 1) if k < d else -1.0 for g, k, d in zip(groups, levels, distinct)]
        best = int(np.argmax(gains))
        if gains[best] < 0:
            best = int(np.argmax([g.size for g in groups]))
        levels[best] += 1
    return levels


def test_level_allocation_equals_the_naive_greedy_that_recomputes_every_sse():
    rng = np.random.default_rng(0)
    for trial in range(25):
        groups = [np.sort(rng.standard_t(3, size=int(rng.integers(1, 400)))) for _ in range(int(rng.integers(1, 4)))]
        if trial % 5 == 0:
            groups.append(np.array([1.0, 1.0, 2.0]))  # fewer distinct values than levels it may get
        total = int(rng.integers(len(groups), 20))
        assert allocate_levels(groups, total) == _naive_allocation(groups, total)


def test_weighted_kmeans_ignores_weightless_points_and_checks_weights():
    import numpy as np
    import pytest

    from sqs_pyro.guides.kmeans import kmeans_1d

    x = np.array([0.0, 0.0, 1.0, 1.0, 10.0])
    np.testing.assert_allclose(kmeans_1d(x, 2, weights=np.array([1, 1, 1, 1, 0.0])), [0.0, 1.0])
    np.testing.assert_allclose(kmeans_1d(x, 2), [0.5, 10.0])  # unweighted: the far point gets a level
    np.testing.assert_allclose(kmeans_1d(x, 2, weights=np.full(5, 3.0)), [0.5, 10.0])  # a constant weight changes nothing
    with pytest.raises(ValueError, match="weights"):
        kmeans_1d(x, 2, weights=np.array([1, 1, 1, 1, -1.0]))
