"""Embedding shard dumps and the k-nearest-neighbour index that smart mining walks (method.md §2).

Each epoch, every process embeds its part of the training set and writes one *shard*
(`write_shard`); the index reads them all back (`read_shards`) and lists, for every anchor, its
k nearest other samples (`neighbours`). The paper used an approximate graph index (FANNG); this
project offers two backends behind one interface:

* ``exact``: chunked matrix products on the device (`smine_jax.knn.exact_neighbours`).
* ``scann``: ScaNN on the host, brute force by default, or a k-means tree + asymmetric hashing
  (AH) + exact re-ordering for large sets (``mode="tree_ah"``).

Both backends return the same conventions, so mining cannot tell them apart: host numpy arrays,
ids int32 and squared Euclidean distances float32, a row never its own neighbour (excluded by
id, not by distance: datasets hold duplicate images), ascending, ties ordered by lower id. The
distances of the returned ids are recomputed in float32 in difference form ‖q − x‖² by one
shared step, so equal neighbour lists carry bit-identical distances whichever backend found
them (the expanded form ‖q‖² + ‖x‖² − 2 q·x used to *select* candidates loses the small
distances to cancellation, and those set the exclusion boundary of Eq. 6).

Shard format (one directory, any number of shards, written by different processes):

    shard-00003-of-00008.embeddings.npy   float32 [n, D]   (memory-mappable .npy)
    shard-00003-of-00008.labels.npy       int32   [n]
    shard-00003-of-00008.ids.npy          int64   [n]      (global sample ids, unique)
    shard-00003-of-00008.shard.json       manifest: shard, num_shards, n, D, per-file bytes + CRC32

Every file is written under a hidden temporary name in the same directory and renamed; the
manifest is renamed last, and an older manifest of the same shard is removed first, so a
killed writer leaves at worst a shard without a manifest, which `read_shards` reports missing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from smine_jax import fileio, knn, validation

BACKENDS = ("exact", "scann")
SCANN_MODES = ("brute_force", "tree_ah")

_FORMAT = "smine_jax.embedding_shard"
_FORMAT_VERSION = 1
_MANIFEST_SUFFIX = ".shard.json"
_ARRAYS = ("embeddings", "labels", "ids")
_DTYPES = {"embeddings": np.float32, "labels": np.int32, "ids": np.int64}
_CRC_BLOCK_BYTES = 1 << 24
# Queries per re-ranking chunk: at most 1024, and a gathered [chunk, candidates, D] float32
# block of at most 64 MiB. The chunk does not depend on how many queries are searched, so a
# row's distances are bit-identical whichever subset of rows (query_ids) it is searched with.
_RERANK_MAX_CHUNK = 1024
_RERANK_CHUNK_ELEMENTS = 1 << 24
# A candidate slot that holds no row (ScaNN pads short result lists; chunks are padded).
_NO_ROW = -1
# Rows per block of the host-side (distance, id) sort, and the sort key of an excluded slot.
_SORT_BLOCK_ROWS = 1 << 16
_EXCLUDED_KEY = np.uint64(0xFFFFFFFFFFFFFFFF)

_SCANN_INSTALL_HINT = (
    "The 'scann' backend needs ScaNN: `pip install scann` (Linux x86-64 wheels). ScaNN must "
    "be importable next to your TensorFlow: it works with tensorflow 2.20 or with no tensorflow "
    "installed, and fails to import next to tensorflow 2.21. Or use backend='exact'.")


class ShardError(ValueError):
    """A shard directory that cannot be trusted: missing, duplicated, truncated or inconsistent."""


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def _shard_stem(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def _check_shard_index(shard, num_shards) -> tuple[int, int]:
    for name, value in (("num_shards", num_shards), ("shard", shard)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards: expected >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard: expected 0 <= shard < num_shards = {num_shards}, got {shard}")
    return int(shard), int(num_shards)


def _file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as file:
        while block := file.read(_CRC_BLOCK_BYTES):
            crc = zlib.crc32(block, crc)
    return crc


def _fsync_directory(directory: str) -> None:
    """Makes the renames durable (best effort: not every platform can open a directory)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_shard(directory, embeddings, labels, ids, *, shard: int, num_shards: int) -> str:
    """Writes one process's shard of an embedding dump atomically; returns its manifest's path.

    Each epoch every process embeds its part of the training set and writes it here; the index
    reads all shards back with ``read_shards``. Files are written under temporary names and
    renamed, the manifest last (an older manifest of the same shard is removed first), so a
    killed writer never leaves a shard that ``read_shards`` would accept. Host-side I/O.

    Args:
      directory: str or path-like, the dump directory (created if missing); all shards of one
        dump share it.
      embeddings: [n, D] real array (numpy or jax), every entry finite, D >= 1; n = 0 is allowed
        (a process without samples). Stored as float32.
      labels: int[n] class labels, values within int32 (stored as int32).
      ids: int[n] global sample ids, unique within the dump (stored as int64); ``read_shards``
        sorts the rows by them.
      shard: this shard's index, an int with 0 <= shard < num_shards.
      num_shards: how many shards the complete dump has, an int >= 1.

    Returns:
      str, the path of the shard's manifest, ``<directory>/shard-SSSSS-of-NNNNN.shard.json``
      (next to it: ``.embeddings.npy`` f32[n, D], ``.labels.npy`` i32[n], ``.ids.npy`` i64[n]).

    Raises:
      ValueError: naming the argument: ``shard`` or ``num_shards`` not an integer, or not
        0 <= shard < num_shards >= 1; ``embeddings`` not 2-D real, D = 0, or holding NaN/inf;
        ``labels`` not int[n] or outside int32; ``ids`` not int[n] or repeating an id.
      OSError: the directory or a file cannot be written.

    Example:
      >>> import tempfile, numpy as np
      >>> from smine_jax import index
      >>> workdir = tempfile.TemporaryDirectory()
      >>> path = index.write_shard(workdir.name, np.zeros((2, 3)), np.array([0, 1]),
      ...                          np.array([10, 11]), shard=0, num_shards=1)
      >>> path.endswith("shard-00000-of-00001.shard.json")
      True
      >>> workdir.cleanup()
    """
    shard, num_shards = _check_shard_index(shard, num_shards)
    # A process of a multi-host run may own no samples: an empty shard is valid.
    embeddings = validation.as_embeddings(embeddings, allow_empty=True)
    num_rows, dim = embeddings.shape
    labels = validation.as_labels(labels, num_rows)
    int32 = np.iinfo(np.int32)
    if labels.size and (labels.min() < int32.min or labels.max() > int32.max):
        raise ValueError("labels: expected values that fit in int32")
    ids = validation.as_labels(ids, num_rows, name="ids")
    unique_ids, counts = np.unique(ids, return_counts=True)
    if unique_ids.size != num_rows:
        raise ValueError(
            f"ids: expected unique sample ids, but id {int(unique_ids[counts > 1][0])} appears "
            f"{int(counts.max())} times")
    arrays = {
        "embeddings": np.ascontiguousarray(embeddings, np.float32),
        "labels": labels.astype(np.int32),
        "ids": ids.astype(np.int64),
    }

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    stem = _shard_stem(shard, num_shards)
    manifest_path = os.path.join(directory, stem + _MANIFEST_SUFFIX)
    # Withdraw an older version of this shard before touching its arrays.
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    files = {}
    for name, array in arrays.items():
        file_name = f"{stem}.{name}.npy"
        path = os.path.join(directory, file_name)
        fileio.write_atomically(path, functools.partial(np.save, arr=array, allow_pickle=False))
        files[name] = {
            "file": file_name,
            "dtype": np.dtype(_DTYPES[name]).name,
            "shape": list(array.shape),
            "bytes": os.path.getsize(path),
            "crc32": _file_crc32(path),
        }
    manifest = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "shard": shard,
        "num_shards": num_shards,
        "num_rows": num_rows,
        "dim": dim,
        "files": files,
    }
    text = json.dumps(manifest, indent=2).encode()
    fileio.write_atomically(manifest_path, lambda file: file.write(text))
    _fsync_directory(directory)
    return manifest_path


