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
from typing import NamedTuple

import numpy as np

from smine_jax import fileio
from smine_jax.data._util import check_channels, positive_int, sha256_json
from smine_jax.data.sources import Dataset, ImageReadError

CACHE_FORMAT = 1
_HOST = socket.gethostname().replace("-", "_")
_CHUNK = 32  # images per task: amortises scheduling, keeps the progress bar lively


def cache_key(dataset: Dataset, *, image_size: int, channels: int) -> str:
    """sha256 hex digest over what determines a cache's content; a changed input gets a new file.

    Hashes the format version, name, source, root, split, size, channels, resize method and the
    records' content fingerprint (file paths, sizes and mtimes, or the tfds version and counts).

    Args:
      dataset: the ``Dataset`` record.
      image_size: S of the cache, a positive int.
      channels: 1 or 3.

    Returns:
      str, 64 hex characters.
    """
    return sha256_json({
        "format": CACHE_FORMAT, "name": dataset.name, "source": dataset.source,
        "root": dataset.root, "split": dataset.split, "image_size": int(image_size),
        "channels": int(channels), "fingerprint": dataset.fingerprint(),
        "resize": "squash-bilinear"})


def cache_path(dataset: Dataset, cache_dir, *, image_size: int, channels: int,
               key: str | None = None) -> Path:
    """Where the cache of ``dataset`` at this size lives (the JSON sidecar adds ``.json``).

    Args:
      dataset: the ``Dataset`` record.
      cache_dir: str or path-like folder of the caches (``~`` expanded).
      image_size: S of the cache, a positive int.
      channels: 1 or 3.
      key: the ``cache_key`` if already computed (default None: computed here).

    Returns:
      ``pathlib.Path`` ``<cache_dir>/<name>-<split>-<S>px-<C>ch-<key[:16]>.npy``.
    """
    key = key or cache_key(dataset, image_size=image_size, channels=channels)
    name = f"{dataset.name}-{dataset.split}-{image_size}px-{channels}ch-{key[:16]}.npy"
    return Path(cache_dir).expanduser() / name


class CachedImages(NamedTuple):
    """A cache and the images it could not decode (``build_cache``).

    Attributes:
      images: read-only memory-mapped uint8[N, S, S, C], row i = sample i.
      unreadable: {sample id: reason} of the images that did not decode (their rows are 0).
    """

    images: np.ndarray
    unreadable: dict[int, str]


def cached_images(dataset: Dataset, cache_dir, *, image_size: int = 256, channels: int = 3,
                  num_workers: int | None = None, executor: str = "thread",
                  progress: bool = True) -> np.ndarray:
    """The read-only memory-mapped uint8[N, image_size, image_size, channels] of ``dataset``.

    Reuses a complete cache with the same key, else decodes every image once into a temporary
    file that is renamed when complete (see the module docstring).

    Args:
      dataset: the ``Dataset`` record to decode (one split, N >= 1 images).
      cache_dir: str or path-like folder of the cache files (created if missing).
      image_size: S, the side every image is squashed to, a positive int (default 256).
      channels: 3 (RGB; default) or 1 (luminance).
      num_workers: decoding workers, a positive int (default None: the CPU count).
      executor: "thread" (default; PIL releases the GIL) or "process" (spawned processes).
      progress: show a progress bar (default True).

    Returns:
      numpy memmap uint8[N, S, S, C], read-only, row i = sample i.

    Raises:
      ValueError: ``image_size`` not a positive integer, ``channels`` not 1 or 3, ``executor``
        unknown, or ``dataset`` empty.
      ImageReadError: an image does not decode (naming its file); ``build_cache`` can skip them.
    """
    return build_cache(dataset, cache_dir, image_size=image_size, channels=channels,
                       num_workers=num_workers, executor=executor, progress=progress).images


