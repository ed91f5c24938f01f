"""The decoded image cache: each dataset split decoded once into a memory-mapped uint8 file.

The cache of a `Dataset` record is an `.npy` file holding uint8 [N, S, S, C] (row i = sample i,
resized to S × S as `Dataset.read_image` does), next to a small JSON sidecar with its key. The
key hashes the source, path, split, size, channels and the records' content fingerprint (file
paths, sizes and mtimes, or the tfds version and record counts), so a changed dataset or
setting gets a new file and an unchanged one is reused across runs.

A build writes to a unique temporary name in the cache folder and `os.replace`s it only once
complete, then writes the sidecar the same way; a file is trusted only with a sidecar whose
key matches. A killed or failing build therefore never leaves a half cache that is later read
(the next build deletes a killed build's temporary), and concurrent builds of the same key
both end with a complete file. Decoding runs in a pool
(threads by default: PIL releases the GIL while decoding and resizing, and threads need no
pickling; spawned processes are the alternative), with a tqdm progress bar. An unreadable or
truncated image stops the build with the file's path (`ImageReadError`).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from smine_jax import fileio
from smine_jax.data._util import check_channels, positive_int, sha256_json
from smine_jax.data.sources import Dataset

CACHE_FORMAT = 1
_HOST = socket.gethostname().replace("-", "_")
_CHUNK = 32  # images per task: amortises scheduling, keeps the progress bar lively


def cache_key(dataset: Dataset, *, image_size: int, channels: int) -> str:
    """sha256 over what determines the cache's content (see the module docstring)."""
    return sha256_json({
        "format": CACHE_FORMAT, "name": dataset.name, "source": dataset.source,
        "root": dataset.root, "split": dataset.split, "image_size": int(image_size),
        "channels": int(channels), "fingerprint": dataset.fingerprint(),
        "resize": "squash-bilinear"})


def cache_path(dataset: Dataset, cache_dir, *, image_size: int, channels: int,
               key: str | None = None) -> Path:
    """Where the cache of `dataset` at this size lives (the sidecar adds `.json`)."""
    key = key or cache_key(dataset, image_size=image_size, channels=channels)
    name = f"{dataset.name}-{dataset.split}-{image_size}px-{channels}ch-{key[:16]}.npy"
    return Path(cache_dir).expanduser() / name


def cached_images(dataset: Dataset, cache_dir, *, image_size: int = 256, channels: int = 3,
                  num_workers: int | None = None, executor: str = "thread",
                  progress: bool = True) -> np.ndarray:
    """The read-only memory-mapped uint8 [N, image_size, image_size, channels] of `dataset`.

    Reuses a complete cache with the same key, else decodes every image once (see module
    docstring). `executor` is "thread" or "process"; `num_workers` defaults to the CPU count.
    """
    image_size = positive_int(image_size, "image_size")
    channels = check_channels(channels)
    if executor not in ("thread", "process"):
        raise ValueError(f"executor: expected 'thread' or 'process', got {executor!r}")
    if len(dataset) == 0:
        raise ValueError(f"dataset: {dataset.name} split {dataset.split!r} has no images")
    key = cache_key(dataset, image_size=image_size, channels=channels)
    path = cache_path(dataset, cache_dir, image_size=image_size, channels=channels, key=key)
    shape = (len(dataset), image_size, image_size, channels)
    images = _open_trusted(path, key, shape)
    if images is not None:
        return images
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path)
    partial = path.with_name(f"{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        _decode_into(out, dataset, image_size, channels, num_workers, executor, progress)
        out.flush()
        del out
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    fileio.write_json_atomically(_sidecar(path), {
        "key": key, "shape": list(shape), "name": dataset.name, "split": dataset.split,
        "source": dataset.source, "root": dataset.root})
    images = _open_trusted(path, key, shape)
    if images is None:
        raise RuntimeError(f"{path}: the cache just written cannot be read back")
    return images


def _remove_dead_temporaries(path: Path) -> None:
    """Deletes temporaries of `path` left by killed builds of this host (their pid is gone)."""
    for partial in path.parent.glob(f"{path.name}.tmp-{_HOST}-*"):
        pid = partial.name[len(f"{path.name}.tmp-{_HOST}-"):].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            partial.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass  # not our naming, or a live process of another user


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _open_trusted(path: Path, key: str, shape) -> np.ndarray | None:
    """The cache at `path` if its sidecar carries `key` and its array the expected shape."""
    try:
        with open(_sidecar(path)) as f:
            meta = json.load(f)
        if meta.get("key") != key:
            return None
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if images.shape != tuple(shape) or images.dtype != np.uint8:
        return None
    return images


def _chunks(n: int):
    return [range(start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK)]


def _decode_chunk(dataset: Dataset, ids: range, size: int, channels: int) -> np.ndarray:
    return np.stack([dataset.read_image(i, size=size, channels=channels) for i in ids])


# A process worker keeps its dataset record here (sent once, by the pool's initializer).
_worker_dataset: Dataset | None = None


def _init_worker(dataset: Dataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset


def _decode_chunk_in_worker(ids: range, size: int, channels: int) -> np.ndarray:
    return _decode_chunk(_worker_dataset, ids, size, channels)


def _decode_into(out, dataset, size, channels, num_workers, executor, progress) -> None:
    """Fills `out` row by row from a pool of workers; the first failure cancels the rest."""
    import functools
    import multiprocessing

    from tqdm.auto import tqdm

    workers = num_workers or os.cpu_count() or 1
    if executor == "thread":
        pool = ThreadPoolExecutor(workers)
        decode = functools.partial(_decode_chunk, dataset)
    else:
        # spawn, not fork: the parent may run JAX threads, which a fork would copy half-way.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(dataset,))
        decode = _decode_chunk_in_worker
    bar = tqdm(total=len(dataset), disable=not progress, unit="img",
               desc=f"caching {dataset.name} {dataset.split} at {size}px")
    with pool, bar:
        pending = {pool.submit(decode, ids, size, channels): ids for ids in _chunks(len(dataset))}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                ids = pending.pop(future)
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                out[ids.start:ids.stop] = future.result()
                bar.update(len(ids))
