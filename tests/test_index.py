"""Tests of smine_jax.index: embedding shard dumps and the exact / ScaNN neighbour backends."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smine_jax import index

# --------------------------------------------------------------------------------------------
# References and data
# --------------------------------------------------------------------------------------------


def reference_neighbours(embeddings, k, query_ids=None):
    """Slow, obvious kNN: float64 distances to every row, self excluded, sorted by (d², id)."""
    x = np.asarray(embeddings, np.float64)
    query_ids = np.arange(len(x)) if query_ids is None else np.asarray(query_ids)
    all_ids, all_dists = [], []
    for query in query_ids:
        sq = ((x - x[query]) ** 2).sum(axis=1)
        others = [row for row in range(len(x)) if row != query]
        ranked = sorted(others, key=lambda row: (sq[row], row))[:k]
        all_ids.append(ranked)
        all_dists.append(sq[ranked])
    return np.array(all_ids, np.int64).reshape(-1, k), np.array(all_dists).reshape(-1, k)


def gaussian(num_rows, dim, seed=0):
    return np.random.default_rng(seed).standard_normal((num_rows, dim)).astype(np.float32)


def clustered(num_rows, dim, seed=0, rows_per_class=50, noise=0.08):
    """Unit vectors around random unit class centres (the shape of trained embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, num_rows // rows_per_class), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, len(centres), num_rows)
    x = centres[labels] + noise * rng.standard_normal((num_rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def recall(found_ids, true_ids):
    k = true_ids.shape[1]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(found_ids, true_ids, strict=True)])


# --------------------------------------------------------------------------------------------
# neighbours: correctness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_rows,dim,k", [(2, 3, 1), (7, 3, 6), (60, 5, 4), (200, 16, 17)])
def test_exact_matches_reference(num_rows, dim, k):
    x = gaussian(num_rows, dim, seed=num_rows)
    ids, sq_dists = index.neighbours(x, k)
    ref_ids, ref_dists = reference_neighbours(x, k)
    assert isinstance(ids, np.ndarray) and isinstance(sq_dists, np.ndarray)
    assert ids.dtype == np.int32 and sq_dists.dtype == np.float32
    assert ids.shape == sq_dists.shape == (num_rows, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sq_dists, ref_dists, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    num_rows=st.sampled_from([6, 13]),
    k_choice=st.sampled_from(["one", "half", "all"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_ties_ordered_by_lower_id(num_rows, k_choice, seed):
    """Small integer coordinates: many exact ties and duplicates; float32 distances are exact."""
    k = {"one": 1, "half": num_rows // 2, "all": num_rows - 1}[k_choice]
    x = np.random.default_rng(seed).integers(-2, 3, (num_rows, 3)).astype(np.float32)
    ids, sq_dists = index.neighbours(x, k)
    ref_ids, ref_dists = reference_neighbours(x, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(sq_dists, ref_dists.astype(np.float32))


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_duplicates_never_self_and_ties_by_id(backend):
    # Rows 0, 2, 4 coincide; rows 1, 3 coincide; every row's duplicates are at distance 0.
    x = np.array([[0, 0], [1, 0], [0, 0], [1, 0], [0, 0], [5, 5]], np.float32)
    ids, sq_dists = index.neighbours(x, 5, backend=backend)
    assert not (ids == np.arange(6)[:, None]).any()
    np.testing.assert_array_equal(ids[0], [2, 4, 1, 3, 5])
    np.testing.assert_array_equal(sq_dists[0], [0, 0, 1, 1, 50])
    np.testing.assert_array_equal(ids[3], [1, 0, 2, 4, 5])
    np.testing.assert_array_equal(ids, reference_neighbours(x, 5)[0])


def test_exact_and_scann_brute_force_agree_on_5k_random_vectors():
    x = gaussian(5000, 32, seed=1)
    exact_ids, exact_dists = index.neighbours(x, 20, backend="exact")
    scann_ids, scann_dists = index.neighbours(x, 20, backend="scann")
    np.testing.assert_array_equal(scann_ids, exact_ids)
    np.testing.assert_array_equal(scann_dists, exact_dists)  # same float32 recomputation
    sample = np.arange(0, 5000, 250)
    ref_ids, ref_dists = reference_neighbours(x, 20, sample)
    np.testing.assert_array_equal(exact_ids[sample], ref_ids)
    np.testing.assert_allclose(exact_dists[sample], ref_dists, rtol=1e-5)
    assert np.all(np.diff(exact_dists, axis=1) >= 0)


def test_scann_tree_ah_recall_on_clustered_data():
    x, _ = clustered(20_000, 64)
    k = 32
    queries = np.random.default_rng(2).choice(len(x), 2000, replace=False)
    true_ids, _ = index.neighbours(x, k, query_ids=queries)
    ah_ids, ah_dists = index.neighbours(x, k, backend="scann", mode="tree_ah", query_ids=queries)
    assert recall(ah_ids, true_ids) >= 0.95
    # Distances are the exact ones of the returned ids, ascending, self never returned.
    expected = ((x[queries][:, None, :] - x[ah_ids]) ** 2).sum(-1)
    np.testing.assert_allclose(ah_dists, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(ah_dists, axis=1) >= 0)
    assert not (ah_ids == queries[:, None]).any()


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_query_ids_select_rows_of_the_full_result(backend):
    x = gaussian(300, 8, seed=3)
    full_ids, full_dists = index.neighbours(x, 9, backend=backend)
    queries = np.array([299, 0, 17, 17, 150])
    ids, sq_dists = index.neighbours(x, 9, backend=backend, query_ids=queries)
    np.testing.assert_array_equal(ids, full_ids[queries])
    np.testing.assert_array_equal(sq_dists, full_dists[queries])
    ids, sq_dists = index.neighbours(x, 9, backend=backend, query_ids=np.array([], np.int64))
    assert ids.shape == sq_dists.shape == (0, 9)


def test_index_built_once_serves_several_searches():
    x = gaussian(400, 8, seed=4)
    # All leaves searched and every row re-scored exactly: tree + AH must find the exact lists.
    built = index.build_index(x, 5, backend="scann", mode="tree_ah", num_leaves=4,
                              num_leaves_to_search=4, reorder_k=400)
    assert (built.config.num_leaves, built.config.reorder_k) == (4, 400)
    first, _ = built.search(np.arange(200))
    second, _ = built.search(np.arange(200, 400))
    np.testing.assert_array_equal(np.concatenate([first, second]),
                                  index.neighbours(x, 5)[0])


def test_tree_ah_queries_with_short_leaves_are_searched_in_every_leaf():
    # One leaf of ~20 rows cannot hold k + 1 = 301 candidates: every query falls back to all
    # leaves, and with every row re-scored exactly (reorder_k >= N) the lists are exact.
    x = gaussian(400, 4, seed=5)
    ids, sq_dists = index.neighbours(x, 300, backend="scann", mode="tree_ah", num_leaves=20,
                                     num_leaves_to_search=1, reorder_k=400)
    exact_ids, exact_dists = index.neighbours(x, 300)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_array_equal(sq_dists, exact_dists)


def test_short_candidate_lists_are_an_error():
    built = index.build_index(gaussian(20, 2), 3)
    short = dataclasses.replace(
        built, _candidates=lambda query_ids: np.full((len(query_ids), 4), -1, np.int32))
    with pytest.raises(RuntimeError, match="fewer than k = 3 neighbours for 20 of 20"):
        short.search()


# --------------------------------------------------------------------------------------------
# neighbours: bad input and options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["exact", "scann"])
@pytest.mark.parametrize("k", [0, 10, 11, -1, 2.5, True])
def test_k_out_of_range_is_a_clear_error(backend, k):
    with pytest.raises(ValueError, match="k"):
        index.neighbours(gaussian(10, 2), k, backend=backend)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_k_equal_n_minus_one_lists_every_other_row(backend):
    x = gaussian(9, 2, seed=6)
    ids, _ = index.neighbours(x, 8, backend=backend)
    for row in range(9):
        assert sorted(ids[row]) == [other for other in range(9) if other != row]


@pytest.mark.parametrize(
    "embeddings,match",
    [
        (np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]]), "NaN"),
        (np.zeros(5), "2-D"),
        (np.array([["a", "b"], ["c", "d"]]), "dtype"),
    ],
)
def test_bad_embeddings_rejected(embeddings, match):
    with pytest.raises(ValueError, match=match):
        index.neighbours(embeddings, 1)


@pytest.mark.parametrize("query_ids", [[0, 10], [-1], [[0, 1]], [0.5]])
def test_bad_query_ids_rejected(query_ids):
    for backend in index.BACKENDS:
        with pytest.raises(ValueError, match="query_ids"):
            index.neighbours(gaussian(10, 2), 2, backend=backend, query_ids=query_ids)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(backend="faiss"), "backend"),
        (dict(backend="exact", num_leaves=4), "num_leaves"),
        (dict(backend="scann", leaves=4), "leaves"),
        (dict(backend="scann", num_leaves=4), "tree_ah"),
        (dict(backend="scann", mode="tree"), "mode"),
        (dict(backend="scann", mode="tree_ah", num_leaves=0), "num_leaves"),
        (dict(backend="scann", mode="tree_ah", num_leaves=4, num_leaves_to_search=5),
         "num_leaves_to_search"),
        (dict(backend="scann", mode="tree_ah", reorder_k=3), "reorder_k"),
        (dict(backend="exact", chunk_size=0), "chunk_size"),
    ],
)
def test_bad_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        index.neighbours(gaussian(50, 2), 5, **kwargs)