def _load_manifest(path: str) -> dict:
    try:
        with open(path, "rb") as file:
            manifest = json.loads(file.read())
        if manifest.get("format") != _FORMAT:
            raise ShardError(f"{path}: not a smine_jax shard manifest")
        for key in ("shard", "num_shards", "num_rows", "dim"):
            if not isinstance(manifest.get(key), int):
                raise ShardError(f"{path}: manifest field {key!r} missing or not an integer")
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != set(_ARRAYS) or not all(
                isinstance(entry, dict) and {"file", "bytes", "crc32"} <= set(entry)
                for entry in files.values()):
            raise ShardError(
                f"{path}: manifest must list the files {list(_ARRAYS)} with file, bytes, crc32")
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise ShardError(f"{path}: unreadable shard manifest ({error})") from error
    return manifest


def _open_shard_arrays(directory: str, manifest_path: str, manifest: dict,
                       verify_checksums: bool) -> dict[str, np.ndarray]:
    """Memory-maps the three arrays of one shard after checking size, checksum, dtype, shape."""
    num_rows, dim = manifest["num_rows"], manifest["dim"]
    expected_shapes = {"embeddings": (num_rows, dim), "labels": (num_rows,), "ids": (num_rows,)}
    arrays = {}
    for name in _ARRAYS:
        entry = manifest["files"][name]
        path = os.path.join(directory, os.path.basename(entry["file"]))
        if not os.path.isfile(path):
            raise ShardError(f"{path}: missing file of shard {manifest_path}")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise ShardError(
                f"{path}: truncated or modified file: {size} bytes, the manifest "
                f"{manifest_path} says {entry['bytes']}")
        if verify_checksums and _file_crc32(path) != entry["crc32"]:
            raise ShardError(f"{path}: corrupted file (CRC32 differs from {manifest_path})")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise ShardError(f"{path}: unreadable .npy file ({error})") from error
        if array.dtype != _DTYPES[name] or array.shape != expected_shapes[name]:
            raise ShardError(
                f"{path}: holds {array.dtype} {array.shape}, the manifest {manifest_path} "
                f"says {np.dtype(_DTYPES[name]).name} {expected_shapes[name]}")
        arrays[name] = array
    return arrays


