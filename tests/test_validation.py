"""Argument checks: each error names the argument and says what was expected."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from smine_jax import validation


def test_embeddings_accept_numpy_jax_and_ints():
    for x in (np.ones((3, 2)), jnp.ones((3, 2)), np.ones((3, 2), np.int32)):
        out = validation.as_embeddings(x)
        assert out.dtype == np.float32 and out.shape == (3, 2)


def test_embeddings_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^queries: expected a 2-D"):
        validation.as_embeddings(np.ones(3), name="queries")
    with pytest.raises(ValueError, match="real-valued"):
        validation.as_embeddings(np.array([["a"]]))
    x = np.ones((4, 2))
    x[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 of 4 rows contain NaN or inf \(first: row 1\)"):
        validation.as_embeddings(x)
    assert np.isnan(validation.as_embeddings(x, allow_nonfinite=True)).sum() == 1


def test_labels():
    np.testing.assert_array_equal(validation.as_labels([3, -7, 3]), [3, -7, 3])
    np.testing.assert_array_equal(validation.as_labels(np.array([1.0, 2.0])), [1, 2])
    with pytest.raises(ValueError, match=r"^labels: expected integer"):
        validation.as_labels([0.5, 1.0])
    with pytest.raises(ValueError, match=r"^labels: expected a 1-D"):
        validation.as_labels([[1]])
    with pytest.raises(ValueError, match=r"^labels: has 2 entries but embeddings has 3 rows"):
        validation.as_labels([1, 2], num_rows=3)


def test_check_k():
    assert validation.check_k(np.int64(3), 4) == 3
    for bad in (0, 4, True, 1.5):
        with pytest.raises(ValueError, match="^k"):
            validation.check_k(bad, 4)


def test_positive_int():
    assert validation.positive_int(np.int64(3), "size") == 3
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ValueError, match="^size: expected a positive integer"):
            validation.positive_int(bad, "size")