def test_scann_defaults_derive_from_n_and_k():
    config = index.scann_config(10_000, 128, mode="tree_ah")
    assert (config.num_leaves, config.num_leaves_to_search) == (100, 20)  # 20 % of √N leaves
    assert (config.reorder_k, config.dims_per_block) == (516, 1)
    assert config.training_sample_size == 10_000
    # Small N: enough leaves for ~4 (k + 1) rows, ⌈4 · 129 · 45 / 2000⌉ = 12 of 45.
    assert index.scann_config(2_000, 128, mode="tree_ah").num_leaves_to_search == 12
    assert index.scann_config(10_000, 128).mode == "brute_force"
    big = index.scann_config(4_000_000, 4, mode="tree_ah")
    assert (big.num_leaves, big.training_sample_size) == (2000, 100_000)


def test_missing_scann_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scann", None)  # makes `import scann` raise ImportError
    with pytest.raises(ImportError, match="pip install scann") as error:
        index.neighbours(gaussian(10, 2), 2, backend="scann")
    assert "tensorflow 2.20" in str(error.value)
    # The exact backend never imports scann.
    index.neighbours(gaussian(10, 2), 2, backend="exact")


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def write_dump(directory, num_shards=4, rows=(5, 3, 7, 1), dim=6, seed=0, order=None):
    """Writes a dump with ids scattered over shards; returns the arrays sorted by id."""
    rng = np.random.default_rng(seed)
    total = sum(rows)
    embeddings = rng.standard_normal((total, dim)).astype(np.float32)
    labels = rng.integers(-3, 40, total)
    ids = rng.permutation(10 * total)[:total]  # unique, unsorted, not contiguous
    bounds = np.cumsum((0,) + tuple(rows))
    for shard in order if order is not None else range(num_shards):
        part = slice(bounds[shard], bounds[shard + 1])
        index.write_shard(directory, embeddings[part], labels[part], ids[part], shard=shard,
                          num_shards=num_shards)
    by_id = np.argsort(ids)
    return embeddings[by_id], labels[by_id], ids[by_id]