def wait_for_shards(directory, num_shards: int, *, timeout: float, poll: float = 0.2) -> None:
    """Returns once every shard 0..num_shards-1 of the dump has its manifest in ``directory``.

    Several processes each write their own shard into a shared workdir; one that cannot see the
    others' shards after ``timeout`` seconds is not sharing that folder with them.

    Args:
      directory: str or path-like, the dump directory.
      num_shards: shards of the complete dump, an int >= 1.
      timeout: seconds to wait at most (float).
      poll: seconds between looks (float, default 0.2).

    Returns:
      None, once all manifests exist.

    Raises:
      ValueError: ``num_shards`` not an integer >= 1.
      ShardError: after ``timeout`` seconds, naming the first missing manifest's path.
    """
    _check_shard_index(0, num_shards)
    directory = os.fspath(directory)
    expected = [os.path.join(directory, _shard_stem(shard, num_shards) + _MANIFEST_SUFFIX)
                for shard in range(num_shards)]
    deadline = time.monotonic() + max(float(timeout), 0.0)
    while True:
        missing = [path for path in expected if not os.path.exists(path)]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise ShardError(
                f"{missing[0]}: this shard of the embedding dump did not appear within "
                f"{float(timeout):g} s ({len(missing)} of {num_shards} missing); every process "
                "of a run must see one shared workdir (NFS, GCS FUSE, ...): give all of them "
                "the same --workdir on a filesystem they share")
        time.sleep(poll)


