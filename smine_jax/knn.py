"""Exact k-nearest-neighbour search on the device, in chunks of queries.

One function serves both evaluation (``metrics``: leave-one-out retrieval) and mining
(``index``: the ``exact`` backend). Memory is O(chunk × N): the full N × N distance matrix is
never formed for large N. A row is never its own neighbour: self is excluded by index, not by
distance, because real datasets contain duplicate images (distance 0 to another row). Equal
distances are ordered by lower row index (``lax.top_k`` keeps the lower index first), so results
are deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from smine_jax import validation

# Elements of one chunk's [chunk, N] float32 distance block (128 MiB).
_CHUNK_ELEMENTS = 1 << 25


def default_chunk_size(num_queries: int, num_rows: int) -> int:
    """Rows of queries per chunk so that one [chunk, N] distance block stays near 128 MiB."""
    size = max(8, _CHUNK_ELEMENTS // max(num_rows, 1))
    size = min(size, num_queries)
    return max(1, size)


def exact_neighbours(embeddings, k: int, *, query_ids=None, chunk_size: int | None = None):
    """For every query row, its k nearest OTHER rows by Euclidean distance.

    Args:
      embeddings: [N, D] float array (numpy or jax); the database and, by default, the queries.
      k: neighbours per query, 1 <= k <= N - 1.
      query_ids: optional [Q] int row indices to search for (default: all N rows, in order).
        Each query excludes its own row, so this is the same as the matching rows of the full
        result. Lets each process of a multi-host run search only its own anchors.
      chunk_size: queries per chunk (default: chosen so a [chunk, N] block is ~128 MiB).

    Returns:
      (ids, sq_dists): int32 [Q, k] row indices and float32 [Q, k] squared Euclidean distances,
      ascending along each row, ties broken by lower index. jax arrays.
    """
    database = validation.as_embeddings(embeddings)
    num_rows = database.shape[0]
    k = validation.check_k(k, num_rows)
    query_ids = validation.as_query_ids(query_ids, num_rows)
    num_queries = query_ids.shape[0]
    if num_queries == 0:
        return jnp.zeros((0, k), jnp.int32), jnp.zeros((0, k), jnp.float32)
    if chunk_size is None:
        chunk_size = default_chunk_size(num_queries, num_rows)
    chunk_size = int(min(max(1, chunk_size), num_queries))
    num_chunks = -(-num_queries // chunk_size)
    # Pad the query list to whole chunks with id -1 (excludes nothing); padded rows are dropped.
    padded_ids = np.full(num_chunks * chunk_size, -1, np.int32)
    padded_ids[:num_queries] = query_ids
    chunked_ids = jnp.asarray(padded_ids.reshape(num_chunks, chunk_size))
    ids, sq_dists = _search(jnp.asarray(database), chunked_ids, k)
    return ids[:num_queries], sq_dists[:num_queries]


@functools.partial(jax.jit, static_argnames=("k",))
def _search(database: jax.Array, chunked_query_ids: jax.Array, k: int):
    """lax.map over chunks of query ids: distances to all rows, self masked, top-k ascending."""
    database = database.astype(jnp.float32)
    row_sq_norms = jnp.sum(database * database, axis=1)
    row_ids = jnp.arange(database.shape[0], dtype=jnp.int32)

    def one_chunk(query_ids):
        safe_ids = jnp.maximum(query_ids, 0)
        queries = database[safe_ids]
        dots = jnp.dot(queries, database.T, precision=jax.lax.Precision.HIGHEST)
        sq = row_sq_norms[safe_ids][:, None] + row_sq_norms[None, :] - 2.0 * dots
        sq = jnp.maximum(sq, 0.0)  # the expanded form can dip below 0 by rounding
        sq = jnp.where(row_ids[None, :] == query_ids[:, None], jnp.inf, sq)
        neg_sq, ids = jax.lax.top_k(-sq, k)
        return ids.astype(jnp.int32), -neg_sq

    ids, sq_dists = jax.lax.map(one_chunk, chunked_query_ids)
    k_out = ids.shape[-1]
    return ids.reshape(-1, k_out), sq_dists.reshape(-1, k_out)
