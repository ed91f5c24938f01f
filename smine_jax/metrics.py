"""Evaluation metrics: Recall@K, MAP@R, R-precision (leave-one-out retrieval) and NMI of k-means.

Retrieval metrics follow Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020). Every
sample is a query against all OTHER samples (leave-one-out, Euclidean distance). For query i,
R_i = (number of samples of its class) - 1 is the number of relevant samples; a query with
R_i = 0 has nothing to retrieve and is excluded from every retrieval metric (``evaluate`` reports
how many). With rel_i(r) = 1 when the r-th nearest other sample shares the class of i:

    Recall@K     = mean_i [ sum_{r<=K} rel_i(r) > 0 ]
    R-precision  = mean_i (1/R_i) sum_{r<=R_i} rel_i(r)
    MAP@R        = mean_i (1/R_i) sum_{r<=R_i} P_i(r) rel_i(r),   P_i(r) = (1/r) sum_{s<=r} rel_i(s)

The neighbour lists come from ``smine_jax.knn.exact_neighbours`` (exact, chunked on the device,
self excluded by index, ties by lower index) and are searched in blocks of queries, so memory is
O(block x k) for the lists on top of the O(chunk x N) of the search: never N x N, nor N x k.
``evaluate`` searches once with k = max(max(ks), largest R_i) and derives every retrieval metric
from the same lists.

NMI (the clustering metric of the paper's tables) is scikit-learn's
``normalized_mutual_info_score`` (arithmetic normalisation) between the class labels and the
clusters of a jitted k-means with K = number of classes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator, MutableMapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smine_jax import knn, validation

DEFAULT_KS = (1, 2, 4, 8)
DEFAULT_KMEANS_MAX_ITERS = 100
DEFAULT_KMEANS_RESTARTS = 3

# Entries of the neighbour-id lists searched per block of queries (16 Mi entries: 64 MiB of
# int32 ids plus as much for the distances, and a few host temporaries of the same size).
_LIST_ENTRIES_PER_BLOCK = 1 << 24


# ----------------------------------------------------------------------------------------------
# Retrieval metrics (leave-one-out).


def recall_at_k(embeddings, labels, ks: Iterable[int] = DEFAULT_KS) -> dict[int, float]:
    """Leave-one-out Recall@K for every K in ``ks`` (method.md §5): the paper's retrieval metric.

    Every sample is a query against all OTHER samples by Euclidean distance; Recall@K is the
    fraction of scorable queries with at least one same-class sample among their K nearest. A
    query whose class has no other member is excluded.
    Host-side: inputs are copied to the host; not for use inside ``jax.jit``.

    Args:
      embeddings: [N, D] real array (numpy or jax; any float or integer dtype, not bool), N >= 1,
        D >= 1, every entry finite; copied to the host as float32.
      labels: int[N] class labels of the rows (arbitrary integers; whole-valued floats accepted).
        At least one class needs two samples.
      ks: the cut-offs: one int or an iterable of ints, each in [1, N − 1] (default (1, 2, 4, 8),
        which needs N >= 9); repeats are dropped, the order is kept.

    Returns:
      dict {K: float}, one entry per distinct K in the order of ``ks``, each a recall in [0, 1].

    Raises:
      ValueError: naming the argument: ``embeddings`` not a non-empty 2-D real array or holding
        NaN/inf (the message gives the first bad row); ``labels`` not 1-D integer, of another
        length than N, or with every sample alone in its class (nothing to retrieve);
        ``ks`` empty, not integers, or a K outside [1, N − 1].

    Example:
      >>> import numpy as np
      >>> from smine_jax import metrics
      >>> embeddings = np.array([[0.0], [0.1], [1.0], [1.1], [5.0]], np.float32)
      >>> labels = np.array([0, 0, 1, 1, 1])
      >>> metrics.recall_at_k(embeddings, labels, ks=(1, 2))
      {1: 1.0, 2: 1.0}
    """
    points, labels = _check_inputs(embeddings, labels)
    ks = _check_ks(ks, points.shape[0])
    scores, _ = _retrieval_scores(points, labels, ks, rank_metrics=False)
    return {k: scores[f"recall@{k}"] for k in ks}


def map_at_r(embeddings, labels) -> float:
    """Leave-one-out MAP@R (Musgrave et al. 2020): precision that also rewards the ranking.

    For query i with R_i = (size of its class) − 1 relevant samples, the mean over its top R_i
    neighbours of the precision at each relevant rank, over R_i; averaged over the queries with
    R_i >= 1 (the others are excluded).
    Host-side: inputs are copied to the host; not for use inside ``jax.jit``.

    Args:
      embeddings: [N, D] real array (numpy or jax; any float or integer dtype, not bool), N >= 1,
        D >= 1, every entry finite; copied to the host as float32.
      labels: int[N] class labels of the rows (arbitrary integers; whole-valued floats accepted).
        At least one class needs two samples.

    Returns:
      float in [0, 1].

    Raises:
      ValueError: naming the argument: ``embeddings`` not a non-empty 2-D real array or holding
        NaN/inf (the message gives the first bad row); ``labels`` not 1-D integer, of another
        length than N, or with every sample alone in its class (nothing to retrieve).

    Example:
      >>> import numpy as np
      >>> from smine_jax import metrics
      >>> embeddings = np.array([[0.0], [0.1], [1.0], [1.1], [5.0]], np.float32)
      >>> labels = np.array([0, 0, 1, 1, 1])
      >>> round(metrics.map_at_r(embeddings, labels), 3)
      0.8
    """
    points, labels = _check_inputs(embeddings, labels)
    scores, _ = _retrieval_scores(points, labels, (), rank_metrics=True)
    return scores["map@r"]


def r_precision(embeddings, labels) -> float:
    """Leave-one-out R-precision: the share of relevant samples among each query's top R_i.

    For query i with R_i = (size of its class) − 1, the fraction of its R_i nearest other samples
    that share its class; averaged over the queries with R_i >= 1 (the others are excluded).
    Host-side: inputs are copied to the host; not for use inside ``jax.jit``.

    Args:
      embeddings: [N, D] real array (numpy or jax; any float or integer dtype, not bool), N >= 1,
        D >= 1, every entry finite; copied to the host as float32.
      labels: int[N] class labels of the rows (arbitrary integers; whole-valued floats accepted).
        At least one class needs two samples.

    Returns:
      float in [0, 1].

    Raises:
      ValueError: naming the argument: ``embeddings`` not a non-empty 2-D real array or holding
        NaN/inf (the message gives the first bad row); ``labels`` not 1-D integer, of another
        length than N, or with every sample alone in its class (nothing to retrieve).

    Example:
      >>> import numpy as np
      >>> from smine_jax import metrics
      >>> embeddings = np.array([[0.0], [0.1], [1.0], [1.1], [5.0]], np.float32)
      >>> labels = np.array([0, 0, 1, 1, 1])
      >>> round(metrics.r_precision(embeddings, labels), 3)
      0.8
    """
    points, labels = _check_inputs(embeddings, labels)
    scores, _ = _retrieval_scores(points, labels, (), rank_metrics=True)
    return scores["r_precision"]


def _check_inputs(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
    points = validation.as_embeddings(embeddings)
    return points, validation.as_labels(labels, points.shape[0])


def _check_ks(ks, num_rows: int) -> tuple[int, ...]:
    """`ks` as a tuple of distinct ints in [1, N - 1], in the given order (an int is one K)."""
    if isinstance(ks, int | np.integer):
        ks = (ks,)
    try:
        ks = tuple(ks)
    except TypeError:
        raise ValueError(f"ks: expected a sequence of positive integers, got {ks!r}") from None
    if not ks:
        raise ValueError("ks: expected at least one K, got an empty sequence")
    checked = [validation.check_k(k, num_rows, name="ks") for k in ks]
    return tuple(dict.fromkeys(checked))


def _relevant_counts(labels: np.ndarray) -> np.ndarray:
    """R_i = (size of the class of sample i) - 1, the number of samples query i should retrieve."""
    _, class_ids, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
    return class_sizes[class_ids.reshape(-1)] - 1


def _retrieval_scores(points: np.ndarray, labels: np.ndarray, ks: tuple[int, ...], *,
                      rank_metrics: bool) -> tuple[dict[str, float], int]:
    """Mean retrieval metrics over the scorable queries, and the number of excluded queries.

    Searches the neighbour lists once, with k = max(ks) and, when `rank_metrics`, at least the
    largest R_i (MAP@R and R-precision look at the top R_i), in blocks of queries.
    """
    num_rows = points.shape[0]
    num_relevant = _relevant_counts(labels)
    scorable = np.flatnonzero(num_relevant > 0).astype(np.int32)
    if scorable.size == 0:
        raise ValueError(
            f"labels: no query can be scored: all {num_rows} samples are alone in their class, "
            "and leave-one-out retrieval needs at least one class with two or more samples")
    k = max(ks, default=0)
    if rank_metrics:
        k = max(k, int(num_relevant.max()))
    totals: dict[str, float] = {}
    for block in _query_blocks(scorable, k, num_rows):
        ids, _ = knn.exact_neighbours(points, k, query_ids=block.padded_ids,
                                      chunk_size=block.chunk_size)
        ids = np.asarray(ids)[:block.size]
        queries = block.padded_ids[:block.size]
        block_scores = _per_query_scores(labels[ids], labels[queries], num_relevant[queries],
                                         ks, rank_metrics=rank_metrics)
        for name, values in block_scores.items():
            totals[name] = totals.get(name, 0.0) + float(np.sum(values, dtype=np.float64))
    means = {name: total / scorable.size for name, total in totals.items()}
    return means, num_rows - int(scorable.size)


class _QueryBlock(NamedTuple):
    """Query ids of one search call, padded to the common block shape (one jit compilation)."""

    padded_ids: np.ndarray  # int32 [block size]; the first `size` are real queries
    size: int
    chunk_size: int


def _query_blocks(query_ids: np.ndarray, k: int, num_rows: int) -> Iterator[_QueryBlock]:
    """Splits the queries into equal blocks of whole search chunks, ~_LIST_ENTRIES_PER_BLOCK
    neighbour entries each; the last block is padded with a repeated id and trimmed later."""
    chunk_size = knn.default_chunk_size(query_ids.size, num_rows)
    chunks_per_block = max(1, _LIST_ENTRIES_PER_BLOCK // (k * chunk_size))
    block_size = min(chunks_per_block * chunk_size, query_ids.size)
    for start in range(0, query_ids.size, block_size):
        ids = query_ids[start:start + block_size]
        padding = np.full(block_size - ids.size, ids[-1], np.int32)
        yield _QueryBlock(np.concatenate([ids, padding]), ids.size, chunk_size)


def _per_query_scores(neighbour_labels: np.ndarray, query_labels: np.ndarray,
                      num_relevant: np.ndarray, ks: tuple[int, ...], *,
                      rank_metrics: bool) -> dict[str, np.ndarray]:
    """Every retrieval metric of each query, from the labels of its ranked neighbours.

    Args:
      neighbour_labels: [Q, k] labels of each query's k nearest other samples, nearest first.
      query_labels: [Q] label of each query.
      num_relevant: [Q] R_i >= 1 (queries with R_i = 0 are excluded before this point).
      ks: Recall@K cut-offs, each <= k.
      rank_metrics: also return MAP@R and R-precision (needs k >= max R_i).

    Returns:
      name -> float [Q]: ``recall@K`` (1 when a same-class sample is among the top K),
      ``r_precision`` and ``map@r`` (Musgrave et al. 2020).
    """
    relevant = neighbour_labels == query_labels[:, None]
    scores = {f"recall@{k}": np.any(relevant[:, :k], axis=1).astype(np.float64) for k in ks}
    if rank_metrics:
        ranks = np.arange(1, relevant.shape[1] + 1, dtype=np.int32)
        relevant_in_top_r = relevant & (ranks[None, :] <= num_relevant[:, None])
        precision_at_rank = np.cumsum(relevant_in_top_r, axis=1, dtype=np.int32) / ranks
        scores["r_precision"] = np.sum(relevant_in_top_r, axis=1) / num_relevant
        scores["map@r"] = (np.sum(precision_at_rank, axis=1, where=relevant_in_top_r)
                           / num_relevant)
    return scores


# ----------------------------------------------------------------------------------------------
# Clustering: k-means and NMI.


def kmeans(embeddings, num_clusters: int, *, seed: int = 0,
           max_iters: int = DEFAULT_KMEANS_MAX_ITERS,
           num_restarts: int = DEFAULT_KMEANS_RESTARTS) -> jax.Array:
    """k-means cluster ids of the rows (k-means++ init, Lloyd iterations, jitted): NMI's clustering.

    Each of ``num_restarts`` runs starts from its own k-means++ seeding (centres sampled with
    probability proportional to the squared distance to the nearest chosen centre) and iterates
    Lloyd steps until the assignments stop changing or ``max_iters`` steps; the run with the
    lowest inertia (sum of squared distances to the assigned centres) wins. A cluster that
    becomes empty keeps its previous centre. Deterministic for a given ``seed``. Host-side entry
    (inputs are copied to the host); the work runs jitted on the device.

    Args:
      embeddings: [N, D] real array (numpy or jax; any float or integer dtype, not bool), N >= 1,
        D >= 1, every entry finite.
      num_clusters: K, an integer in [1, N] (static: one compilation per K).
      seed: integer seed of the k-means++ draws (Python or numpy int, not bool).
      max_iters: Lloyd iterations at most, an integer >= 0 (0: the k-means++ centres only).
      num_restarts: independent runs, an integer >= 1 (static).

    Returns:
      jax.Array i32[N] cluster ids in [0, K).

    Raises:
      ValueError: naming the argument: ``embeddings`` not a non-empty 2-D real array or holding
        NaN/inf; ``num_clusters`` not an integer in [1, N]; ``max_iters`` < 0;
        ``num_restarts`` < 1; ``seed`` not an integer.

    Example:
      >>> import numpy as np
      >>> from smine_jax import metrics
      >>> embeddings = np.array([[0.0], [0.1], [5.0], [5.1]], np.float32)
      >>> np.asarray(metrics.kmeans(embeddings, 2)).shape
      (4,)
    """
    points = validation.as_embeddings(embeddings)
    num_clusters = validation.integer(num_clusters, "num_clusters", minimum=1,
                                      maximum=points.shape[0])
    max_iters = validation.integer(max_iters, "max_iters", minimum=0)
    num_restarts = validation.integer(num_restarts, "num_restarts", minimum=1)
    assignments, _ = _kmeans(jnp.asarray(points), jax.random.key(_check_seed(seed)),
                             jnp.int32(max_iters), num_clusters=num_clusters,
                             num_restarts=num_restarts)
    return assignments




def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    return int(seed)


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_restarts"))
def _kmeans(points: jax.Array, key: jax.Array, max_iters: jax.Array, *, num_clusters: int,
            num_restarts: int) -> tuple[jax.Array, jax.Array]:
    """Best of `num_restarts` k-means runs (run one after the other): (assignments, inertia).

    `max_iters` is a traced scalar (it only bounds the while loop), so changing it does not
    recompile; the shapes depend on `num_clusters` and `num_restarts`, which are static.
    """
    sq_norms = jnp.sum(points * points, axis=1)

    def one_run(run_key):
        centres = _kmeans_plus_plus(points, run_key, num_clusters)
        return _lloyd(points, sq_norms, centres, max_iters)

    assignments, inertias = jax.lax.map(one_run, jax.random.split(key, num_restarts))
    best = jnp.argmin(inertias)
    return assignments[best], inertias[best]


def _kmeans_plus_plus(points: jax.Array, key: jax.Array, num_clusters: int) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): [K, D] centres, each a data point.

    Distances here use the direct form sum((x - c)^2), so duplicates of a chosen centre get
    exactly 0 and are never chosen again (unless every point is already a centre's duplicate,
    when the pick falls back to uniform).
    """
    num_points = points.shape[0]
    first_key, loop_key = jax.random.split(key)

    def sq_dists_to(centre):
        return jnp.sum(jnp.square(points - centre[None, :]), axis=1)

    first = points[jax.random.randint(first_key, (), 0, num_points)]
    centres = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(first)

    def add_centre(index, carry):
        centres, nearest_sq = carry
        total = jnp.sum(nearest_sq)
        probs = jnp.where(total > 0, nearest_sq / jnp.where(total > 0, total, 1.0),
                          1.0 / num_points)
        pick = jax.random.choice(jax.random.fold_in(loop_key, index), num_points, p=probs)
        centre = points[pick]
        return centres.at[index].set(centre), jnp.minimum(nearest_sq, sq_dists_to(centre))

    centres, _ = jax.lax.fori_loop(1, num_clusters, add_centre, (centres, sq_dists_to(first)))
    return centres