def read_shards(directory, *, verify_checksums: bool = True):
    """Loads a complete embedding dump written by ``write_shard``, rows sorted by sample id.

    The index's input each epoch: all processes' shards, checked and merged. Refuses a dump that
    cannot be trusted: a shard of 0..num_shards-1 missing or present twice, shards disagreeing
    on num_shards or on the embedding dimension, a file truncated or corrupted, or a sample id
    repeated. Half-written temporary files of a killed writer are ignored. Arrays are
    memory-mapped and copied once, into the sorted output. Host-side I/O.

    Args:
      directory: str or path-like, the dump directory.
      verify_checksums: check every file's CRC32 against its manifest (default True; False reads
        faster and still checks sizes, dtypes and shapes).

    Returns:
      (embeddings, labels, ids): host numpy arrays embeddings f32[N, D], labels i32[N] and ids
      i64[N], N the total rows of all shards, sorted by ascending id.

    Raises:
      ShardError: (a ValueError) naming the offending path: no such directory, no manifest in
        it, an unreadable manifest, or any of the inconsistencies above.

    Example:
      >>> import tempfile, numpy as np
      >>> from smine_jax import index
      >>> workdir = tempfile.TemporaryDirectory()
      >>> directory = workdir.name
      >>> embeddings = np.eye(4, 3, dtype=np.float32)
      >>> for shard, rows in enumerate([[2, 3], [0, 1]]):
      ...     _ = index.write_shard(directory, embeddings[rows], np.array([0, 1]),
      ...                           np.array(rows), shard=shard, num_shards=2)
      >>> embeddings, labels, ids = index.read_shards(directory)
      >>> embeddings.shape, labels.dtype, ids.tolist()
      ((4, 3), dtype('int32'), [0, 1, 2, 3])
      >>> workdir.cleanup()
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ShardError(f"{directory}: no such shard directory")
    manifest_paths = sorted(
        os.path.join(directory, name) for name in os.listdir(directory)
        if name.endswith(_MANIFEST_SUFFIX) and not name.startswith("."))
    if not manifest_paths:
        raise ShardError(f"{directory}: no shard manifests (*{_MANIFEST_SUFFIX}) found")

    manifests = {path: _load_manifest(path) for path in manifest_paths}
    first_path = manifest_paths[0]
    num_shards, dim = manifests[first_path]["num_shards"], manifests[first_path]["dim"]
    path_of_shard: dict[int, str] = {}
    for path, manifest in manifests.items():
        if manifest["num_shards"] != num_shards:
            raise ShardError(
                f"{path}: num_shards = {manifest['num_shards']} disagrees with "
                f"{first_path} (num_shards = {num_shards})")
        if manifest["dim"] != dim:
            raise ShardError(
                f"{path}: embedding dimension {manifest['dim']} differs from {first_path} "
                f"(dimension {dim})")
        shard = manifest["shard"]
        if not 0 <= shard < num_shards:
            raise ShardError(f"{path}: shard index {shard} outside 0..{num_shards - 1}")
        if shard in path_of_shard:
            raise ShardError(
                f"{path}: shard {shard} appears twice (also {path_of_shard[shard]})")
        path_of_shard[shard] = path
    missing = sorted(set(range(num_shards)) - set(path_of_shard))
    if missing:
        raise ShardError(
            f"{directory}: incomplete dump: {len(missing)} of {num_shards} shards missing "
            f"(shard indices {missing[:10]}{' ...' if len(missing) > 10 else ''})")

    shards = [
        _open_shard_arrays(directory, path_of_shard[index], manifests[path_of_shard[index]],
                           verify_checksums)
        for index in range(num_shards)
    ]
    all_ids = np.concatenate([shard["ids"] for shard in shards])
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]
    repeated = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if repeated.size:
        offsets = np.cumsum([0] + [shard["ids"].shape[0] for shard in shards])
        rows = order[repeated[0]:repeated[0] + 2]
        holders = sorted({path_of_shard[int(np.searchsorted(offsets, row, "right") - 1)]
                          for row in rows})
        raise ShardError(
            f"{directory}: {repeated.size} sample ids repeat (first: id "
            f"{int(sorted_ids[repeated[0]])} in {', '.join(holders)})")

    # One copy: scatter each memory-mapped shard straight into its sorted rows.
    destination = np.empty_like(order)
    destination[order] = np.arange(order.shape[0])
    embeddings = np.empty((order.shape[0], dim), np.float32)
    labels = np.empty(order.shape[0], np.int32)
    start = 0
    for shard in shards:
        rows = destination[start:start + shard["ids"].shape[0]]
        embeddings[rows] = shard["embeddings"]
        labels[rows] = shard["labels"]
        start += rows.shape[0]
    return embeddings, labels, sorted_ids


# --------------------------------------------------------------------------------------------
# Neighbour search
# --------------------------------------------------------------------------------------------


@jax.jit
def _candidate_sq_dists(database: jax.Array, chunked_query_ids: jax.Array,
                        chunked_candidates: jax.Array) -> jax.Array:
    """Exact float32 ‖q − x‖² (difference form) of every candidate, chunk by chunk."""
    num_rows = database.shape[0]

    def one_chunk(chunk):
        query_ids, candidates = chunk
        rows = database[jnp.clip(candidates, 0, num_rows - 1)]
        differences = database[query_ids][:, None, :] - rows
        return jnp.sum(differences * differences, axis=-1)

    sq_dists = jax.lax.map(one_chunk, (chunked_query_ids, chunked_candidates))
    return sq_dists.reshape(-1, sq_dists.shape[-1])


def _k_best_by_distance_then_id(query_ids: np.ndarray, candidates: np.ndarray,
                                sq_dists: np.ndarray, k: int):
    """Per row, the k smallest (d², id) pairs in order, self and empty slots excluded.

    One sort of packed 64-bit keys bits(d²) << 32 | id: a float32 d² >= 0 has bit patterns
    that order like its values, so the keys order by distance, then by lower id (several times
    faster than a two-key sort). Excluded slots get the largest key and come back as id -1.
    """
    num_queries = query_ids.shape[0]
    ids = np.empty((num_queries, k), np.int32)
    best_sq_dists = np.empty((num_queries, k), np.float32)
    for start in range(0, num_queries, _SORT_BLOCK_ROWS):
        block = slice(start, start + _SORT_BLOCK_ROWS)
        block_candidates = candidates[block]
        keys = sq_dists[block].view(np.uint32).astype(np.uint64) << np.uint64(32)
        keys |= block_candidates.astype(np.uint32)
        excluded = (block_candidates < 0) | (block_candidates == query_ids[block, None])
        keys[excluded] = _EXCLUDED_KEY
        keys.sort(axis=1)
        keys = keys[:, :k]
        empty = keys == _EXCLUDED_KEY
        block_ids = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
        block_ids[empty] = _NO_ROW
        block_sq_dists = (keys >> np.uint64(32)).astype(np.uint32).view(np.float32)
        block_sq_dists[empty] = np.inf
        ids[block], best_sq_dists[block] = block_ids, block_sq_dists
    return ids, best_sq_dists


def _rerank(device_database: jax.Array, query_ids: np.ndarray, candidates, k: int):
    """Shared last step of both backends: exact distances, self dropped, (d², id) order.

    `candidates` is [Q, C] int row ids, `_NO_ROW` where a slot is empty; it may contain the
    query itself (dropped) and more than k rows (the k best are kept). Returns host arrays and
    the number of queries left with fewer than k neighbours (their tail slots hold id -1).
    """
    num_queries = query_ids.shape[0]
    candidates = np.asarray(candidates, np.int32)
    if candidates.shape[1] < k:  # ScaNN returns as many columns as its longest result list.
        pad = np.full((num_queries, k - candidates.shape[1]), _NO_ROW, np.int32)
        candidates = np.concatenate([candidates, pad], axis=1)
    num_candidates = candidates.shape[1]
    dim = device_database.shape[1]
    chunk = max(1, min(_RERANK_MAX_CHUNK, _RERANK_CHUNK_ELEMENTS // (num_candidates * dim)))
    num_chunks = -(-num_queries // chunk)
    padding = num_chunks * chunk - num_queries
    padded_queries = np.pad(query_ids, (0, padding))
    padded_candidates = np.pad(candidates, ((0, padding), (0, 0)))
    sq_dists = _candidate_sq_dists(
        device_database, padded_queries.reshape(num_chunks, chunk),
        padded_candidates.reshape(num_chunks, chunk, num_candidates))
    sq_dists = np.asarray(sq_dists)[:num_queries]
    ids, sq_dists = _k_best_by_distance_then_id(query_ids, candidates, sq_dists, k)
    return ids, sq_dists, int((ids[:, -1] == _NO_ROW).sum())


@dataclasses.dataclass(frozen=True)
class ScannConfig:
    """Resolved ScaNN settings (defaults derived from N and k; see `scann_config`)."""

    mode: str
    num_threads: int
    batch_size: int
    num_leaves: int | None = None
    num_leaves_to_search: int | None = None
    reorder_k: int | None = None
    training_sample_size: int | None = None
    dims_per_block: int | None = None


_TREE_AH_OPTIONS = ("num_leaves", "num_leaves_to_search", "reorder_k", "training_sample_size",
                    "dims_per_block")
_SCANN_OPTIONS = ("mode", "num_threads", "batch_size") + _TREE_AH_OPTIONS
_EXACT_OPTIONS = ("chunk_size",)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _option(options: dict, name: str, default) -> int:
    """The positive integer option `name`, or `default` when not given."""
    return validation.positive_int(options.get(name, default), name)


def scann_config(num_rows: int, k: int, **options) -> ScannConfig:
    """Resolves ScaNN options against defaults derived from N and k.

    Options: ``mode`` ("brute_force" default, or "tree_ah"); ``num_threads`` (default: the
    cores this process may use); ``batch_size`` (queries per parallel batch, 256). tree_ah only:
    ``num_leaves`` (≈ √N), ``num_leaves_to_search`` (20 % of the leaves, and at least enough
    leaves to hold ~4 (k + 1) rows on average: max(⌈L / 5⌉, ⌈4 (k + 1) L / N⌉), at most L),
    ``reorder_k`` (AH candidates re-scored exactly, 4 (k + 1)), ``training_sample_size``
    (min(N, 100 000)), ``dims_per_block`` (dimensions per AH sub-space, 1). A query whose
    searched leaves hold fewer than k + 1 rows is searched again in every leaf.

    The defaults come from recall@128 measurements on clustered unit vectors (64-d, classes of
    50, N = 20k and 100k, 2 cores): AH with 1 dimension per block re-ranked 4 (k + 1) deep
    costs about what 2 dimensions per block cost and is more accurate (N = 100k, 40 % of the
    leaves: recall 0.985 against 0.92); recall then depends mostly on the fraction of leaves
    searched (0.86 at 10 %, 0.94 at 20 %, 0.985 at 40 %), the speed/recall knob: the AH cost
    is ~3 ns per scored row, leaves searched × N / L rows per query. 20 % keeps N = 1M within
    ~6 minutes on 2 cores (benchmarks/mining_bench.py).
    Unknown options, or tree_ah options with mode="brute_force", raise ValueError.
    """
    unknown = sorted(set(options) - set(_SCANN_OPTIONS))
    if unknown:
        raise ValueError(f"backend='scann': unknown options {unknown}; known: {_SCANN_OPTIONS}")
    mode = options.get("mode", "brute_force")
    if mode not in SCANN_MODES:
        raise ValueError(f"mode: expected one of {SCANN_MODES}, got {mode!r}")
    num_threads = _option(options, "num_threads", _available_cores())
    batch_size = _option(options, "batch_size", 256)
    if mode == "brute_force":
        tree_options = sorted(set(options) & set(_TREE_AH_OPTIONS))
        if tree_options:
            raise ValueError(f"options {tree_options} only apply to mode='tree_ah'")
        return ScannConfig(mode, num_threads, batch_size)
    num_leaves = _option(options, "num_leaves", max(1, round(math.sqrt(num_rows))))
    if num_leaves > num_rows:
        raise ValueError(f"num_leaves: expected at most N = {num_rows}, got {num_leaves}")
    # Search 20 % of the leaves, and leaves holding ~4 (k + 1) rows on average at least.
    default_to_search = min(num_leaves, max(-(-num_leaves // 5),
                                            -(-4 * (k + 1) * num_leaves // num_rows)))
    num_leaves_to_search = _option(options, "num_leaves_to_search", default_to_search)
    if num_leaves_to_search > num_leaves:
        raise ValueError(
            f"num_leaves_to_search: expected at most num_leaves = {num_leaves}, "
            f"got {num_leaves_to_search}")
    reorder_k = _option(options, "reorder_k", 4 * (k + 1))
    if reorder_k < k + 1:
        raise ValueError(f"reorder_k: expected at least k + 1 = {k + 1}, got {reorder_k}")
    training_sample_size = _option(options, "training_sample_size", min(num_rows, 100_000))
    dims_per_block = _option(options, "dims_per_block", 1)
    return ScannConfig(mode, num_threads, batch_size, num_leaves, num_leaves_to_search,
                       min(reorder_k, num_rows), min(training_sample_size, num_rows),
                       dims_per_block)


def _import_scann():
    """Imports ScaNN on first use; any failure becomes an ImportError that says how to fix it."""
    try:
        import scann  # lazy: optional, heavy, and fragile next to tensorflow

        return scann.scann_ops_pybind
    except Exception as error:  # ScaNN raises assorted errors when its native library breaks
        raise ImportError(f"{_SCANN_INSTALL_HINT} (import failed: {error!r})") from error


def _build_scann(database: np.ndarray, k: int, config: ScannConfig):
    """Builds a ScaNN searcher; returns `candidates(query_ids) -> [Q, C] int32` (k + 1 wanted)."""
    scann_ops_pybind = _import_scann()
    builder = scann_ops_pybind.builder(database, k + 1, "squared_l2")
    builder.set_n_training_threads(config.num_threads)
    if config.mode == "brute_force":
        builder = builder.score_brute_force()
    else:
        builder = (
            builder.tree(num_leaves=config.num_leaves,
                         num_leaves_to_search=config.num_leaves_to_search,
                         training_sample_size=config.training_sample_size)
            .score_ah(config.dims_per_block)
            .reorder(config.reorder_k))
    try:
        searcher = builder.build()
    except Exception as error:
        raise RuntimeError(f"ScaNN could not build the index ({config}): {error}") from error
    searcher.set_num_threads(config.num_threads)

    def search(queries: np.ndarray, leaves_to_search: int | None = None) -> np.ndarray:
        ids, sq_dists = searcher.search_batched_parallel(
            queries, final_num_neighbors=k + 1, leaves_to_search=leaves_to_search,
            batch_size=config.batch_size)
        ids = ids.astype(np.int32)  # ScaNN returns uint32 row numbers < N <= 2**31
        ids[~np.isfinite(sq_dists)] = _NO_ROW  # short result lists are padded with NaN
        if ids.shape[1] < k + 1:  # as wide as the longest list found
            ids = np.pad(ids, ((0, 0), (0, k + 1 - ids.shape[1])), constant_values=_NO_ROW)
        return ids

    def candidates(query_ids: np.ndarray) -> np.ndarray:
        queries = database[query_ids]
        ids = search(queries)
        if config.mode == "tree_ah":
            # The leaves searched held fewer than k + 1 rows: search those queries in every leaf.
            short = np.flatnonzero((ids == _NO_ROW).any(axis=1))
            if short.size:
                ids[short] = search(queries[short], leaves_to_search=config.num_leaves)
        return ids

    return candidates


@dataclasses.dataclass(frozen=True, eq=False)
class NeighbourIndex:
    """A built neighbour index over the rows of `database`; `search` finds k OTHER rows each.

    Build once, search any subset of rows (e.g. each process its own anchors).
    """

    backend: str
    k: int
    database: np.ndarray
    config: ScannConfig | None
    _device_database: jax.Array
    _candidates: Callable[[np.ndarray], Any]

    def search(self, query_ids=None):
        """(ids i32[Q, k], sq_dists f32[Q, k]) host arrays for rows `query_ids` (default all)."""
        query_ids = validation.as_query_ids(query_ids, self.database.shape[0])
        if query_ids.shape[0] == 0:
            return np.zeros((0, self.k), np.int32), np.zeros((0, self.k), np.float32)
        ids, sq_dists, incomplete = _rerank(
            self._device_database, query_ids, self._candidates(query_ids), self.k)
        if incomplete:
            raise RuntimeError(
                f"backend {self.backend!r} returned fewer than k = {self.k} neighbours for "
                f"{incomplete} of {query_ids.shape[0]} queries ({self.config}); try "
                "mode='brute_force' or backend='exact'")
        return ids, sq_dists


def build_index(embeddings, k: int, *, backend: str = "exact", **options) -> NeighbourIndex:
    """Validates the inputs and builds a reusable ``NeighbourIndex`` of ``backend`` over the rows.

    ``neighbours`` is ``build_index(...).search(query_ids)``; build once to search several subsets
    of rows. Host-side.

    Args:
      embeddings: [N, D] real array (numpy or jax), N >= 2, every entry finite.
      k: neighbours per row, an int with 1 <= k <= N − 1.
      backend: "exact" (default) or "scann".
      **options: backend options. exact: ``chunk_size`` (queries per chunk, a positive int;
        default: a [chunk, N] distance block of ~128 MiB). scann: ``mode`` ("brute_force", the
        default, or "tree_ah"), ``num_threads`` (default: the cores this process may use),
        ``batch_size`` (queries per parallel batch, 256), and for "tree_ah" only ``num_leaves``
        (≈ √N), ``num_leaves_to_search``, ``reorder_k`` (>= k + 1), ``training_sample_size``,
        ``dims_per_block`` (defaults in ``scann_config``); each a positive int.

    Returns:
      ``NeighbourIndex``; its ``search(query_ids=None)`` returns (ids i32[Q, k], sq_dists
      f32[Q, k]) host arrays as ``neighbours`` describes.

    Raises:
      ValueError: naming the argument: ``embeddings`` not a non-empty 2-D real array or holding
        NaN/inf; ``k`` not an integer in [1, N − 1]; ``backend`` unknown; an unknown or
        out-of-range option.
      ImportError: ``backend="scann"`` and ScaNN cannot be imported.
      RuntimeError: ScaNN could not build its index.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    database = np.ascontiguousarray(validation.as_embeddings(embeddings))
    num_rows = database.shape[0]
    k = validation.check_k(k, num_rows)
    if backend == "exact":
        unknown = sorted(set(options) - set(_EXACT_OPTIONS))
        if unknown:
            raise ValueError(
                f"backend='exact': unknown options {unknown}; known: {_EXACT_OPTIONS}")
        chunk_size = options.get("chunk_size")
        if chunk_size is not None:
            chunk_size = validation.positive_int(chunk_size, "chunk_size")
        config = None
        candidates = functools.partial(_exact_candidates, database, k, chunk_size)
    else:
        config = scann_config(num_rows, k, **options)
        candidates = _build_scann(database, k, config)
    return NeighbourIndex(backend, k, database, config, jnp.asarray(database), candidates)