def build_cache(dataset: Dataset, cache_dir, *, image_size: int = 256, channels: int = 3,
                num_workers: int | None = None, executor: str = "thread",
                progress: bool = True, skip_unreadable: bool = False) -> CachedImages:
    """``cached_images`` with the choice to skip unreadable images; returns them with the cache.

    With ``skip_unreadable``, an image that does not decode leaves a row of zeros and is listed
    (with the reason) in the result and in the cache's sidecar, so a later run finds the same
    list without decoding; without it, the first one raises ImageReadError (also when the cache
    lists some).

    Args:
      dataset: the ``Dataset`` record to decode (one split, N >= 1 images).
      cache_dir: str or path-like folder of the cache files (created if missing).
      image_size: S, the side every image is squashed to, a positive int (default 256).
      channels: 3 (RGB; default) or 1 (luminance).
      num_workers: decoding workers, a positive int (default None: the CPU count).
      executor: "thread" (default; PIL releases the GIL) or "process" (spawned processes).
      progress: show a progress bar (default True).
      skip_unreadable: leave undecodable images as zero rows instead of raising (default False).

    Returns:
      ``CachedImages``: images (read-only memmap uint8[N, S, S, C]) and unreadable
      ({sample id: reason}, empty when every image decoded).

    Raises:
      ValueError: ``image_size`` not a positive integer, ``channels`` not 1 or 3, ``executor``
        unknown, or ``dataset`` empty.
      ImageReadError: an image does not decode and ``skip_unreadable`` is False.
      RuntimeError: the cache just written cannot be read back.
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
    trusted = _open_trusted(path, key, shape)
    if trusted is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(path)
        partial = path.with_name(f"{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            unreadable = _decode_into(out, dataset, image_size, channels, num_workers, executor,
                                      progress, skip_unreadable)
            out.flush()
            del out
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        fileio.write_json_atomically(_sidecar(path), {
            "key": key, "shape": list(shape), "name": dataset.name, "split": dataset.split,
            "source": dataset.source, "root": dataset.root,
            "unreadable": {str(i): reason for i, reason in sorted(unreadable.items())}})
        trusted = _open_trusted(path, key, shape)
        if trusted is None:
            raise RuntimeError(f"{path}: the cache just written cannot be read back")
    images, unreadable = trusted
    if unreadable and not skip_unreadable:
        first = min(unreadable)
        raise ImageReadError(f"{unreadable[first]} ({len(unreadable)} unreadable image(s) in "
                             "all; --config.data.skip_unreadable=True leaves them out)")
    return CachedImages(images, unreadable)


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


def _open_trusted(path: Path, key: str, shape) -> tuple[np.ndarray, dict[int, str]] | None:
    """(the cache at `path`, its unreadable images) if its sidecar carries `key` and its array
    the expected shape."""
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
    return images, {int(i): reason for i, reason in (meta.get("unreadable") or {}).items()}


def _chunks(n: int):
    return [range(start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK)]


def _decode_chunk(dataset: Dataset, ids: range, size: int, channels: int,
                  skip: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """The chunk's images and, with `skip`, the ones that do not decode (zeros, with the
    reason); without it the first failure raises."""
    rows, failed = [], {}
    for i in ids:
        try:
            rows.append(dataset.read_image(i, size=size, channels=channels))
        except ImageReadError as error:
            if not skip:
                raise
            failed[i] = str(error)
            rows.append(np.zeros((size, size, channels), np.uint8))
    return np.stack(rows), failed


# A process worker keeps its dataset record here (sent once, by the pool's initializer).
_worker_dataset: Dataset | None = None


def _init_worker(dataset: Dataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset


def _decode_chunk_in_worker(ids: range, size: int, channels: int, skip: bool):
    return _decode_chunk(_worker_dataset, ids, size, channels, skip)


def _decode_into(out, dataset, size, channels, num_workers, executor, progress,
                 skip: bool = False) -> dict[int, str]:
    """Fills `out` row by row from a pool of workers; the first failure cancels the rest
    (with `skip`, unreadable images are zero rows instead: returns them with the reasons)."""
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
    unreadable: dict[int, str] = {}
    with pool, bar:
        pending = {pool.submit(decode, ids, size, channels, skip): ids
                   for ids in _chunks(len(dataset))}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                ids = pending.pop(future)
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                out[ids.start:ids.stop], failed = future.result()
                unreadable.update(failed)
                bar.update(len(ids))
    return unreadable
