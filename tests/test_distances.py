"""smine_jax.distances: the one pairwise formula and square root that losses and miners share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from smine_jax import distances


def test_pairwise_sq_dists_is_exact_on_duplicates_and_matches_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32) * 30.0
    x[3] = x[1]  # a duplicate: the expanded ||x||² + ||y||² − 2x·y form leaves a residue here
    got = np.asarray(distances.pairwise_sq_dists(x))
    expected = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[1, 3] == 0.0 and got[3, 1] == 0.0 and np.all(np.diag(got) == 0.0)
    np.testing.assert_array_equal(got, got.T)


def test_masked_rows_leak_neither_value_nor_gradient():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    x[2] = np.nan
    mask = np.array([True, True, False, True])

    def total(rows):
        return jnp.sum(distances.safe_sqrt(distances.pairwise_sq_dists(rows, mask)))

    value, grad = jax.value_and_grad(total)(jnp.asarray(x))
    assert np.isfinite(value)
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[2] == 0.0)


def test_safe_sqrt_value_and_gradient_below_the_floor():
    squared = jnp.asarray([0.0, distances.SQRT_FLOOR / 2, 4.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(distances.safe_sqrt(squared)), [0.0, 0.0, 2.0])
    grad = jax.grad(lambda s: jnp.sum(distances.safe_sqrt(s)))(squared)
    np.testing.assert_array_equal(np.asarray(grad), [0.0, 0.0, 0.25])


def test_row_sq_dists_over_the_last_axis():
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    y = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(distances.row_sq_dists(x, y)), [4.0, 25.0])
