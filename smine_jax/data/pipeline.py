"""Batches from the image cache and on-device augmentation.

- `gather` / `device_batch`: a batch is a gather by sample id (mining's triplet lists are ids)
  from the memory-mapped uint8 cache on the host, then `jax.device_put`; `prefetch_batches`
  does that a few batches ahead in a background thread.
- `augment` (training) and `center_crop` (evaluation) run inside the jitted step on uint8
  [B, S, S, C]: a random crop to the crop size at an offset drawn per image (`lax.dynamic_slice`
  under `vmap`), an optional horizontal flip, and normalisation `(x / 255 - mean) / std`
  (method.md §5: resize to 256, random 227 crop, flip; test: centre crop). Deterministic for a key.
- `inference_batches`: the whole split in order, the last batch padded and masked, so every
  image is embedded exactly once (method.md §2 step 1; no drop_remainder).
- `m_per_class_batches`: batches of m samples from each of B/m classes, for the in-batch
  baselines (semi-hard, lifted structure, N-pairs).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smine_jax import validation
from smine_jax.data._util import positive_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Gathers.


def gather(images, ids) -> np.ndarray:
    """Host gather `images[ids]` for integer ids of any shape; duplicates allowed.

    One copy straight from the memory map in the order asked for (reading the distinct rows
    in sorted order first was 4-5 times slower once the cache is in the page cache).
    """
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids: expected integer sample ids, got dtype {ids.dtype}")
    if ids.size and not 0 <= ids.min() <= ids.max() < len(images):
        raise ValueError(f"ids: expected values in [0, {len(images)}), "
                         f"got [{ids.min()}, {ids.max()}]")
    rows = np.take(images, ids.reshape(-1).astype(np.intp, copy=False), axis=0)
    return np.asarray(rows).reshape(ids.shape + tuple(images.shape[1:]))


def device_batch(images, ids, *, sharding=None) -> jax.Array:
    """`gather(images, ids)` moved to the device (or laid out by `sharding`)."""
    return jax.device_put(gather(images, ids), sharding)


def prefetch_batches(images, id_batches: Iterable, *, size: int = 2,
                     sharding=None) -> Iterator[jax.Array]:
    """`device_batch(images, ids)` for each ids of `id_batches`, prepared `size` batches ahead.

    A background thread does the host gather and the transfer while the caller's jitted step
    runs, so the step waits for data only when the gather is slower than the step.
    """
    size = positive_int(size, "size")
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    pending: collections.deque = collections.deque()
    try:
        for ids in id_batches:
            pending.append(pool.submit(device_batch, images, ids, sharding=sharding))
            if len(pending) > size:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# Augmentation (pure, jit-compatible).


def _check_crop(images, crop_size: int) -> tuple[int, int, int, int]:
    """(crop_size, height, width, channels) after checking the crop fits the images."""
    shape = np.shape(images)
    if len(shape) != 4:
        raise ValueError(f"images: expected a 4-D array [B, H, W, C], got shape {shape}")
    crop_size = positive_int(crop_size, "crop_size")
    _, height, width, channels = shape
    if crop_size > min(height, width):
        raise ValueError(f"crop_size={crop_size}: larger than the images ({height}×{width})")
    return crop_size, height, width, channels


def _normalisation(mean, std, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per channel with x * scale + offset = (x / 255 - mean) / std."""
    mean_np = np.asarray(mean, np.float32).reshape(-1)
    std_np = np.asarray(std, np.float32).reshape(-1)
    for name, value in (("mean", mean_np), ("std", std_np)):
        if value.size not in (1, channels):
            raise ValueError(f"{name}: expected 1 or {channels} values (one per channel), "
                             f"got {value.size}")
    if not np.all(std_np > 0):
        raise ValueError(f"std: expected positive values, got {std_np.tolist()}")
    scale = np.broadcast_to(1.0 / (255.0 * std_np), (channels,))
    return scale, np.broadcast_to(-mean_np / std_np, (channels,))


def normalise(images, *, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype=jnp.float32) -> jax.Array:
    """uint8 [..., C] -> (x / 255 - mean) / std per channel, in `dtype` (math in float32).

    `mean` and `std` are in [0, 1] units, one value per channel or a single value for all.
    """
    scale, offset = _normalisation(mean, std, np.shape(images)[-1])
    return (jnp.asarray(images).astype(jnp.float32) * scale + offset).astype(dtype)


def random_crop_flip(key, images, *, crop_size: int, flip: bool = True) -> jax.Array:
    """Per image, a uniform random crop_size² window, mirrored left-right with probability ½.

    The dtype is kept (crop uint8 before normalising: a quarter of the bytes to move).
    """
    crop_size, height, width, channels = _check_crop(images, crop_size)
    crop_key, flip_key = jax.random.split(key)
    batch = images.shape[0]
    offsets = jax.random.randint(
        crop_key, (batch, 2), 0, jnp.array([height - crop_size + 1, width - crop_size + 1]))

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                     (crop_size, crop_size, channels))

    crops = jax.vmap(crop)(images, offsets)
    if flip:
        mirrored = jax.random.bernoulli(flip_key, 0.5, (batch,))
        crops = jnp.where(mirrored[:, None, None, None], crops[:, :, ::-1, :], crops)
    return crops