def _exact_candidates(database: np.ndarray, k: int, chunk_size: int | None,
                      query_ids: np.ndarray) -> jax.Array:
    ids, _ = knn.exact_neighbours(database, k, query_ids=query_ids, chunk_size=chunk_size)
    return ids


def neighbours(embeddings, k: int, *, backend: str = "exact", query_ids=None, **options):
    """For each query row, its k nearest OTHER rows by squared Euclidean distance (method.md §2).

    The per-epoch neighbour lists S_i that smart mining walks (``mining.sample_triplets``). A row
    is never its own neighbour (excluded by id, not by distance: datasets hold duplicates); ties
    are ordered by lower id. The distances of the returned ids are recomputed in float32 in the
    difference form ‖q − x‖², so both backends give bit-identical distances for equal lists.
    Host-side (inputs copied to the host, results are host numpy arrays); not for use inside
    ``jax.jit``.

    Args:
      embeddings: [N, D] real array (numpy or jax), N >= 2, every entry finite; searched as
        float32.
      k: neighbours per row, an int with 1 <= k <= N − 1.
      backend: "exact" (default: chunked matrix products on the device) or "scann" (ScaNN on the
        host; needs the optional ``scann`` package).
      query_ids: optional int[Q] row ids in [0, N) to search for (default None: all N rows, in
        order), e.g. one process's anchors; row i of the result belongs to ``query_ids[i]``.
      **options: backend options. exact: ``chunk_size`` (queries per chunk, a positive int;
        default: a [chunk, N] distance block of ~128 MiB). scann: ``mode`` ("brute_force", the
        default, or "tree_ah"), ``num_threads`` (default: the cores this process may use),
        ``batch_size`` (queries per parallel batch, 256), and for "tree_ah" only ``num_leaves``
        (≈ √N), ``num_leaves_to_search``, ``reorder_k`` (>= k + 1), ``training_sample_size``,
        ``dims_per_block`` (defaults in ``scann_config``); each a positive int.

    Returns:
      (ids, sq_dists): host numpy i32[Q, k] row ids in [0, N) and f32[Q, k] squared distances
      (Q = N without ``query_ids``); row i lists the rows other than its query, ascending by
      ‖q − x‖², ties by lower id.

    Raises:
      ValueError: naming the argument: ``embeddings`` not a non-empty 2-D real array or holding
        NaN/inf; ``k`` not an integer in [1, N − 1]; ``backend`` not "exact" or "scann";
        ``query_ids`` not 1-D integer or outside [0, N); an unknown option, a tree_ah option with
        mode "brute_force", or an option out of range.
      ImportError: ``backend="scann"`` and ScaNN cannot be imported (the message says how to fix
        it).
      RuntimeError: ScaNN could not build its index, or returned fewer than k neighbours for a
        query.

    Example:
      >>> import numpy as np
      >>> from smine_jax import index
      >>> embeddings = np.array([[0.0], [1.0], [3.0]], np.float32)
      >>> ids, sq_dists = index.neighbours(embeddings, k=2)
      >>> ids.tolist(), sq_dists.tolist()
      ([[1, 2], [0, 2], [1, 0]], [[1.0, 9.0], [1.0, 4.0], [4.0, 9.0]])
    """
    return build_index(embeddings, k, backend=backend, **options).search(query_ids)
