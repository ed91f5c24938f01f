"""Tests of smine_jax.metrics against slow, obvious references written here.

Retrieval references rank every query's other samples with a stable argsort of a full float64
distance matrix (ties: lower index first). Embeddings lie on a grid of 1/16 (small integers for
the tie-heavy cases), where every float32 distance the library computes is exact, so the
library and the reference must agree exactly, ties included.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from smine_jax import knn, metrics

# ----------------------------------------------------------------------------------------------
# References.


def reference_retrieval(points, labels, ks):
    """Recall@K, R-precision and MAP@R by loops over a float64 distance matrix."""
    points = np.asarray(points, np.float64)
    labels = np.asarray(labels)
    num_rows = len(points)
    sq_dists = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    recalls = {k: [] for k in ks}
    r_precisions, average_precisions = [], []
    excluded = 0
    for query in range(num_rows):
        others = [j for j in range(num_rows) if j != query]
        ranked = [others[j] for j in np.argsort(sq_dists[query, others], kind="stable")]
        relevant = [bool(labels[j] == labels[query]) for j in ranked]
        num_relevant = sum(relevant)
        if num_relevant == 0:
            excluded += 1
            continue
        for k in ks:
            recalls[k].append(any(relevant[:k]))
        r_precisions.append(sum(relevant[:num_relevant]) / num_relevant)
        hits, precision_sum = 0, 0.0
        for rank in range(1, num_relevant + 1):
            if relevant[rank - 1]:
                hits += 1
                precision_sum += hits / rank
        average_precisions.append(precision_sum / num_relevant)
    scores = {f"recall@{k}": float(np.mean(recalls[k])) for k in ks}
    scores["r_precision"] = float(np.mean(r_precisions))
    scores["map@r"] = float(np.mean(average_precisions))
    return scores, excluded


def inertia(points, assignments):
    """Sum of squared distances of the points to the mean of their cluster (float64)."""
    points = np.asarray(points, np.float64)
    assignments = np.asarray(assignments)
    total = 0.0
    for cluster in np.unique(assignments):
        members = points[assignments == cluster]
        total += float(((members - members.mean(0)) ** 2).sum())
    return total


def grid_points(rng, num_rows, dim, levels):
    """float32 points on a grid: exact float32 distances. levels=4 gives many ties/duplicates."""
    if levels <= 4:
        return rng.integers(0, levels, (num_rows, dim)).astype(np.float32)
    return (rng.integers(-levels, levels, (num_rows, dim)) / 16.0).astype(np.float32)


def random_labels(rng, num_rows, scheme):
    """Labels: few classes, many classes (singletons), or non-contiguous negative values."""
    if scheme == "few":
        return rng.integers(0, 3, num_rows)
    if scheme == "many":
        return rng.integers(0, max(2, num_rows // 2), num_rows)
    values = np.array([-7, -1, 3, 1000, 2**40])
    return values[rng.integers(0, values.size, num_rows)]


def blobs(rng, num_per_blob, num_blobs, dim, spread=0.05):
    centres = rng.normal(size=(num_blobs, dim)) * 10
    labels = np.repeat(np.arange(num_blobs), num_per_blob)
    points = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    return points.astype(np.float32), labels


def assert_scores_equal(scores, expected):
    assert scores.keys() == expected.keys()
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-12), name


# ----------------------------------------------------------------------------------------------
# Retrieval metrics.

RETRIEVAL_CASES = [
    # (num_rows, dim, grid levels, label scheme)
    (2, 1, 4, "few"),
    (3, 2, 4, "few"),
    (9, 1, 4, "odd"),
    (17, 2, 4, "many"),
    (40, 3, 4, "few"),
    (64, 8, 64, "many"),
    (100, 2, 4, "odd"),
    (150, 32, 64, "few"),
    (300, 4, 64, "odd"),
    (300, 16, 64, "many"),
]


@pytest.mark.parametrize("num_rows, dim, levels, scheme", RETRIEVAL_CASES)
def test_retrieval_matches_reference(num_rows, dim, levels, scheme):
    rng = np.random.default_rng(num_rows * 31 + dim)
    points = grid_points(rng, num_rows, dim, levels)
    labels = random_labels(rng, num_rows, scheme)
    if np.all(np.unique(labels, return_counts=True)[1] == 1):
        labels[1] = labels[0]
    ks = tuple(k for k in (1, 2, 4, 8, num_rows - 1) if k < num_rows)
    expected, expected_excluded = reference_retrieval(points, labels, ks)
    scores, excluded = metrics._retrieval_scores(points, labels, ks, rank_metrics=True)
    assert excluded == expected_excluded
    assert_scores_equal(scores, expected)


def test_retrieval_in_several_padded_blocks_and_chunks(monkeypatch):
    rng = np.random.default_rng(5)
    points = grid_points(rng, 101, 3, 4)  # many exact ties and duplicate points
    labels = random_labels(rng, 101, "odd")
    expected, expected_excluded = reference_retrieval(points, labels, (1, 2, 4, 8))
    monkeypatch.setattr(knn, "_CHUNK_ELEMENTS", 7 * 101)  # 7 queries a chunk
    monkeypatch.setattr(metrics, "_LIST_ENTRIES_PER_BLOCK", 3 * 7 * 60)  # a few chunks a block
    blocks = list(metrics._query_blocks(np.arange(101, dtype=np.int32), 60, 101))
    assert len(blocks) > 2 and blocks[-1].size < blocks[0].size
    assert {block.padded_ids.size for block in blocks} == {blocks[0].padded_ids.size}
    np.testing.assert_array_equal(np.concatenate([b.padded_ids[:b.size] for b in blocks]),
                                  np.arange(101))
    scores, excluded = metrics._retrieval_scores(points, labels, (1, 2, 4, 8), rank_metrics=True)
    assert excluded == expected_excluded
    assert_scores_equal(scores, expected)


def test_public_retrieval_functions_match_reference():
    rng = np.random.default_rng(11)
    points = grid_points(rng, 120, 3, 64)
    labels = random_labels(rng, 120, "odd")
    ks = (8, 1, 3, 1)
    expected, _ = reference_retrieval(points, labels, (8, 1, 3))
    recalls = metrics.recall_at_k(points, labels, ks)
    assert list(recalls) == [8, 1, 3]
    for k, value in recalls.items():
        assert value == pytest.approx(expected[f"recall@{k}"], abs=1e-12)
    assert metrics.r_precision(points, labels) == pytest.approx(expected["r_precision"], abs=1e-12)
    assert metrics.map_at_r(points, labels) == pytest.approx(expected["map@r"], abs=1e-12)
    # jax arrays are accepted as well
    assert metrics.recall_at_k(jnp.asarray(points), jnp.asarray(labels), 3) == {3: recalls[3]}


def test_hand_computed_example_with_ties_and_a_singleton():
    # 1-D points 0..4 (labels 0 1 0 0 1) and a far singleton. Ranked neighbours (ties: lower
    # index first) and relevance, worked by hand:
    #   q0: 1 2 3 4 -> 0 1 1 0  R=2  R-prec 1/2  AP (1/2)(1/2)  = 1/4  first hit at rank 2
    #   q1: 0 2 3 4 -> 0 0 0 1  R=1  R-prec 0    AP 0                  first hit at rank 4
    #   q2: 1 3 0 4 -> 0 1 1 0  R=2  R-prec 1/2  AP 1/4                first hit at rank 2
    #   q3: 2 4 1 0 -> 1 0 0 1  R=2  R-prec 1/2  AP (1/2)(1/1)  = 1/2  first hit at rank 1
    #   q4: 3 2 1 0 -> 0 0 1 0  R=1  R-prec 0    AP 0                  first hit at rank 3
    #   q5: alone in its class -> excluded
    points = np.array([[0], [1], [2], [3], [4], [100]], np.float32)
    labels = np.array([0, 1, 0, 0, 1, 7])
    scores, excluded = metrics._retrieval_scores(points, labels, (1, 2, 3, 4), rank_metrics=True)
    assert excluded == 1
    assert scores == pytest.approx({"recall@1": 1 / 5, "recall@2": 3 / 5, "recall@3": 4 / 5,
                                    "recall@4": 1.0, "r_precision": 0.3, "map@r": 0.2})


def test_musgrave_map_at_r_example():
    # "A Metric Learning Reality Check", Sec. 3.2: R = 10, hits at ranks 1, 2 and 4:
    # MAP@R = (1/10)(1/1 + 2/2 + 3/4) = 0.275, R-precision = 3/10.
    hits = np.zeros((1, 12), bool)
    hits[0, [0, 1, 3, 11]] = True  # the hit at rank 12 lies beyond R and must not count
    scores = metrics._per_query_scores(np.where(hits, 5, -5), np.array([5]), np.array([10]),
                                       (1, 3), rank_metrics=True)
    assert scores["map@r"][0] == pytest.approx(0.275)
    assert scores["r_precision"][0] == pytest.approx(0.3)
    assert scores["recall@1"][0] == 1.0 and scores["recall@3"][0] == 1.0


def test_duplicates_are_neighbours_but_self_is_not():
    # Rows 0-3 each have an exact duplicate of another class; rows 4 and 5 duplicate each
    # other. Ranked neighbours by hand (ties: lower index first), first same-class hit:
    #   q0: 1 2 3 -> rank 2   q1: 0 2 3 -> rank 3   q2: 3 0 1 -> rank 2   q3: 2 0 1 -> rank 3
    #   q4: 5 -> rank 1       q5: 4 -> rank 1
    # Counting self would make every Recall@1 a hit; dropping rows at distance 0 would lose 4, 5.
    points = np.array([[0, 0], [0, 0], [0, 1], [0, 1], [5, 5], [5, 5]], np.float32)
    labels = np.array([0, 1, 0, 1, 2, 2])
    recalls = metrics.recall_at_k(points, labels, (1, 2, 3))
    assert recalls == pytest.approx({1: 2 / 6, 2: 4 / 6, 3: 1.0})


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), offset=st.integers(-(2**40), 2**40))
def test_invariant_to_relabelling(seed, offset):
    rng = np.random.default_rng(seed)
    points = grid_points(rng, 30, 2, 4)
    labels = rng.integers(0, 6, 30)
    labels[:2] = 0  # at least one scorable query
    renamed = np.array([13, -2, 7, 0, 99, 5])[labels] * 3 + offset
    scores, excluded = metrics._retrieval_scores(points, labels, (1, 4), rank_metrics=True)
    renamed_scores, renamed_excluded = metrics._retrieval_scores(points, renamed, (1, 4),
                                                                 rank_metrics=True)
    assert scores == renamed_scores and excluded == renamed_excluded
    assert 0 <= scores["map@r"] <= scores["r_precision"] <= 1
    assert scores["recall@1"] <= scores["recall@4"]


# ----------------------------------------------------------------------------------------------
# NMI.


def nmi_cases():
    rng = np.random.default_rng(0)
    cases = [
        ([], []),
        ([3], [3]),
        ([0, 0, 0], [1, 1, 1]),  # both a single group -> 1.0
        ([0, 0, 0], [0, 1, 2]),  # one side a single group -> MI = 0
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # independent -> MI = 0
        ([0, 0, 1, 1], [5, 5, -3, -3]),  # perfect, renamed
        ([-7, 2**40, 2**40, 3, 3], [0, 0, 1, 1, 9]),
    ]
    for size in (2, 5, 17, 100, 1000, 5000):
        for num_classes, num_clusters in ((2, 2), (3, 7), (10, 3), (50, 50)):
            labels = rng.integers(0, num_classes, size) * 11 - 20
            clusters = rng.integers(0, num_clusters, size)
            if rng.random() < 0.5:  # correlated with the labels
                clusters = np.where(rng.random(size) < 0.7, labels % num_clusters, clusters)
            cases.append((clusters, labels))
    return cases


@pytest.mark.parametrize("assignments, labels", nmi_cases())
def test_nmi_from_assignments_equals_sklearn(assignments, labels):
    expected = normalized_mutual_info_score(labels, assignments)
    assert metrics.nmi_from_assignments(assignments, labels) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# k-means and NMI of embeddings.


@pytest.fixture(scope="module")
def blob_data():
    return blobs(np.random.default_rng(1), num_per_blob=40, num_blobs=5, dim=8)


def test_kmeans_recovers_separated_blobs_and_is_deterministic(blob_data):
    points, labels = blob_data
    first = np.asarray(metrics.kmeans(points, 5, seed=3))
    again = np.asarray(metrics.kmeans(points, 5, seed=3))
    assert first.dtype == np.int32 and first.shape == labels.shape
    np.testing.assert_array_equal(first, again)
    assert metrics.nmi_from_assignments(first, labels) == 1.0
    assert metrics.nmi(points, labels, seed=3) == 1.0


def test_kmeans_inertia_beats_poor_inits_and_matches_sklearn():
    rng = np.random.default_rng(2)
    points, _ = blobs(rng, num_per_blob=40, num_blobs=5, dim=8, spread=6.0)  # overlapping
    ours = inertia(points, metrics.kmeans(points, 5, seed=0))
    random_partition = inertia(points, rng.integers(0, 5, len(points)))
    seeding_only = inertia(points, metrics.kmeans(points, 5, seed=0, max_iters=0))
    one_step = inertia(points, metrics.kmeans(points, 5, seed=0, max_iters=1))
    assert ours <= one_step <= seeding_only * (1 + 1e-6)
    assert ours < random_partition
    sklearn = KMeans(5, n_init=3, random_state=0).fit(points.astype(np.float64)).inertia_
    assert ours <= sklearn * 1.02


def test_kmeans_converged_assignments_are_nearest_cluster_means(blob_data):
    points, _ = blob_data
    noisy = points + np.random.default_rng(4).normal(scale=8.0, size=points.shape)
    noisy = noisy.astype(np.float32)
    assignments = np.asarray(metrics.kmeans(noisy, 5, seed=0))
    used = np.unique(assignments)
    means = np.stack([noisy[assignments == c].mean(0) for c in used])
    nearest = used[np.argmin(((noisy[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    np.testing.assert_array_equal(nearest, assignments)


def test_kmeans_with_duplicates_and_more_clusters_than_distinct_points():
    points = np.repeat(np.array([[0, 0], [4, 0], [0, 4]], np.float32), [5, 3, 2], axis=0)
    assignments = np.asarray(metrics.kmeans(points, 6, seed=1))
    assert assignments.min() >= 0 and assignments.max() < 6
    assert inertia(points, assignments) == 0.0
    assert metrics.nmi_from_assignments(assignments, [0] * 5 + [1] * 3 + [2] * 2) == 1.0
    np.testing.assert_array_equal(metrics.kmeans(points, 1), np.zeros(10, np.int32))


def test_lloyd_keeps_the_centre_of_an_empty_cluster():
    # Centre 1 starts far from every point, so its cluster is empty. Kept in place, it stays
    # empty and all points stay with centre 0; moved anywhere near 0 it would capture 1 and 1.2.
    points = jnp.asarray([[1.0], [1.2], [10.0], [10.2]])
    centres = jnp.asarray([[5.6], [-100.0]])
    assignments, inertia_value = metrics._lloyd(points, jnp.sum(points**2, axis=1), centres,
                                                jnp.int32(10))
    np.testing.assert_array_equal(assignments, [0, 0, 0, 0])
    assert float(inertia_value) == pytest.approx(inertia(points, assignments), rel=1e-5)


def test_evaluate_returns_every_metric_from_one_search():
    rng = np.random.default_rng(7)
    points, labels = blobs(rng, num_per_blob=40, num_blobs=5, dim=8, spread=6.0)
    labels = np.concatenate([labels[:-1] * 7 - 3, [1000]])  # one singleton class
    timings = {}
    results = metrics.evaluate(points, labels, timings=timings)
    expected, excluded = reference_retrieval(points.astype(np.float64), labels, (1, 2, 4, 8))
    assert list(results) == ["recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r",
                             "r_precision", "num_queries", "num_excluded_queries"]
    # Random float points: the float32 search may order near-ties differently from the float64
    # reference, so compare to a tolerance here (the grid tests above compare exactly).
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, abs=0.01), name
    assert results["num_excluded_queries"] == excluded == 1 and results["num_queries"] == 200
    assigned = metrics.kmeans(points, 6, seed=0)
    assert results["nmi"] == metrics.nmi_from_assignments(assigned, labels)
    assert set(timings) == {"knn", "kmeans"}


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_inputs_raise_value_errors_naming_the_argument():
    points = np.zeros((10, 3), np.float32)
    points[:, 0] = np.arange(10)
    labels = np.arange(10) % 3
    with pytest.raises(ValueError, match="labels"):
        metrics.evaluate(points, labels[:9])
    with pytest.raises(ValueError, match="embeddings"):
        metrics.recall_at_k(points[:, 0], labels)
    with pytest.raises(ValueError, match="embeddings: 2 of 10 rows"):
        bad = points.copy()
        bad[3, 1], bad[7, 2] = np.nan, np.inf
        metrics.map_at_r(bad, labels)
    with pytest.raises(ValueError, match="ks"):
        metrics.recall_at_k(points, labels, (1, 10))
    with pytest.raises(ValueError, match="ks"):
        metrics.recall_at_k(points, labels, ())
    with pytest.raises(ValueError, match="ks"):
        metrics.evaluate(points[:8], labels[:8])  # default ks include 8 >= N
    with pytest.raises(ValueError, match="labels"):
        metrics.r_precision(points, np.arange(10))  # every class a singleton
    with pytest.raises(ValueError, match="labels"):
        metrics.recall_at_k(points, labels + 0.5)
    with pytest.raises(ValueError, match="num_clusters"):
        metrics.kmeans(points, 11)
    with pytest.raises(ValueError, match="num_clusters"):
        metrics.nmi(points, labels, num_clusters=0)
    with pytest.raises(ValueError, match="seed"):
        metrics.kmeans(points, 2, seed=0.5)
    with pytest.raises(ValueError, match="labels"):
        metrics.nmi_from_assignments([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="assignments"):
        metrics.nmi_from_assignments([[0, 1]], [0, 1])
