"""smine_jax.knn.exact_neighbours against a full-matrix numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smine_jax import knn


def reference_neighbours(x: np.ndarray, k: int, query_ids=None):
    """Full float64 distance matrix, self set to inf by index, stable argsort."""
    x = x.astype(np.float64)
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(sq, np.inf)
    if query_ids is not None:
        sq = sq[query_ids]
    ids = np.argsort(sq, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(sq, ids, axis=1)


@pytest.mark.parametrize("n,d,k,chunk", [(2, 3, 1, None), (17, 5, 16, 4), (130, 8, 7, 33),
                                         (300, 16, 50, None)])
def test_matches_reference_on_gaussian_data(n, d, k, chunk):
    x = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    ids, sq = knn.exact_neighbours(x, k, chunk_size=chunk)
    ref_ids, ref_sq = reference_neighbours(x, k)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(sq), ref_sq, rtol=1e-4, atol=1e-4)
    assert ids.dtype == np.int32 and sq.dtype == np.float32


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(1, 4), seed=st.integers(0, 2**16),
       chunk=st.sampled_from([1, 3, 8, None]), data=st.data())
def test_ties_and_duplicates_break_by_lower_index(n, d, seed, chunk, data):
    # Small integer coordinates: many exact ties and exact duplicates, float32 distances exact.
    x = np.random.default_rng(seed).integers(-1, 2, size=(n, d)).astype(np.float32)
    k = data.draw(st.integers(1, n - 1))
    ids, sq = knn.exact_neighbours(x, k, chunk_size=chunk)
    ref_ids, ref_sq = reference_neighbours(x, k)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_array_equal(np.asarray(sq), ref_sq.astype(np.float32))


def test_self_excluded_by_index_even_with_duplicates():
    x = np.zeros((5, 3), np.float32)  # every row a duplicate of every other
    ids, sq = knn.exact_neighbours(x, 4)
    ids = np.asarray(ids)
    for i in range(5):
        assert i not in ids[i]
        np.testing.assert_array_equal(ids[i], [j for j in range(5) if j != i])
    np.testing.assert_array_equal(np.asarray(sq), 0.0)


def test_query_ids_give_the_matching_rows():
    x = np.random.default_rng(0).normal(size=(60, 6)).astype(np.float32)
    query_ids = np.array([59, 0, 7, 7, 30])
    ids, sq = knn.exact_neighbours(x, 9, query_ids=query_ids, chunk_size=2)
    full_ids, full_sq = knn.exact_neighbours(x, 9)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(full_ids)[query_ids])
    np.testing.assert_allclose(np.asarray(sq), np.asarray(full_sq)[query_ids], rtol=1e-6)


def test_empty_query_list():
    ids, sq = knn.exact_neighbours(np.eye(3), 2, query_ids=np.zeros(0, np.int64))
    assert ids.shape == (0, 2) and sq.shape == (0, 2)


def test_default_chunk_size_bounds_memory():
    assert knn.default_chunk_size(200_000, 200_000) * 200_000 <= (1 << 25) + 8 * 200_000
    assert knn.default_chunk_size(10, 10) == 10


@pytest.mark.parametrize("k", [0, 5, 6, -1, 2.5])
def test_bad_k_is_rejected_by_name(k):
    with pytest.raises(ValueError, match=r"^k"):
        knn.exact_neighbours(np.eye(5), k)


def test_nan_rows_are_counted():
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    expected = r"embeddings: 2 of 10 rows contain NaN or inf \(first: row 3\)"
    with pytest.raises(ValueError, match=expected):
        knn.exact_neighbours(x, 2)


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((2, 2, 2)), np.zeros((0, 3))])
def test_bad_shapes_are_rejected_by_name(bad):
    with pytest.raises(ValueError, match=r"^embeddings"):
        knn.exact_neighbours(bad, 1)


def test_bad_query_ids():
    with pytest.raises(ValueError, match="query_ids"):
        knn.exact_neighbours(np.eye(4), 1, query_ids=[0, 4])
    with pytest.raises(ValueError, match="query_ids"):
        knn.exact_neighbours(np.eye(4), 1, query_ids=[[0]])
