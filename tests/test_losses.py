"""Tests of smine_jax.losses against slow, obvious float64 references written here (loops).

Gradients are checked against central finite differences of those float64 references, so a
gradient test fails if either the jax value or its derivative is wrong. Shapes are reused across
tests to keep the number of jit compilations small.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smine_jax import losses

DIM = 5
SIZES = (1, 6, 17)

# Jitted entry points; numeric hyper-parameters are traced (exercises the tracer path of the
# argument checks), Python options are static.
ratio_jit = jax.jit(losses.triplet_ratio_loss)
margin_jit = jax.jit(losses.triplet_margin_loss)
global_jit = jax.jit(losses.global_loss)
objective_jit = jax.jit(losses.triplet_objective, static_argnames=("use_global", "triplet_loss"))
lifted_jit = jax.jit(losses.lifted_structure_loss)
npairs_jit = jax.jit(losses.npairs_loss)


LIFTED_LABELS = np.array([0, 1, 0, 1, 2, 2, 0, 1, 3, 3, 2, 0, 1, 2, 0, 1, 3])

# (value, gradients w.r.t. the three [B, D] inputs) of every loss, jitted once for all examples.
VALUE_AND_GRADS = {
    name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
    for name, fn in {
        "ratio": lambda a, p, n, m: jnp.sum(losses.triplet_ratio_loss(a, p, n, mask=m)),
        "margin": lambda a, p, n, m: jnp.sum(losses.triplet_margin_loss(a, p, n, mask=m)),
        "global": lambda a, p, n, m: losses.global_loss(a, p, n, mask=m),
        "objective": lambda a, p, n, m: losses.triplet_objective(a, p, n, mask=m)[0],
        "lifted": lambda a, p, n, m: losses.lifted_structure_loss(a, LIFTED_LABELS, mask=m),
        "npairs": lambda a, p, n, m: losses.npairs_loss(a, p, labels=LIFTED_LABELS, mask=m),
    }.items()
}


# ----------------------------------------------------------------------------------------------
# Float64 references: one triplet / one pair at a time, straight from the formulas.
# ----------------------------------------------------------------------------------------------


def _dist(x, y):
    return math.sqrt(sum((float(u) - float(v)) ** 2 for u, v in zip(x, y, strict=True)))


def _valid_rows(num_rows, mask):
    return [i for i in range(num_rows) if mask is None or mask[i]]


def ref_ratio(a, p, n, margin=0.2, mask=None):
    out = np.zeros(len(a))
    for i in _valid_rows(len(a), mask):
        out[i] = max(0.0, 1.0 - _dist(a[i], n[i]) / (_dist(a[i], p[i]) + margin))
    return out


def ref_margin(a, p, n, margin=0.2, mask=None):
    out = np.zeros(len(a))
    for i in _valid_rows(len(a), mask):
        out[i] = max(0.0, _dist(a[i], p[i]) ** 2 - _dist(a[i], n[i]) ** 2 + margin)
    return out


def ref_global_stats(a, p, n, mask=None):
    rows = _valid_rows(len(a), mask)
    if not rows:
        return 0.0, 0.0, 0.0, 0.0
    d_pos = [_dist(a[i], p[i]) ** 2 / 4 for i in rows]
    d_neg = [_dist(a[i], n[i]) ** 2 / 4 for i in rows]
    mu_pos = sum(d_pos) / len(rows)
    mu_neg = sum(d_neg) / len(rows)
    var_pos = sum((d - mu_pos) ** 2 for d in d_pos) / len(rows)
    var_neg = sum((d - mu_neg) ** 2 for d in d_neg) / len(rows)
    return mu_pos, mu_neg, var_pos, var_neg


def ref_global(a, p, n, margin=0.01, weight=0.8, mask=None):
    if not _valid_rows(len(a), mask):
        return 0.0
    mu_pos, mu_neg, var_pos, var_neg = ref_global_stats(a, p, n, mask)
    return var_pos + var_neg + weight * max(0.0, mu_pos - mu_neg + margin)


def ref_objective(a, p, n, mask=None, margin=0.2, global_margin=0.01, global_weight=0.8,
                  use_global=True, triplet_loss="ratio"):
    per = (ref_ratio if triplet_loss == "ratio" else ref_margin)(a, p, n, margin, mask)
    rows = _valid_rows(len(a), mask)
    mean = sum(per[i] for i in rows) / len(rows) if rows else 0.0
    glob = ref_global(a, p, n, global_margin, global_weight, mask)
    error = sum(per[i] > 0 for i in rows) / len(rows) if rows else 0.0
    mu_pos, mu_neg, var_pos, var_neg = ref_global_stats(a, p, n, mask)
    loss = mean + glob if use_global else mean
    return loss, {"loss": loss, "triplet_loss": mean, "global_loss": glob,
                  "training_error": error, "mu_pos": mu_pos, "mu_neg": mu_neg,
                  "var_pos": var_pos, "var_neg": var_neg, "num_valid": float(len(rows))}


def ref_lifted(x, y, margin=1.0, mask=None):
    rows = _valid_rows(len(x), mask)
    total, num_pairs = 0.0, 0
    for i in rows:
        for j in rows:
            if j <= i or y[i] != y[j]:
                continue
            num_pairs += 1
            mass = sum(math.exp(margin - _dist(x[i], x[k])) for k in rows if y[k] != y[i])
            mass += sum(math.exp(margin - _dist(x[j], x[k])) for k in rows if y[k] != y[j])
            if mass == 0.0:  # log(0) = -inf: the hinge is 0
                continue
            total += max(0.0, math.log(mass) + _dist(x[i], x[j])) ** 2
    return total / (2 * num_pairs) if num_pairs else 0.0


def ref_npairs(a, p, l2_reg=0.002, labels=None, mask=None):
    rows = _valid_rows(len(a), mask)
    if not rows:
        return 0.0
    xent = 0.0
    for i in rows:
        logits = {j: float(np.dot(a[i].astype(np.float64), p[j].astype(np.float64)))
                  for j in rows}
        top = max(logits.values())
        log_z = top + math.log(sum(math.exp(v - top) for v in logits.values()))
        targets = [j for j in rows if (j == i if labels is None else labels[j] == labels[i])]
        xent += sum(-(logits[j] - log_z) / len(targets) for j in targets)
    reg_a = sum(float(np.dot(a[i], a[i])) for i in rows) / len(rows)
    reg_p = sum(float(np.dot(p[i], p[i])) for i in rows) / len(rows)
    return xent / len(rows) + l2_reg * 0.25 * (reg_a + reg_p)


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------


def random_triplets(seed, size, dim=DIM, scale=0.6):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size, dim))
    p = a + scale * rng.normal(size=(size, dim))
    n = a + 1.3 * scale * rng.normal(size=(size, dim))
    return a.astype(np.float32), p.astype(np.float32), n.astype(np.float32)


def random_mask(seed, size, keep_first=True):
    mask = np.random.default_rng(seed + 1000).random(size) < 0.6
    if keep_first:
        mask[0] = True
    return mask


def numerical_grad(fn, arrays, step=1e-5):
    """Central finite differences of a float64 scalar function of several arrays."""
    arrays = [np.array(x, np.float64) for x in arrays]
    grads = []
    for x in arrays:
        grad = np.zeros_like(x)
        for pos in np.ndindex(x.shape):
            original = x[pos]
            x[pos] = original + step
            plus = fn(*arrays)
            x[pos] = original - step
            minus = fn(*arrays)
            x[pos] = original
            grad[pos] = (plus - minus) / (2 * step)
        grads.append(grad)
    return grads


def assert_all_finite(tree):
    for leaf in jax.tree_util.tree_leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), leaf


# ----------------------------------------------------------------------------------------------
# Values against the references.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("use_mask", [False, True])
def test_triplet_losses_match_reference(size, use_mask):
    a, p, n = random_triplets(size, size)
    mask = random_mask(size, size) if use_mask else None
    kwargs = {} if mask is None else {"mask": mask}
    for margin in (0.2, 0.7):
        np.testing.assert_allclose(ratio_jit(a, p, n, margin=margin, **kwargs),
                                   ref_ratio(a, p, n, margin, mask), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(margin_jit(a, p, n, margin=margin, **kwargs),
                                   ref_margin(a, p, n, margin, mask), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            global_jit(a, p, n, margin=margin / 10, weight=0.8, **kwargs),
            ref_global(a, p, n, margin / 10, 0.8, mask), rtol=1e-5, atol=1e-6)


def test_losses_have_both_active_and_inactive_triplets():
    """Guards the reference tests: the random problems exercise both sides of every hinge."""
    a, p, n = random_triplets(17, 17)
    ratio = ref_ratio(a, p, n)
    margin = ref_margin(a, p, n)
    assert 0 < np.count_nonzero(ratio) < len(ratio)
    assert 0 < np.count_nonzero(margin) < len(margin)


def test_global_loss_hinge_active_and_inactive():
    a, p, n = random_triplets(3, 6)
    far = a + 3.0 * (n - a)  # negatives far away: mu- >> mu+, hinge 0
    for negative in (n, far, p):  # p as negative: mu+ == mu-, hinge = weight * margin
        np.testing.assert_allclose(global_jit(a, p, negative), ref_global(a, p, negative),
                                   rtol=1e-5, atol=1e-6)
    mu_pos, mu_neg, var_pos, var_neg = ref_global_stats(a, p, far)
    assert mu_neg > mu_pos + 0.01
    np.testing.assert_allclose(global_jit(a, p, far), var_pos + var_neg, rtol=1e-5)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("triplet_loss", ["ratio", "margin"])
@pytest.mark.parametrize("use_global", [True, False])
def test_objective_matches_reference(size, triplet_loss, use_global):
    a, p, n = random_triplets(size + 7, size)
    mask = random_mask(size, size)
    loss, aux = objective_jit(a, p, n, mask=mask, use_global=use_global,
                              triplet_loss=triplet_loss)
    ref_loss, ref_aux = ref_objective(a, p, n, mask=mask, use_global=use_global,
                                      triplet_loss=triplet_loss)
    assert set(aux) == set(ref_aux)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key, value in ref_aux.items():
        assert aux[key].dtype == jnp.float32 and aux[key].shape == (), key
        np.testing.assert_allclose(aux[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_objective_reuses_the_public_losses():
    a, p, n = random_triplets(5, 17)
    mask = random_mask(5, 17)
    loss, aux = objective_jit(a, p, n, mask=mask)
    per = ratio_jit(a, p, n, mask=mask)
    np.testing.assert_allclose(aux["triplet_loss"], np.sum(per) / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(aux["global_loss"], global_jit(a, p, n, mask=mask), rtol=1e-6)
    np.testing.assert_allclose(loss, aux["triplet_loss"] + aux["global_loss"], rtol=1e-6)


def test_training_error_hand_made():
    # anchor at 0, positive at distance 1; negatives at 0.5 (violates), 1.1 (violates the ratio
    # loss with m = 0.2: 1.1 < 1.2), 2.0 (satisfied), 0.1 (violates but masked).
    e1, e2 = np.eye(2, dtype=np.float32)
    a = np.zeros((4, 2), np.float32)
    p = np.stack([e1] * 4)
    n = np.stack([0.5 * e2, 1.1 * e2, 2.0 * e2, 0.1 * e2])
    mask = np.array([True, True, True, False])
    _, aux = objective_jit(a, p, n, mask=mask)
    np.testing.assert_allclose(aux["training_error"], 2 / 3, rtol=1e-6)
    assert float(aux["num_valid"]) == 3.0
    # Squared FaceNet form: 1 - 1.21 + 0.2 = -0.01 < 0, so only the first triplet violates.
    _, aux = objective_jit(a, p, n, mask=mask, triplet_loss="margin")
    np.testing.assert_allclose(aux["training_error"], 1 / 3, rtol=1e-6)
    _, aux = objective_jit(a, p, n, mask=np.zeros(4, bool))
    assert all(float(v) == 0.0 for v in aux.values())
    # The mined triplets' counts: rows 1 (violates), 2 (satisfied) and 3 (masked) are mined.
    mined = np.array([False, True, True, True])
    loss, aux = objective_jit(a, p, n, mask=mask, mined=mined)
    assert (float(aux["num_mined"]), float(aux["mined_violations"])) == (2.0, 1.0)
    np.testing.assert_allclose(loss, objective_jit(a, p, n, mask=mask)[0], rtol=1e-7)
    with pytest.raises(ValueError, match="^mined: expected a boolean array"):
        objective_jit(a, p, n, mask=mask, mined=np.ones(4, np.int32))


def test_ratio_loss_zero_iff_negative_beyond_positive_plus_margin():
    rng = np.random.default_rng(0)
    count = 400
    dp = rng.uniform(0.0, 2.0, count)
    dn = np.where(rng.random(count) < 0.5, rng.uniform(0.0, 3.0, count),
                  dp + 0.2 + rng.uniform(-0.05, 0.05, count))  # many near the boundary
    dp[:5] = 0.0  # a == p
    keep = np.abs(dn - dp - 0.2) > 1e-4  # float32 cannot decide closer to the boundary
    dp, dn = dp[keep], dn[keep]
    u = rng.normal(size=(len(dp), 3))
    v = rng.normal(size=(len(dp), 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    a = rng.normal(size=(len(dp), 3)) * 0.1
    loss = np.asarray(ratio_jit(
        a, a + dp[:, None] * u, a + dn[:, None] * v, margin=0.2))
    np.testing.assert_array_equal(loss == 0, dn >= dp + 0.2)
    assert 0 < np.count_nonzero(loss) < len(loss)


@pytest.mark.parametrize("size", [2, 6, 17])
@pytest.mark.parametrize("use_mask", [False, True])
def test_lifted_matches_reference(size, use_mask):
    rng = np.random.default_rng(size)
    x = rng.normal(size=(size, DIM)).astype(np.float32) * 0.5
    y = rng.integers(0, max(2, size // 3), size)
    mask = random_mask(size, size) if use_mask else None
    kwargs = {} if mask is None else {"mask": mask}
    for margin in (1.0, 0.3):
        np.testing.assert_allclose(lifted_jit(x, y, margin=margin, **kwargs),
                                   ref_lifted(x, y, margin, mask), rtol=2e-5, atol=1e-6)


def test_lifted_with_ties_and_duplicate_points():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(4, DIM)).astype(np.float32)
    x = base[[0, 0, 1, 1, 2, 3, 3, 0, 2, 1, 3, 2, 0, 1, 2, 3, 0]]  # duplicates within / across
    y = np.array([0, 0, 1, 1, 2, 3, 3, 1, 2, 0, 3, 2, 0, 1, 2, 3, 4])
    value = lifted_jit(x, y)
    np.testing.assert_allclose(value, ref_lifted(x, y), rtol=2e-5)
    assert_all_finite(jax.grad(lifted_jit)(x, y))


def test_lifted_edges():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, DIM)).astype(np.float32)
    grad = jax.grad(lifted_jit)
    # all one class: no negative anywhere -> every J_ij = -inf -> 0
    same = np.zeros(6, int)
    assert float(lifted_jit(x, same)) == 0.0
    np.testing.assert_array_equal(grad(x, same), 0.0)
    # all singletons: no positive pair
    distinct = np.arange(6)
    assert float(lifted_jit(x, distinct)) == 0.0
    np.testing.assert_array_equal(grad(x, distinct), 0.0)
    # one singleton class among pairs (it is only ever a negative)
    y = np.array([0, 0, 1, 1, 2, 5])
    np.testing.assert_allclose(lifted_jit(x, y), ref_lifted(x, y), rtol=2e-5)
    # masking turns a pair class into a singleton; masking everything gives 0
    mask = np.array([True, False, True, True, True, True])
    np.testing.assert_allclose(lifted_jit(x, y, mask=mask), ref_lifted(x, y, mask=mask),
                               rtol=2e-5)
    assert float(lifted_jit(x, y, mask=np.zeros(6, bool))) == 0.0
    # a single row
    assert float(lifted_jit(x[:1], y[:1])) == 0.0


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_npairs_matches_reference(size, with_labels, use_mask):
    a, p, _ = random_triplets(size + 3, size)
    labels = np.random.default_rng(size).integers(0, max(1, size // 2), size)
    mask = random_mask(size, size) if use_mask else None
    kwargs = {}
    if with_labels:
        kwargs["labels"] = labels
    if use_mask:
        kwargs["mask"] = mask
    for l2_reg in (0.002, 0.5):
        np.testing.assert_allclose(
            npairs_jit(a, p, l2_reg=l2_reg, **kwargs),
            ref_npairs(a, p, l2_reg, labels if with_labels else None, mask), rtol=2e-5, atol=1e-6)


def test_npairs_edges():
    a, p, _ = random_triplets(11, 6)
    # one pair: cross-entropy of a 1x1 softmax is 0, only the penalty remains
    expected = 0.002 * 0.25 * (np.sum(a[0] ** 2) + np.sum(p[0] ** 2))
    np.testing.assert_allclose(npairs_jit(a[:1], p[:1]), expected, rtol=1e-5)
    # all one class with labels: uniform target over every column
    same = np.zeros(6, int)
    np.testing.assert_allclose(npairs_jit(a, p, labels=same), ref_npairs(a, p, labels=same),
                               rtol=2e-5)
    # a class with a single pair next to larger classes
    labels = np.array([0, 0, 0, 1, 1, 2])
    np.testing.assert_allclose(npairs_jit(a, p, labels=labels),
                               ref_npairs(a, p, labels=labels), rtol=2e-5)
    # no valid pair
    assert float(npairs_jit(a, p, mask=np.zeros(6, bool))) == 0.0
    np.testing.assert_array_equal(jax.grad(npairs_jit)(a, p, mask=np.zeros(6, bool)), 0.0)
    # large logits stay finite (stable log-softmax)
    assert np.isfinite(float(npairs_jit(40 * a, 40 * p)))


# ----------------------------------------------------------------------------------------------
# Gradients: finite differences of the float64 references; finiteness at distance 0.
# ----------------------------------------------------------------------------------------------


GRAD_RTOL, GRAD_ATOL = 2e-3, 2e-4


def _check_grad(jax_fn, ref_fn, arrays):
    grads = jax.grad(jax_fn, argnums=tuple(range(len(arrays))))(*arrays)
    expected = numerical_grad(ref_fn, arrays)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_per_triplet_gradients_match_finite_differences():
    a, p, n = random_triplets(21, 6)
    mask = np.array([True, True, False, True, True, True])
    weights = np.random.default_rng(2).uniform(0.5, 1.5, 6)
    for jax_fn, ref_fn in ((ratio_jit, ref_ratio), (margin_jit, ref_margin)):
        _check_grad(lambda a, p, n, f=jax_fn: jnp.sum(weights * f(a, p, n, mask=mask)),
                    lambda a, p, n, f=ref_fn: float(np.sum(weights * f(a, p, n, 0.2, mask))),
                    [a, p, n])


def test_global_and_objective_gradients_match_finite_differences():
    a, p, n = random_triplets(22, 6)
    mask = np.array([True, False, True, True, True, True])
    # the hinge active (p as the negative's mean is close) and inactive (negatives far)
    for negative in (0.5 * (n + p), a + 3.0 * (n - a)):
        _check_grad(lambda a, p, n: global_jit(a, p, n, mask=mask),
                    lambda a, p, n: ref_global(a, p, n, mask=mask), [a, p, negative])
    for triplet_loss in ("ratio", "margin"):
        _check_grad(
            lambda a, p, n, t=triplet_loss: objective_jit(a, p, n, mask=mask, triplet_loss=t)[0],
            lambda a, p, n, t=triplet_loss: ref_objective(a, p, n, mask=mask, triplet_loss=t)[0],
            [a, p, n])


def test_lifted_and_npairs_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    x = (0.5 * rng.normal(size=(6, 4))).astype(np.float32)
    y = np.array([0, 0, 1, 1, 1, 2])
    mask = np.array([True, True, True, True, False, True])
    _check_grad(lambda x: lifted_jit(x, y, mask=mask),
                lambda x: ref_lifted(x, y, mask=mask), [x])
    a, p, _ = random_triplets(23, 6)
    labels = np.array([0, 1, 1, 2, 3, 3])
    _check_grad(lambda a, p: npairs_jit(a, p, l2_reg=0.3, labels=labels, mask=mask),
                lambda a, p: ref_npairs(a, p, 0.3, labels, mask), [a, p])


def test_gradients_finite_at_zero_distance():
    a, p, n = random_triplets(31, 17)
    tiny = np.random.default_rng(5).normal(size=a.shape).astype(np.float32)
    zeros = np.zeros_like(a)
    cases = {"a==p": (a, a.copy(), n), "a==n": (a, p, a.copy()),
             "all equal": (a, a.copy(), a.copy()), "all zero": (zeros, zeros, zeros),
             # squared distances below float32's smallest normal (subnormal) and just above it
             "nearly equal": (zeros, 1e-21 * tiny, 3e-19 * tiny)}
    all_valid = np.ones(17, bool)
    for case, (x, y, z) in cases.items():
        for name, value_and_grad in VALUE_AND_GRADS.items():
            value, grads = value_and_grad(x, y, z, all_valid)
            assert np.isfinite(float(value)), (case, name)
            assert_all_finite(grads)
    # a == p == n: ratio loss 1 - 0 / m = 1 with zero gradient (the safe norm's subgradient)
    np.testing.assert_array_equal(ratio_jit(a, a, a), 1.0)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(ratio_jit(x, x, x)))(a), 0.0)
    # at tiny distances the plain distance's gradient is still the unit direction (n - a)/|n - a|
    direction = tiny / np.linalg.norm(tiny, axis=1, keepdims=True)
    negative = (1e-17 * direction).astype(np.float32)  # squared distance 1e-34
    ones = np.ones_like(a)
    grad = jax.grad(lambda n: jnp.sum(ratio_jit(zeros, ones, n)))(negative)
    np.testing.assert_allclose(grad, -direction / (np.sqrt(DIM) + 0.2), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Masks: a masked row changes neither the value nor the gradient, whatever it holds.
# ----------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), fill=st.sampled_from(["nan", "inf", "-inf", "random", "huge"]))
def test_masked_rows_change_neither_value_nor_gradient(seed, fill):
    size = 17
    a, p, n = random_triplets(seed, size)
    mask = random_mask(seed, size)
    garbage = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 3e38}.get(fill)
    rng = np.random.default_rng(seed + 1)
    dirty = []
    for x in (a, p, n):
        x = x.copy()
        if garbage is None:
            x[~mask] = rng.normal(size=(np.count_nonzero(~mask), DIM)) * 5
        else:
            x[~mask] = garbage
        dirty.append(x)
    for name, value_and_grad in VALUE_AND_GRADS.items():
        clean_value, clean_grads = value_and_grad(a, p, n, mask)
        dirty_value, dirty_grads = value_and_grad(*dirty, mask)
        np.testing.assert_array_equal(dirty_value, clean_value, err_msg=name)
        for clean, got in zip(clean_grads, dirty_grads, strict=True):
            np.testing.assert_array_equal(got, clean, err_msg=name)
            np.testing.assert_array_equal(got[~mask], 0.0, err_msg=name)


def test_per_triplet_losses_are_zero_at_masked_rows():
    a, p, n = random_triplets(4, 17)
    mask = random_mask(4, 17)
    a[~mask] = np.nan
    for fn in (ratio_jit, margin_jit):
        out = np.asarray(fn(a, p, n, mask=mask))
        np.testing.assert_array_equal(out[~mask], 0.0)
        assert np.all(np.isfinite(out))


def test_all_masked_gives_zero_with_zero_gradient():
    a, p, n = random_triplets(6, 6)
    mask = np.zeros(6, bool)
    value, grads = jax.value_and_grad(
        lambda a, p, n: global_jit(a, p, n, mask=mask), argnums=(0, 1, 2))(a, p, n)
    assert float(value) == 0.0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


# ----------------------------------------------------------------------------------------------
# dtypes, jit, argument checks.
# ----------------------------------------------------------------------------------------------


def test_bf16_input_gives_f32_output():
    a, p, n = (jnp.asarray(x, jnp.bfloat16) for x in random_triplets(8, 17))
    outputs = [ratio_jit(a, p, n), margin_jit(a, p, n), global_jit(a, p, n),
               lifted_jit(a, LIFTED_LABELS), npairs_jit(a, p)]
    loss, aux = objective_jit(a, p, n)
    outputs += [loss, *aux.values()]
    for out in outputs:
        assert out.dtype == jnp.float32
    # the math itself is float32: same result as the f32 upcast of the same bf16 values
    f32 = [x.astype(jnp.float32) for x in (a, p, n)]
    np.testing.assert_array_equal(outputs[0], ratio_jit(*f32))
    np.testing.assert_array_equal(outputs[2], global_jit(*f32))
    grad = jax.grad(global_jit)(a, p, n)
    assert grad.dtype == jnp.bfloat16  # a gradient has its input's dtype


def test_jit_equals_eager():
    a, p, n = random_triplets(9, 17)
    mask = random_mask(9, 17)
    pairs = [
        (losses.triplet_ratio_loss(a, p, n, mask=mask), ratio_jit(a, p, n, mask=mask)),
        (losses.triplet_margin_loss(a, p, n, mask=mask), margin_jit(a, p, n, mask=mask)),
        (losses.global_loss(a, p, n, mask=mask), global_jit(a, p, n, mask=mask)),
        (losses.triplet_objective(a, p, n, mask=mask), objective_jit(a, p, n, mask=mask)),
        (losses.lifted_structure_loss(a, LIFTED_LABELS, mask=mask),
         lifted_jit(a, LIFTED_LABELS, mask=mask)),
        (losses.npairs_loss(a, p, labels=LIFTED_LABELS, mask=mask),
         npairs_jit(a, p, labels=LIFTED_LABELS, mask=mask)),
    ]
    for eager, jitted in pairs:
        jax.tree_util.tree_map(
            functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), eager, jitted)


def test_numpy_and_integer_inputs_accepted():
    a = np.zeros((2, 3), np.int32)
    p = np.ones((2, 3), np.int64)
    out = margin_jit(a, p, a.astype(np.float64))
    np.testing.assert_allclose(out, [3.2, 3.2], rtol=1e-6)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: losses.triplet_ratio_loss(x[0], x, x), "anchor"),
        (lambda x: losses.triplet_ratio_loss(x, x[:2], x), "positive"),
        (lambda x: losses.triplet_margin_loss(x, x, x[:, :2]), "negative"),
        (lambda x: losses.global_loss(x, x, x, mask=np.ones(3, bool)), "mask"),
        (lambda x: losses.global_loss(x, x, x, mask=np.ones(4, int)), "mask"),
        (lambda x: losses.global_loss(x, x, x, weight=-1.0), "weight"),
        (lambda x: losses.global_loss(x, x, x, margin=np.nan), "margin"),
        (lambda x: losses.triplet_ratio_loss(x, x, x, margin=0.0), "margin"),
        (lambda x: losses.triplet_objective(x, x, x, triplet_loss="hinge"), "triplet_loss"),
        (lambda x: losses.triplet_objective(x, x, x, margin=-0.1), "margin"),
        (lambda x: losses.triplet_objective(x, x, x, global_weight=-0.1), "global_weight"),
        (lambda x: losses.triplet_ratio_loss(x.astype(bool), x, x), "anchor"),
        (lambda x: losses.triplet_ratio_loss(x.astype(str), x, x), "anchor"),
        (lambda x: losses.lifted_structure_loss(x, np.zeros(4)), "labels"),
        (lambda x: losses.lifted_structure_loss(x, np.zeros(3, int)), "labels"),
        (lambda x: losses.lifted_structure_loss(x[0], np.zeros(4, int)), "embeddings"),
        (lambda x: losses.npairs_loss(x, x[:, :1]), "positives"),
        (lambda x: losses.npairs_loss(x, x, l2_reg=-1.0), "l2_reg"),
        (lambda x: losses.npairs_loss(x, x, labels=np.zeros((4, 1), int)), "labels"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, match):
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=match):
        call(x)


def test_checks_work_under_jit_with_traced_hyper_parameters():
    a, p, n = random_triplets(10, 6)

    @jax.jit
    def fn(a, p, n, margin, weight):
        loss, _ = losses.triplet_objective(a, p, n, margin=margin, global_weight=weight)
        return loss

    np.testing.assert_allclose(fn(a, p, n, 0.3, 0.5),
                               ref_objective(a, p, n, margin=0.3, global_weight=0.5)[0],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        jax.jit(losses.triplet_ratio_loss)(a, p[:3], n)


# ----------------------------------------------------------------------------------------------
# Triplets as indices into one batch (the dense in-batch sets of index-built batches).


@pytest.mark.parametrize("triplet_loss,use_global", [("ratio", True), ("margin", False)])
def test_indexed_objective_equals_the_objective_on_gathered_rows(triplet_loss, use_global):
    rng = np.random.default_rng(4)
    batch = rng.normal(size=(12, DIM)).astype(np.float32)
    batch[3] = batch[2]  # a duplicate: distance 0, finite gradient on both paths
    mask = np.ones(12, bool)
    mask[[7, 11]] = False
    slots = 40
    anchor, positive, negative = (rng.integers(0, 12, slots) for _ in range(3))
    valid = mask[anchor] & mask[positive] & mask[negative] & (rng.random(slots) < 0.8)
    settings_ = dict(triplet_loss=triplet_loss, use_global=use_global, margin=0.3)

    def indexed(x):
        return losses.indexed_triplet_objective(x, anchor, positive, negative, valid,
                                                mask=mask, **settings_)

    def gathered(x):
        return losses.triplet_objective(x[anchor], x[positive], x[negative], mask=valid,
                                        **settings_)

    (value, aux), grad = jax.value_and_grad(indexed, has_aux=True)(batch)
    (expected, expected_aux), expected_grad = jax.value_and_grad(gathered, has_aux=True)(batch)
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert set(aux) == set(expected_aux)
    for name in aux:
        np.testing.assert_allclose(aux[name], expected_aux[name], rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    # NaN in the padded rows reaches neither the value nor the gradient (under jit too).
    poisoned = batch.copy()
    poisoned[~mask] = np.nan
    (value_nan, _), grad_nan = jax.jit(jax.value_and_grad(indexed, has_aux=True))(poisoned)
    np.testing.assert_allclose(value_nan, value, rtol=1e-6)
    assert np.isfinite(grad_nan).all() and not grad_nan[~mask].any()


def test_indexed_objective_bad_arguments_name_them():
    x = np.zeros((4, DIM), np.float32)
    ids = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="anchor"):
        losses.indexed_triplet_objective(x, ids[:, None], ids, ids, ids > 0)
    with pytest.raises(ValueError, match="negative"):
        losses.indexed_triplet_objective(x, ids, ids, ids[:2], ids > 0)
    with pytest.raises(ValueError, match="valid"):
        losses.indexed_triplet_objective(x, ids, ids, ids, ids)
    with pytest.raises(ValueError, match="triplet_loss"):
        losses.indexed_triplet_objective(x, ids, ids, ids, ids > 0, triplet_loss="hinge")
