"""smine_jax.batch_miners against slow Python-loop references over (anchor, positive, negative).

Exact-match tests on Gaussian data feed the reference the module's own float32 distance matrix
(``distances.pairwise_sq_dists``, itself checked against float64 numpy below), so that a near-tie
rounded differently cannot make the test flaky; the integer-valued tests compute exact distances
in numpy, independently of the module, and are full of exact ties.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from smine_jax import batch_miners as bm
from smine_jax import distances

# Few shapes, reused everywhere, to keep jit compilations few.
SHAPES = [(9, 3), (40, 8)]


# --------------------------------------------------------------------------- problem makers


def make_batch(seed, num_rows, dim, *, integer=False, num_classes=None, pad_fraction=0.0):
    """Random batch: embeddings, labels (with one-sample classes), bool mask of real rows."""
    rng = np.random.default_rng(seed)
    if integer:
        x = rng.integers(-2, 3, size=(num_rows, dim)).astype(np.float32)
    else:
        x = rng.normal(size=(num_rows, dim)).astype(np.float32)
    num_classes = num_classes or max(2, num_rows // 3)
    labels = rng.integers(0, num_classes, size=num_rows)
    labels[0] = 10_000  # a one-sample class
    labels = (labels * 7 - 3).astype(np.int64)  # arbitrary (negative, non-contiguous) labels
    mask = rng.random(num_rows) >= pad_fraction
    return x, labels, mask


def unit_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def module_sq_dists(x, mask):
    return np.asarray(distances.pairwise_sq_dists(jnp.asarray(x), jnp.asarray(mask)))


def exact_sq_dists(x):
    xi = x.astype(np.int64)
    return ((xi[:, None, :] - xi[None, :, :]) ** 2).sum(-1)


def as_numpy(triplets):
    return bm.BatchTriplets(*(np.asarray(t) for t in triplets))


# --------------------------------------------------------------------------- references


def beyond_boundary(sq, labels, mask, a, n, kappa):
    """Eq. 6 inside the batch: n is not skipped by κ · d²(a, nearest positive of a)."""
    if kappa is None:
        return True
    positives = [sq[a, p] for p in range(len(labels))
                 if mask[p] and p != a and labels[p] == labels[a]]
    return not positives or sq[a, n] >= np.float32(kappa) * min(positives)


def reference_semihard(sq, labels, mask, *, fallback="largest", margin=0.2, kappa=None):
    """B*B slots (a, p): Python loops over n, ties by lowest index."""
    num_rows = len(labels)
    margin = np.float32(margin)
    rows = []
    for a in range(num_rows):
        negatives = [n for n in range(num_rows) if mask[n] and labels[n] != labels[a]
                     and beyond_boundary(sq, labels, mask, a, n, kappa)]
        for p in range(num_rows):
            is_pair = mask[a] and mask[p] and p != a and labels[p] == labels[a]
            if not is_pair or not negatives:
                rows.append((a, a, a, False))
                continue
            farther = [n for n in negatives if sq[a, n] > sq[a, p]]
            if farther:
                n = min(farther, key=lambda n: (sq[a, n], n))
                if fallback == "invalid" and not sq[a, n] < sq[a, p] + margin:
                    rows.append((a, a, a, False))
                else:
                    rows.append((a, p, n, True))
            elif fallback == "largest":
                rows.append((a, p, min(negatives, key=lambda n: (-sq[a, n], n)), True))
            else:
                rows.append((a, a, a, False))
    return np.array(rows, dtype=np.int64).T


def reference_batch_hard(sq, labels, mask, kappa=None):
    num_rows = len(labels)
    rows = []
    for a in range(num_rows):
        positives = [p for p in range(num_rows)
                     if mask[a] and mask[p] and p != a and labels[p] == labels[a]]
        negatives = [n for n in range(num_rows)
                     if mask[a] and mask[n] and labels[n] != labels[a]
                     and beyond_boundary(sq, labels, mask, a, n, kappa)]
        if not positives or not negatives:
            rows.append((a, a, a, False))
            continue
        p = min(positives, key=lambda p: (-sq[a, p], p))
        n = min(negatives, key=lambda n: (sq[a, n], n))
        rows.append((a, p, n, True))
    return np.array(rows, dtype=np.int64).T


def reference_all(sq, labels, mask, num_positives, kappa=None):
    """B*P*B slots (a, j-th positive, n) in that order."""
    num_rows = len(labels)
    rows = []
    for a in range(num_rows):
        positives = [p for p in range(num_rows)
                     if mask[a] and mask[p] and p != a and labels[p] == labels[a]]
        for j in range(num_positives):
            for n in range(num_rows):
                ok = (j < len(positives) and mask[a] and mask[n] and labels[n] != labels[a]
                      and beyond_boundary(sq, labels, mask, a, n, kappa))
                rows.append((a, positives[j], n, True) if ok else (a, a, a, False))
    return np.array(rows, dtype=np.int64).T


def reference_dw_probabilities(x, labels, mask, anchor, *, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """Wu et al. weights q(d)^-1 in float64, straight from the formula (no log space)."""
    x = x.astype(np.float64)
    dim = x.shape[1]
    negatives = [n for n in range(len(labels))
                 if mask[anchor] and mask[n] and labels[n] != labels[anchor]]
    weights = np.zeros(len(labels))
    for n in negatives:
        d = max(np.linalg.norm(x[anchor] - x[n]), cutoff)
        if d < nonzero_loss_cutoff:
            weights[n] = d ** (2 - dim) * (1 - d * d / 4) ** (-(dim - 3) / 2)
    if not weights.any():
        weights[negatives] = 1.0
    return weights / weights.sum()


def check_against(triplets, reference):
    got = as_numpy(triplets)
    for name, expected in zip(("anchor", "positive", "negative", "valid"), reference, strict=True):
        np.testing.assert_array_equal(getattr(got, name), expected, err_msg=name)


# --------------------------------------------------------------------------- distances


@pytest.mark.parametrize("num_rows,dim", SHAPES)
def test_pairwise_sq_dists_matches_float64(num_rows, dim):
    x, _, mask = make_batch(1, num_rows, dim, pad_fraction=0.2)
    x[~mask] = np.nan  # padded rows are zeroed before use: no NaN leaks into real rows
    got = module_sq_dists(x, mask)
    xr = np.where(mask[:, None], x, 0).astype(np.float64)
    expected = ((xr[:, None] - xr[None]) ** 2).sum(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32 and np.all(np.diag(got) == 0)


# --------------------------------------------------------------------------- semi-hard


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES),
       fallback=st.sampled_from(bm.SEMIHARD_FALLBACKS), integer=st.booleans(),
       pad_fraction=st.sampled_from([0.0, 0.3]), classes=st.integers(2, 6))
def test_semihard_matches_reference(seed, shape, fallback, integer, pad_fraction, classes):
    x, labels, mask = make_batch(seed, *shape, integer=integer, num_classes=classes,
                                 pad_fraction=pad_fraction)
    sq = exact_sq_dists(x) if integer else module_sq_dists(x, mask)
    got = bm.semihard_triplets(x, labels, mask=mask, fallback=fallback)
    check_against(got, reference_semihard(sq, labels, mask, fallback=fallback))


def test_semihard_ties_and_fallback_pick_lowest_index():
    # Anchor 0 at the origin, positive 1 at squared distance 1; negatives (class 1):
    # row 2 at sq 1 (equal to d(a,p): not semi-hard), rows 3 and 5 at sq 4 (tie), row 4 at sq 9.
    x = np.array([[0, 0], [1, 0], [0, 1], [2, 0], [3, 0], [0, 2]], np.float32)
    labels = np.array([0, 0, 1, 1, 1, 1])
    got = as_numpy(bm.semihard_triplets(x, labels))
    assert got.valid[0 * 6 + 1] and got.negative[0 * 6 + 1] == 3
    # Move the positive beyond every negative: no semi-hard negative, so the fallback applies.
    x_far = x.copy()
    x_far[1] = [-3, 0]  # sq 9 to the anchor; negatives at 1, 4, 9, 4: none strictly farther
    x_far[4] = [0, -2]  # now rows 3, 4, 5 all at sq 4: the largest d(a, n), lowest index 3
    got = as_numpy(bm.semihard_triplets(x_far, labels))
    assert got.valid[1] and got.negative[1] == 3
    got = as_numpy(bm.semihard_triplets(x_far, labels, fallback="invalid"))
    assert not got.valid[1] and got.positive[1] == 0 and got.negative[1] == 0


def test_semihard_invalid_mode_keeps_only_the_margin_band():
    # d(a,p)^2 = 1; the only negative is at sq 4: semi-hard for margin > 3 only.
    x = np.array([[0, 0], [1, 0], [2, 0]], np.float32)
    labels = np.array([5, 5, 9])
    for margin, expected in [(0.2, False), (3.0, False), (3.5, True), (np.inf, True)]:
        got = as_numpy(bm.semihard_triplets(x, labels, margin=margin, fallback="invalid"))
        assert got.valid[1] == expected, margin
    got = as_numpy(bm.semihard_triplets(x, labels, margin=0.2))  # TF-Addons rule: still used
    assert got.valid[1] and got.negative[1] == 2


# --------------------------------------------------------------------------- batch-hard


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES), integer=st.booleans(),
       pad_fraction=st.sampled_from([0.0, 0.3]), classes=st.integers(2, 6))
def test_batch_hard_matches_reference(seed, shape, integer, pad_fraction, classes):
    x, labels, mask = make_batch(seed, *shape, integer=integer, num_classes=classes,
                                 pad_fraction=pad_fraction)
    sq = exact_sq_dists(x) if integer else module_sq_dists(x, mask)
    check_against(bm.batch_hard_triplets(x, labels, mask=mask),
                  reference_batch_hard(sq, labels, mask))


def test_batch_hard_ties_pick_lowest_index():
    # Anchor 0; positives 1, 2 both at sq 4 (farthest tie); negatives 3, 4 both at sq 1.
    x = np.array([[0, 0], [2, 0], [0, 2], [1, 0], [0, 1], [1, 1]], np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    got = as_numpy(bm.batch_hard_triplets(x, labels))
    assert got.valid[0] and got.positive[0] == 1 and got.negative[0] == 3


# --------------------------------------------------------------------------- shared edges


MINERS = {
    "semihard": lambda x, y, **kw: bm.semihard_triplets(x, y, **kw),
    "semihard_invalid": lambda x, y, **kw: bm.semihard_triplets(x, y, fallback="invalid", **kw),
    "batch_hard": lambda x, y, **kw: bm.batch_hard_triplets(x, y, **kw),
    "distance_weighted": lambda x, y, **kw: bm.distance_weighted_triplets(
        jax.random.key(3), x, y, **kw),
    "all": lambda x, y, **kw: bm.all_triplets(x, y, positives_per_anchor=3, **kw),
    "semihard_kappa": lambda x, y, **kw: bm.semihard_triplets(x, y, kappa=1.5, **kw),
    "all_kappa": lambda x, y, **kw: bm.all_triplets(x, y, positives_per_anchor=2, kappa=2.0,
                                                     **kw),
}


@pytest.mark.parametrize("name", MINERS)
def test_no_triplet_without_positive_or_negative(name):
    x = unit_rows(np.random.default_rng(0).normal(size=(9, 3)))
    one_class = MINERS[name](x, np.full(9, 4))  # no negatives anywhere
    all_singletons = MINERS[name](x, np.arange(9))  # no positives anywhere
    for got in (as_numpy(one_class), as_numpy(all_singletons)):
        assert not got.valid.any()
        np.testing.assert_array_equal(got.positive, got.anchor)
        np.testing.assert_array_equal(got.negative, got.anchor)


@pytest.mark.parametrize("name", MINERS)
def test_padded_rows_never_used_and_their_values_ignored(name):
    x, labels, mask = make_batch(7, 40, 8, pad_fraction=0.3)
    x = unit_rows(x)
    got = as_numpy(MINERS[name](x, labels, mask=mask))
    used = np.concatenate([got.anchor[got.valid], got.positive[got.valid],
                           got.negative[got.valid]])
    assert got.valid.any() and mask[used].all()
    # Garbage (NaN) in padded rows, under jit where no host check runs, changes nothing.
    x_nan = x.copy()
    x_nan[~mask] = np.nan
    jitted = as_numpy(jax.jit(lambda x: MINERS[name](x, labels, mask=mask))(x_nan))
    for field in bm.BatchTriplets._fields:
        np.testing.assert_array_equal(getattr(jitted, field), getattr(got, field), err_msg=field)


@pytest.mark.parametrize("name", MINERS)
def test_int64_labels_that_collide_in_int32_stay_distinct(name):
    x = unit_rows(np.random.default_rng(2).normal(size=(9, 3)))
    small = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    huge = np.array([2**40, 2**32, 0])[small].astype(np.int64)  # all equal modulo 2**32
    for field in bm.BatchTriplets._fields:
        np.testing.assert_array_equal(np.asarray(getattr(MINERS[name](x, huge), field)),
                                      np.asarray(getattr(MINERS[name](x, small), field)))


@pytest.mark.parametrize("name", MINERS)
def test_jit_equals_eager(name):
    x, labels, mask = make_batch(11, 9, 3, pad_fraction=0.2)
    x = unit_rows(x)
    labels = np.unique(labels, return_inverse=True)[1].astype(np.int32)
    with jax.disable_jit():
        eager = as_numpy(MINERS[name](x, labels, mask=mask))
    jitted = as_numpy(jax.jit(lambda x, y, m: MINERS[name](x, y, mask=m))(x, labels, mask))
    for field in bm.BatchTriplets._fields:
        np.testing.assert_array_equal(getattr(jitted, field), getattr(eager, field), err_msg=field)
        assert getattr(jitted, field).dtype == (bool if field == "valid" else np.int32)


@pytest.mark.parametrize("name", MINERS)
def test_no_cubic_buffer(name):
    # D = B, so a materialised [B, B, D] difference tensor would show; the distances' broadcast
    # subtract-square-sum is fused into one reduction, which is what this checks in the compiled
    # program's scratch memory.
    num_rows = 64
    x = jnp.zeros((num_rows, num_rows), jnp.float32)
    labels = jnp.zeros(num_rows, jnp.int32)
    mask = jnp.ones(num_rows, bool)
    compiled = jax.jit(lambda x, y, m: MINERS[name](x, y, mask=m)).lower(x, labels, mask).compile()
    memory = compiled.memory_analysis()
    if memory is None:
        pytest.skip("this backend reports no memory analysis")
    assert memory.temp_size_in_bytes < 4 * num_rows**3 / 4, memory.temp_size_in_bytes


# --------------------------------------------------------------------------- all triplets, κ


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES), integer=st.booleans(),
       pad_fraction=st.sampled_from([0.0, 0.3]), classes=st.integers(2, 6),
       num_positives=st.sampled_from([1, 3, 12]),
       kappa=st.sampled_from([None, 0.0, 1.0, 2.5]))
def test_all_triplets_matches_reference(seed, shape, integer, pad_fraction, classes,
                                        num_positives, kappa):
    x, labels, mask = make_batch(seed, *shape, integer=integer, num_classes=classes,
                                 pad_fraction=pad_fraction)
    sq = exact_sq_dists(x) if integer else module_sq_dists(x, mask)
    got = bm.all_triplets(x, labels, positives_per_anchor=num_positives, mask=mask, kappa=kappa)
    check_against(got, reference_all(sq, labels, mask, num_positives, kappa))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES), integer=st.booleans(),
       pad_fraction=st.sampled_from([0.0, 0.3]), classes=st.integers(2, 6),
       kappa=st.sampled_from([0.5, 1.0, 2.0, 4.0]), fallback=st.sampled_from(
           bm.SEMIHARD_FALLBACKS))
def test_kappa_skips_the_negatives_inside_the_boundary(seed, shape, integer, pad_fraction,
                                                       classes, kappa, fallback):
    """Semi-hard and batch-hard with κ equal their references run on the allowed negatives."""
    x, labels, mask = make_batch(seed, *shape, integer=integer, num_classes=classes,
                                 pad_fraction=pad_fraction)
    sq = exact_sq_dists(x) if integer else module_sq_dists(x, mask)
    check_against(bm.semihard_triplets(x, labels, mask=mask, fallback=fallback, kappa=kappa),
                  reference_semihard(sq, labels, mask, fallback=fallback, kappa=kappa))
    check_against(bm.batch_hard_triplets(x, labels, mask=mask, kappa=kappa),
                  reference_batch_hard(sq, labels, mask, kappa=kappa))


def test_kappa_in_distance_weighted_never_draws_a_skipped_negative():
    x, labels, mask = make_batch(5, 40, 8, pad_fraction=0.2)
    x = unit_rows(x)
    sq = module_sq_dists(x, mask)
    for kappa in (1.0, 3.0):
        got = as_numpy(bm.distance_weighted_triplets(jax.random.key(1), x, labels, mask=mask,
                                                     kappa=kappa))
        for a, n in zip(got.anchor[got.valid], got.negative[got.valid], strict=True):
            assert beyond_boundary(sq, labels, mask, a, n, kappa)
        # An anchor whose every negative lies inside the boundary has no valid slot.
        for a in set(got.anchor.tolist()):
            allowed = [n for n in range(40) if mask[n] and labels[n] != labels[a]
                       and beyond_boundary(sq, labels, mask, a, n, kappa)]
            if not allowed:
                assert not got.valid[got.anchor == a].any()


@pytest.mark.parametrize("name", ["semihard", "batch_hard", "distance_weighted", "all"])
def test_kappa_zero_equals_no_kappa_and_traced_kappa_equals_eager(name):
    x, labels, mask = make_batch(13, 40, 8, pad_fraction=0.2)
    x = unit_rows(x)
    plain = as_numpy(MINERS[name](x, labels, mask=mask))
    zero = as_numpy(MINERS[name](x, labels, mask=mask, kappa=0.0))
    eager = as_numpy(MINERS[name](x, labels, mask=mask, kappa=2.0))
    traced = as_numpy(jax.jit(lambda k: MINERS[name](x, labels, mask=mask, kappa=k))(2.0))
    for field in bm.BatchTriplets._fields:
        np.testing.assert_array_equal(getattr(zero, field), getattr(plain, field))
        np.testing.assert_array_equal(getattr(traced, field), getattr(eager, field))
    assert eager.valid.sum() < plain.valid.sum()


# --------------------------------------------------------------------------- distance-weighted


def test_distance_weighted_validity_invariants():
    for seed in range(4):
        x, labels, mask = make_batch(seed, 40, 8, pad_fraction=0.25)
        x = unit_rows(x)
        got = as_numpy(bm.distance_weighted_triplets(jax.random.key(seed), x, labels, mask=mask))
        a, p = np.divmod(np.arange(40 * 40), 40)
        has_negative = np.array([mask[i] and (mask & (labels != labels[i])).any()
                                 for i in range(40)])
        expected_valid = mask[a] & mask[p] & (a != p) & (labels[a] == labels[p]) & has_negative[a]
        np.testing.assert_array_equal(got.valid, expected_valid)
        np.testing.assert_array_equal(got.anchor, a)
        v = got.valid
        np.testing.assert_array_equal(got.positive[v], p[v])
        assert mask[got.negative[v]].all()
        assert (labels[got.negative[v]] != labels[got.anchor[v]]).all()


DRAWS = 4000  # keys per distribution test; one shape (12 x 4) so one compilation serves all


def _draw_many(x, labels, mask, **kwargs):
    """[DRAWS, B * B] negatives, one row per key."""
    keys = jax.random.split(jax.random.key(0), DRAWS)
    draw = jax.vmap(
        lambda k: bm.distance_weighted_triplets(k, x, labels, mask=mask, **kwargs).negative)
    return np.asarray(draw(keys))


def test_distance_weighted_matches_analytic_distribution():
    num_rows, dim = 12, 4
    rng = np.random.default_rng(10)  # one negative at d = 0.3 < cutoff
    x = unit_rows(rng.normal(size=(num_rows, dim)))
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5])
    mask = np.ones(num_rows, bool)
    mask[10] = False
    anchor, positives = 0, (1, 2)
    probs = reference_dw_probabilities(x, labels, mask, anchor)
    negatives = mask & (labels != labels[anchor])
    beyond = negatives & (np.linalg.norm(x - x[anchor], axis=1) >= 1.4)
    assert beyond.sum() >= 2 and (probs > 0).sum() >= 4  # ineligible negatives exist too
    draws = _draw_many(x, labels, mask)
    for positive in positives:
        counts = np.bincount(draws[:, anchor * num_rows + positive], minlength=num_rows)
        assert counts[probs == 0].sum() == 0  # beyond nonzero_loss_cutoff, positives, padded
        expected = probs[probs > 0] * DRAWS
        assert expected.min() >= 20
        assert stats.chisquare(counts[probs > 0], expected).pvalue > 1e-4
    # The two slots of one anchor draw independently: P(same) = sum p^2.
    same = np.mean(draws[:, anchor * num_rows + 1] == draws[:, anchor * num_rows + 2])
    assert abs(same - np.sum(probs**2)) < 4 * np.sqrt(np.sum(probs**2) / DRAWS)


def test_distance_weighted_uniform_when_no_negative_is_near_enough():
    # Anchor 0 and positive 1 near +e1; row 6 (near, padded) is the only negative closer than
    # 1.4; the others sit near -e1 (d ~ 2) or at +e4 (d = sqrt 2 ~ 1.414).
    x = unit_rows(np.array([
        [1, 0, 0, 0], [1, 0.05, 0, 0], [-1, 0, 0, 0], [-1, 0.1, 0, 0], [-1, 0, 0.1, 0],
        [-1, -0.1, 0, 0], [0.9, 0.1, 0, 0], [-1, 0.2, 0.2, 0], [-1, 0, -0.2, 0],
        [-1, 0, 0, 0.2], [-1, 0, 0, -0.2], [0, 0, 0, 1]]))
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6])
    mask = np.ones(12, bool)
    mask[6] = False
    probs = reference_dw_probabilities(x, labels, mask, 0)
    expected = np.full(12, 1 / 9)
    expected[[0, 1, 6]] = 0
    np.testing.assert_allclose(probs, expected)
    draws = _draw_many(x, labels, mask)
    counts = np.bincount(draws[:, 0 * 12 + 1], minlength=12)
    assert counts[[0, 1, 6]].sum() == 0
    assert stats.chisquare(counts[probs > 0]).pvalue > 1e-4
    # Unmask row 6: now the only eligible negative, so every slot of anchor 0 draws it.
    draws = _draw_many(x, labels, np.ones(12, bool))
    assert (draws[:, [1]] == 6).all()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,match", [
    (lambda x, y: bm.semihard_triplets(x, y, fallback="hardest"), "fallback"),
    (lambda x, y: bm.semihard_triplets(x, y, margin=-0.1), "margin"),
    (lambda x, y: bm.semihard_triplets(x, y, margin=float("nan")), "margin"),
    (lambda x, y: bm.batch_hard_triplets(x, y[:-1]), "labels"),
    (lambda x, y: bm.batch_hard_triplets(x, y.astype(float) + 0.5), "labels"),
    (lambda x, y: bm.batch_hard_triplets(x[0], y), "embeddings"),
    (lambda x, y: bm.batch_hard_triplets(np.where(x > 1, np.nan, x), y), "embeddings"),
    (lambda x, y: bm.batch_hard_triplets(x, y, mask=np.ones(9)), "mask"),
    (lambda x, y: bm.batch_hard_triplets(x, y, mask=np.ones(8, bool)), "mask"),
    (lambda x, y: bm.distance_weighted_triplets(jax.random.key(0), x, y, cutoff=0.0), "cutoff"),
    (lambda x, y: bm.distance_weighted_triplets(jax.random.key(0), x, y, cutoff=1.5),
     "nonzero_loss_cutoff"),
    (lambda x, y: bm.semihard_triplets(x, y, kappa=-1.0), "kappa"),
    (lambda x, y: bm.batch_hard_triplets(x, y, kappa=np.ones(2)), "kappa"),
    (lambda x, y: bm.all_triplets(x, y, positives_per_anchor=0), "positives_per_anchor"),
    (lambda x, y: bm.all_triplets(x, y, positives_per_anchor=2, kappa=float("inf")), "kappa"),
])
def test_bad_input_raises_naming_the_argument(call, match):
    x = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32) * 3
    y = np.arange(9) % 3
    with pytest.raises(ValueError, match=match):
        call(x, y)