def augment(key, images, *, crop_size: int, flip: bool = True,
            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
            dtype=jnp.float32) -> jax.Array:
    """Training preprocessing of a uint8 [B, S, S, C] batch -> `dtype` [B, crop, crop, C].

    Random crop + optional horizontal flip + normalisation (method.md §5). Pure and jit-compatible;
    the same key and batch give the same output.
    """
    _normalisation(mean, std, np.shape(images)[-1])  # check before any work
    crops = random_crop_flip(key, jnp.asarray(images), crop_size=crop_size, flip=flip)
    return normalise(crops, mean=mean, std=std, dtype=dtype)


def center_crop(images, *, crop_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD, dtype=jnp.float32) -> jax.Array:
    """Evaluation preprocessing: the centre crop_size² window, normalised (method.md §5)."""
    crop_size, height, width, _ = _check_crop(images, crop_size)
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    crops = jnp.asarray(images)[:, top:top + crop_size, left:left + crop_size, :]
    return normalise(crops, mean=mean, std=std, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Whole-split inference.


class InferenceBatch(NamedTuple):
    """One batch of the inference pass: ids (-1 where padded), images (zeros where padded)."""

    ids: np.ndarray  # int32 [B]
    images: np.ndarray  # uint8 [B, S, S, C]
    mask: np.ndarray  # bool [B], True for real samples


def inference_batches(images, batch_size: int, *, shard_index: int = 0,
                      num_shards: int = 1) -> Iterator[InferenceBatch]:
    """Every sample of `images` exactly once, in id order, in batches of a fixed size.

    The last batch is padded (ids -1, zero images, mask False) so every batch has the same
    shape and nothing is dropped. With num_shards > 1, shard `shard_index` gets its contiguous
    block of ids (np.array_split), for one process of a multi-host run.
    """
    num_samples = len(images)
    batch_size = positive_int(batch_size, "batch_size")
    num_shards = positive_int(num_shards, "num_shards")
    if isinstance(shard_index, bool) or not 0 <= int(shard_index) < num_shards:
        raise ValueError(f"shard_index: expected 0 <= shard_index < {num_shards}, "
                         f"got {shard_index!r}")
    ids = np.array_split(np.arange(num_samples, dtype=np.int32), num_shards)[int(shard_index)]
    for start in range(0, len(ids), batch_size):
        real = ids[start:start + batch_size]
        padded = np.full(batch_size, -1, np.int32)
        padded[:len(real)] = real
        batch = np.zeros((batch_size,) + tuple(images.shape[1:]), np.uint8)
        batch[:len(real)] = gather(images, real)
        yield InferenceBatch(ids=padded, images=batch, mask=padded >= 0)


# ----------------------------------------------------------------------------------------------
# m-per-class sampling for the in-batch baselines.


def m_per_class_batches(labels, batch_size: int, m: int, *, seed,
                        num_batches: int | None = None) -> np.ndarray:
    """int32 [num_batches, batch_size] sample ids: m samples from each of batch_size / m classes.

    Row layout: `batch.reshape(batch_size // m, m)` has one class per row. The classes of a
    batch are distinct, drawn uniformly among the eligible classes. A class with at least m
    samples gives m distinct samples; a class with 2..m-1 samples gives all of them, then
    fills up to m with repeats drawn from them (as pytorch-metric-learning's MPerClassSampler);
    a class with a single sample is never drawn (it has no positive pair). `num_batches`
    defaults to N // batch_size (about one pass over the data). `seed` is an int or a
    np.random.Generator.
    """
    labels = validation.as_labels(labels)
    batch_size = positive_int(batch_size, "batch_size")
    m = positive_int(m, "m")
    if m < 2:
        raise ValueError(f"m: expected at least 2 samples per class (positive pairs), got {m}")
    if batch_size % m:
        raise ValueError(f"batch_size={batch_size}: expected a multiple of m={m}")
    classes_per_batch = batch_size // m
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(sizes >= 2)
    if len(eligible) < classes_per_batch:
        raise ValueError(
            f"labels: {len(eligible)} classes have at least 2 samples, but batch_size / m = "
            f"{classes_per_batch} distinct classes are needed per batch")
    if num_batches is None:
        num_batches = max(1, len(labels) // batch_size)
    num_batches = positive_int(num_batches, "num_batches")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(sizes)[:-1])
    batches = np.empty((num_batches, classes_per_batch, m), np.int32)
    for b in range(num_batches):
        for row, c in enumerate(rng.choice(eligible, classes_per_batch, replace=False)):
            pool = members[c]
            if len(pool) >= m:
                batches[b, row] = rng.choice(pool, m, replace=False)
            else:
                extra = rng.choice(pool, m - len(pool), replace=True)
                batches[b, row] = rng.permutation(np.concatenate([pool, extra]))
    return batches.reshape(num_batches, batch_size)