def test_round_trip_several_shards_written_out_of_order(tmp_path):
    expected = write_dump(tmp_path, order=[3, 0, 2, 1])
    embeddings, labels, ids = index.read_shards(tmp_path)
    assert (embeddings.dtype, labels.dtype, ids.dtype) == (np.float32, np.int32, np.int64)
    for got, want in zip((embeddings, labels, ids), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.all(np.diff(ids) > 0)


def test_single_shard_and_checksum_skip(tmp_path):
    expected = write_dump(tmp_path, num_shards=1, rows=(4,))
    for verify in (True, False):
        for got, want in zip(index.read_shards(str(tmp_path), verify_checksums=verify),
                             expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_an_empty_shard_is_valid(tmp_path):
    # A process of a multi-host run that owns no samples still writes its (empty) shard.
    expected = write_dump(tmp_path, num_shards=3, rows=(4, 0, 3))
    for got, want in zip(index.read_shards(tmp_path), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_rewriting_a_shard_replaces_it(tmp_path):
    write_dump(tmp_path, num_shards=2, rows=(3, 3))
    new_embeddings = np.full((2, 6), 7.0, np.float32)
    index.write_shard(tmp_path, new_embeddings, [1, 1], [1000, 1001], shard=1, num_shards=2)
    embeddings, labels, ids = index.read_shards(tmp_path)
    assert ids.shape == (5,) and list(ids[-2:]) == [1000, 1001]
    np.testing.assert_array_equal(embeddings[-2:], new_embeddings)


def test_missing_shard(tmp_path):
    write_dump(tmp_path, order=[0, 1, 3])
    with pytest.raises(index.ShardError, match=r"1 of 4 shards missing \(shard indices \[2\]"):
        index.read_shards(tmp_path)


def test_duplicate_shard(tmp_path):
    manifest = index.write_shard(tmp_path, gaussian(2, 3), [0, 1], [0, 1], shard=0,
                                 num_shards=2)
    index.write_shard(tmp_path, gaussian(2, 3), [0, 1], [2, 3], shard=1, num_shards=2)
    shutil.copy(manifest, tmp_path / "copy-of-shard-0.shard.json")
    with pytest.raises(index.ShardError, match="shard 0 appears twice"):
        index.read_shards(tmp_path)


def test_num_shards_disagree(tmp_path):
    index.write_shard(tmp_path, gaussian(2, 3), [0, 1], [0, 1], shard=0, num_shards=2)
    index.write_shard(tmp_path, gaussian(2, 3), [0, 1], [2, 3], shard=1, num_shards=3)
    with pytest.raises(index.ShardError, match="num_shards"):
        index.read_shards(tmp_path)


def test_other_dimension(tmp_path):
    index.write_shard(tmp_path, gaussian(2, 3), [0, 1], [0, 1], shard=0, num_shards=2)
    bad = index.write_shard(tmp_path, gaussian(2, 4), [0, 1], [2, 3], shard=1, num_shards=2)
    with pytest.raises(index.ShardError, match="dimension 4") as error:
        index.read_shards(tmp_path)
    assert bad in str(error.value)


def test_repeated_ids_across_shards(tmp_path):
    index.write_shard(tmp_path, gaussian(2, 3), [0, 1], [5, 9], shard=0, num_shards=2)
    index.write_shard(tmp_path, gaussian(3, 3), [0, 1, 2], [1, 9, 7], shard=1, num_shards=2)
    with pytest.raises(index.ShardError, match="id 9 in .*shard-00000.*shard-00001"):
        index.read_shards(tmp_path)


def test_truncated_file(tmp_path):
    write_dump(tmp_path, num_shards=2, rows=(4, 4))
    path = tmp_path / "shard-00001-of-00002.embeddings.npy"
    os.truncate(path, os.path.getsize(path) - 8)
    with pytest.raises(index.ShardError, match="truncated") as error:
        index.read_shards(tmp_path)
    assert str(path) in str(error.value)


def test_corrupted_file_same_size(tmp_path):
    write_dump(tmp_path, num_shards=2, rows=(4, 4))
    path = tmp_path / "shard-00000-of-00002.labels.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(index.ShardError, match="CRC32"):
        index.read_shards(tmp_path)
    index.read_shards(tmp_path, verify_checksums=False)  # sizes still match


def test_missing_array_file_and_bad_manifest(tmp_path):
    write_dump(tmp_path, num_shards=2, rows=(4, 4))
    os.remove(tmp_path / "shard-00001-of-00002.ids.npy")
    with pytest.raises(index.ShardError, match="missing file"):
        index.read_shards(tmp_path)
    (tmp_path / "shard-00001-of-00002.shard.json").write_text("{\"format\": ")
    with pytest.raises(index.ShardError, match="unreadable shard manifest"):
        index.read_shards(tmp_path)
    (tmp_path / "shard-00001-of-00002.shard.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(index.ShardError, match="not a smine_jax shard manifest"):
        index.read_shards(tmp_path)


def test_half_written_temporary_files_are_ignored(tmp_path):
    expected = write_dump(tmp_path, num_shards=2, rows=(3, 2))
    (tmp_path / ".shard-00001-of-00002.shard.json.tmp-deadbeef").write_text("{\"form")
    (tmp_path / ".shard-00002-of-00003.embeddings.npy.tmp-0").write_bytes(b"\x93NUMPY")
    for got, want in zip(index.read_shards(tmp_path), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_writer_killed_before_manifest_leaves_shard_missing(tmp_path, monkeypatch):
    index.write_shard(tmp_path, gaussian(2, 3), [0, 1], [0, 1], shard=0, num_shards=2)
    real_replace = os.replace

    def dies_on_manifest(source, destination):
        if str(destination).endswith(".shard.json"):
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", dies_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        index.write_shard(tmp_path, gaussian(2, 3), [0, 1], [2, 3], shard=1, num_shards=2)
    monkeypatch.undo()
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
    with pytest.raises(index.ShardError, match=r"shard indices \[1\]"):
        index.read_shards(tmp_path)


def test_empty_or_absent_directory(tmp_path):
    with pytest.raises(index.ShardError, match="no shard manifests"):
        index.read_shards(tmp_path)
    with pytest.raises(index.ShardError, match="no such shard directory"):
        index.read_shards(tmp_path / "absent")


@pytest.mark.parametrize(
    "embeddings,labels,ids,shard,num_shards,match",
    [
        (np.full((2, 3), np.nan), [0, 1], [0, 1], 0, 1, "NaN"),
        (np.zeros(3), [0, 1, 2], [0, 1, 2], 0, 1, "2-D"),
        (np.zeros((2, 3)), [0], [0, 1], 0, 1, "labels"),
        (np.zeros((2, 3)), [0, 1], [0, 1, 2], 0, 1, "ids"),
        (np.zeros((2, 3)), [0, 1], [4, 4], 0, 1, "unique"),
        (np.zeros((2, 3)), [0.5, 1], [0, 1], 0, 1, "labels"),
        (np.zeros((2, 3)), [0, 2**40], [0, 1], 0, 1, "int32"),
        (np.zeros((2, 3)), [0, 1], [0, 1], 2, 2, "shard"),
        (np.zeros((2, 3)), [0, 1], [0, 1], -1, 2, "shard"),
        (np.zeros((2, 3)), [0, 1], [0, 1], 0, 0, "num_shards"),
        (np.zeros((2, 3)), [0, 1], [0, 1], 0.0, 1, "shard"),
    ],
)
def test_write_shard_validates_inputs(tmp_path, embeddings, labels, ids, shard, num_shards,
                                      match):
    with pytest.raises(ValueError, match=match):
        index.write_shard(tmp_path, embeddings, labels, ids, shard=shard, num_shards=num_shards)
    assert not os.listdir(tmp_path)


def test_dump_feeds_the_index(tmp_path):
    """End to end: shards from two 'processes' → read → neighbours by row of the sorted dump."""
    x, labels = clustered(400, 8, seed=7, rows_per_class=20)
    ids = np.arange(400) * 3
    index.write_shard(tmp_path, x[200:], labels[200:], ids[200:], shard=1, num_shards=2)
    index.write_shard(tmp_path, x[:200], labels[:200], ids[:200], shard=0, num_shards=2)
    embeddings, read_labels, read_ids = index.read_shards(tmp_path)
    np.testing.assert_array_equal(read_ids, ids)
    np.testing.assert_array_equal(read_labels, labels)
    np.testing.assert_array_equal(index.neighbours(embeddings, 7)[0],
                                  reference_neighbours(x, 7)[0])