def _lloyd(points: jax.Array, sq_norms: jax.Array, centres: jax.Array,
           max_iters: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lloyd iterations from `centres`: (assignments int32 [N], inertia f32[]).

    One iteration moves every centre to the mean of its points (an empty cluster keeps its
    centre) and reassigns every point to its nearest centre (ties: lower centre index). Stops when
    no assignment changes or after `max_iters` iterations; the returned assignments are always
    the nearest centres of the final centres, and the inertia is measured against them.
    """
    num_clusters = centres.shape[0]

    def assign(centres):
        # Expanded form ||x||^2 - 2 x.c + ||c||^2: one [N, K] matmul, O(N x K) memory.
        dots = jnp.dot(points, centres.T, precision=jax.lax.Precision.HIGHEST)
        sq = sq_norms[:, None] - 2.0 * dots + jnp.sum(centres * centres, axis=1)[None, :]
        assignments = jnp.argmin(sq, axis=1).astype(jnp.int32)
        nearest = jnp.take_along_axis(sq, assignments[:, None], axis=1)[:, 0]
        return assignments, jnp.sum(jnp.maximum(nearest, 0.0))

    def move_centres(assignments, centres):
        sums = jax.ops.segment_sum(points, assignments, num_segments=num_clusters)
        counts = jax.ops.segment_sum(jnp.ones_like(sq_norms), assignments,
                                     num_segments=num_clusters)
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where(counts[:, None] > 0, means, centres)

    def not_done(state):
        iteration, _, _, _, changed = state
        return (iteration < max_iters) & changed

    def step(state):
        iteration, centres, assignments, _, _ = state
        centres = move_centres(assignments, centres)
        new_assignments, inertia = assign(centres)
        changed = jnp.any(new_assignments != assignments)
        return iteration + 1, centres, new_assignments, inertia, changed

    assignments, inertia = assign(centres)
    state = (jnp.int32(0), centres, assignments, inertia, jnp.bool_(True))
    _, _, assignments, inertia, _ = jax.lax.while_loop(not_done, step, state)
    return assignments, inertia


def nmi_from_assignments(assignments, labels) -> float:
    """Normalised mutual information between cluster ``assignments`` and class ``labels``.

    The clustering score of the paper's tables (method.md §5), equal to scikit-learn's
    ``normalized_mutual_info_score(labels, assignments)`` with its default arithmetic
    normalisation MI / mean(H(labels), H(assignments)), natural logarithms, and its special
    cases: both labellings a single group (or empty) -> 1.0; MI = 0 -> 0.0. Host numpy; the
    names of clusters and classes do not matter.

    Args:
      assignments: int[N] cluster id of each sample (arbitrary integers; whole-valued floats
        accepted), e.g. from ``kmeans``.
      labels: int[N] class label of each sample (arbitrary integers), same length.

    Returns:
      float in [0, 1].

    Raises:
      ValueError: naming the argument: ``assignments`` not a 1-D integer array; ``labels`` not a
        1-D integer array or of another length than ``assignments``.

    Example:
      >>> from smine_jax import metrics
      >>> metrics.nmi_from_assignments([0, 0, 1, 1], [5, 5, 7, 7])
      1.0
    """
    assignments = validation.as_labels(assignments, name="assignments")
    labels = validation.as_labels(labels, assignments.shape[0], rows_name="assignments")
    _, class_ids = np.unique(labels, return_inverse=True)
    _, cluster_ids = np.unique(assignments, return_inverse=True)
    class_sizes = np.bincount(class_ids.reshape(-1)).astype(np.float64)
    cluster_sizes = np.bincount(cluster_ids.reshape(-1)).astype(np.float64)
    if class_sizes.size == cluster_sizes.size and class_sizes.size <= 1:
        return 1.0
    mutual_information = _mutual_information(class_ids.reshape(-1), cluster_ids.reshape(-1),
                                             class_sizes, cluster_sizes)
    if mutual_information == 0:
        return 0.0
    normaliser = np.mean([_entropy(class_sizes), _entropy(cluster_sizes)])
    return float(mutual_information / normaliser)


def _mutual_information(class_ids: np.ndarray, cluster_ids: np.ndarray,
                        class_sizes: np.ndarray, cluster_sizes: np.ndarray) -> float:
    """MI (nats) from the non-zero cells of the contingency table, term by term as scikit-learn
    computes it (so that the scores agree to rounding)."""
    if class_sizes.size == 1 or cluster_sizes.size == 1:
        return 0.0
    cells, cell_counts = np.unique(class_ids * cluster_sizes.size + cluster_ids,
                                   return_counts=True)
    row, col = np.divmod(cells, cluster_sizes.size)
    cell_counts = cell_counts.astype(np.float64)
    total = cell_counts.sum()
    cell_fraction = cell_counts / total
    outer = class_sizes[row].astype(np.int64) * cluster_sizes[col].astype(np.int64)
    log_outer = -np.log(outer) + np.log(class_sizes.sum()) + np.log(cluster_sizes.sum())
    terms = (cell_fraction * (np.log(cell_counts) - np.log(total))
             + cell_fraction * log_outer)
    terms = np.where(np.abs(terms) < np.finfo(terms.dtype).eps, 0.0, terms)
    return float(np.clip(terms.sum(), 0.0, None))


def _entropy(group_sizes: np.ndarray) -> float:
    """Entropy (nats) of a labelling from its group sizes (all > 0)."""
    if group_sizes.size == 1:
        return 0.0
    total = np.sum(group_sizes)
    return float(-np.sum((group_sizes / total) * (np.log(group_sizes) - np.log(total))))


def nmi(embeddings, labels, *, num_clusters: int | None = None, seed: int = 0,
        max_iters: int = DEFAULT_KMEANS_MAX_ITERS,
        num_restarts: int = DEFAULT_KMEANS_RESTARTS) -> float:
    """NMI between ``labels`` and the k-means clusters of ``embeddings`` (method.md §5).

    k-means with K = the number of distinct labels by default, as in the paper's protocol, then
    ``nmi_from_assignments``.
    Host-side: inputs are copied to the host; not for use inside ``jax.jit``.

    Args:
      embeddings: [N, D] real array (numpy or jax; any float or integer dtype, not bool), N >= 1,
        D >= 1, every entry finite; copied to the host as float32.
      labels: int[N] class labels of the rows (arbitrary integers; whole-valued floats accepted).
      num_clusters: K, an integer in [1, N], or None (default): the number of distinct labels.
      seed: integer seed of k-means (Python or numpy int, not bool).
      max_iters: Lloyd iterations at most per k-means run, an integer >= 0.
      num_restarts: k-means runs (the lowest inertia wins), an integer >= 1.

    Returns:
      float in [0, 1].

    Raises:
      ValueError: naming the argument: ``embeddings`` not a non-empty 2-D real array or holding
        NaN/inf; ``labels`` not 1-D integer or of another length than N; ``num_clusters`` not in
        [1, N]; ``max_iters`` < 0; ``num_restarts`` < 1; ``seed`` not an integer.

    Example:
      >>> import numpy as np
      >>> from smine_jax import metrics
      >>> embeddings = np.array([[0.0], [0.1], [1.0], [1.1], [5.0]], np.float32)
      >>> labels = np.array([0, 0, 1, 1, 1])
      >>> round(metrics.nmi(embeddings, labels), 3)
      0.202
    """
    points, labels = _check_inputs(embeddings, labels)
    if num_clusters is None:
        num_clusters = int(np.unique(labels).size)
    assignments = kmeans(points, num_clusters, seed=seed, max_iters=max_iters,
                         num_restarts=num_restarts)
    return nmi_from_assignments(np.asarray(assignments), labels)


# ----------------------------------------------------------------------------------------------
# Everything at once.


def evaluate(embeddings, labels, *, ks: Iterable[int] = DEFAULT_KS,
             num_clusters: int | None = None, seed: int = 0,
             timings: MutableMapping[str, float] | None = None) -> dict[str, float]:
    """All test metrics of the paper's protocol (method.md §5) plus MAP@R and R-precision, at once.

    The neighbour lists are searched once for every retrieval metric (leave-one-out, Euclidean);
    NMI uses k-means with K = ``num_clusters``.
    Host-side: inputs are copied to the host; not for use inside ``jax.jit``.

    Args:
      embeddings: [N, D] real array (numpy or jax; any float or integer dtype, not bool), N >= 1,
        D >= 1, every entry finite; copied to the host as float32.
      labels: int[N] class labels of the rows (arbitrary integers; whole-valued floats accepted).
        At least one class needs two samples.
      ks: Recall@K cut-offs: one int or an iterable of ints, each in [1, N − 1] (default
        (1, 2, 4, 8), which needs N >= 9); repeats are dropped.
      num_clusters: K of the NMI's k-means, an integer in [1, N], or None (default): the number
        of distinct labels.
      seed: integer seed of k-means.
      timings: optional mutable mapping; receives ``"knn"`` (seconds of the search and retrieval
        metrics) and ``"kmeans"`` (seconds of the clustering and NMI), compilation included.

    Returns:
      dict with float values ``recall@K`` for each K in ``ks``, ``nmi``, ``map@r``,
      ``r_precision`` (each in [0, 1]), and int values ``num_queries`` (N) and
      ``num_excluded_queries`` (queries alone in their class, left out of the retrieval metrics).

    Raises:
      ValueError: naming the argument: ``embeddings`` not a non-empty 2-D real array or holding
        NaN/inf (the message gives the first bad row); ``labels`` not 1-D integer, of another
        length than N, or with every sample alone in its class (nothing to retrieve);
        ``ks`` empty, not integers, or a K outside [1, N − 1]; ``num_clusters`` not in [1, N];
        ``seed`` not an integer.

    Example:
      >>> import numpy as np
      >>> from smine_jax import metrics
      >>> embeddings = np.array([[0.0], [0.1], [1.0], [1.1], [5.0]], np.float32)
      >>> labels = np.array([0, 0, 1, 1, 1])
      >>> scores = metrics.evaluate(embeddings, labels, ks=(1,))
      >>> sorted(scores)
      ['map@r', 'nmi', 'num_excluded_queries', 'num_queries', 'r_precision', 'recall@1']
    """
    points, labels = _check_inputs(embeddings, labels)
    ks = _check_ks(ks, points.shape[0])
    start = time.perf_counter()
    scores, num_excluded = _retrieval_scores(points, labels, ks, rank_metrics=True)
    retrieval_done = time.perf_counter()
    nmi_score = nmi(points, labels, num_clusters=num_clusters, seed=seed)
    if timings is not None:
        timings["knn"] = retrieval_done - start
        timings["kmeans"] = time.perf_counter() - retrieval_done
    results: dict[str, float] = {f"recall@{k}": scores[f"recall@{k}"] for k in ks}
    results["nmi"] = nmi_score
    results["map@r"] = scores["map@r"]
    results["r_precision"] = scores["r_precision"]
    results["num_queries"] = points.shape[0]
    results["num_excluded_queries"] = num_excluded
    return results
