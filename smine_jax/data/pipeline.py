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
    """Host gather ``images[ids]`` for integer ids of any shape: a batch from the image cache.

    One copy straight from the memory map in the order asked for (reading the distinct rows in
    sorted order first was 4-5 times slower once the cache is in the page cache).

    Args:
      images: uint8[N, S, S, C] cache (a memory-mapped numpy array), or any array indexable by
        rows.
      ids: int array of any shape, sample ids in [0, N); duplicates allowed.

    Returns:
      numpy array of shape ``ids.shape + images.shape[1:]`` and the images' dtype.

    Raises:
      ValueError: ``ids`` not integer, or outside [0, N).
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
    """``gather(images, ids)`` moved to the device (or laid out by ``sharding``).

    Args:
      images: uint8[N, S, S, C] cache (memory-mapped numpy array).
      ids: int array of any shape, sample ids in [0, N).
      sharding: optional ``jax.sharding.Sharding`` of the batch (default None: the default
        device).

    Returns:
      jax.Array of shape ``ids.shape + images.shape[1:]``, the images' dtype (uint8).

    Raises:
      ValueError: ``ids`` not integer, or outside [0, N).
    """
    return jax.device_put(gather(images, ids), sharding)


def prefetch_batches(images, id_batches: Iterable, *, size: int = 2,
                     sharding=None) -> Iterator[jax.Array]:
    """``device_batch(images, ids)`` for each ids of ``id_batches``, made ``size`` batches ahead.

    A background thread does the host gather and the transfer while the caller's jitted step
    runs, so the step waits for data only when the gather is slower than the step.

    Args:
      images: uint8[N, S, S, C] cache (memory-mapped numpy array).
      id_batches: iterable of int id arrays (any shape each, values in [0, N)), consumed lazily.
      size: batches prepared ahead, a positive int (default 2).
      sharding: optional ``jax.sharding.Sharding`` of every batch (default None: default device).

    Returns:
      Iterator of jax.Array batches, ``ids.shape + images.shape[1:]`` each, in the order of
      ``id_batches``.

    Raises:
      ValueError: ``size`` not a positive integer; a batch's ids not integer or outside [0, N)
        (raised when that batch is reached).
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
    """uint8[..., C] -> (x / 255 − mean) / std per channel, in ``dtype``: the network's input scale.

    Pure and jit-compatible (math in float32).

    Args:
      images: uint8 (or any real) array [..., C], channels last.
      mean: per-channel mean in [0, 1] units, 1 or C values (default: ImageNet's).
      std: per-channel standard deviation in [0, 1] units, 1 or C positive values (default:
        ImageNet's).
      dtype: output dtype, e.g. ``jnp.float32`` (default) or ``jnp.bfloat16``; math in float32.

    Returns:
      jax.Array of the images' shape in ``dtype``.

    Raises:
      ValueError: ``mean`` or ``std`` with neither 1 nor C values; ``std`` not positive.
    """
    scale, offset = _normalisation(mean, std, np.shape(images)[-1])
    return (jnp.asarray(images).astype(jnp.float32) * scale + offset).astype(dtype)


def random_crop_flip(key, images, *, crop_size: int, flip: bool = True) -> jax.Array:
    """Per image, a uniform random crop_size² window, mirrored left-right with probability ½.

    The geometric part of the training augmentation (method.md §5). The dtype is kept (crop uint8
    before normalising: a quarter of the bytes to move). Pure and jit-compatible; the same key and
    batch give the same output.

    Args:
      key: PRNG key (may be traced).
      images: [B, H, W, C] array (any dtype; usually uint8).
      crop_size: side of the square crop, an int in [1, min(H, W)] (static).
      flip: mirror each image with probability ½ (static Python bool, default True).

    Returns:
      jax.Array [B, crop_size, crop_size, C] of the images' dtype.

    Raises:
      ValueError: ``images`` not 4-D; ``crop_size`` not a positive integer or larger than the
        images.
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
    """Training preprocessing of a uint8[B, S, S, C] batch -> ``dtype`` [B, crop, crop, C].

    Random crop + optional horizontal flip + normalisation (method.md §5), inside the jitted
    train step. Pure and jit-compatible; the same key and batch give the same output.

    Args:
      key: PRNG key (may be traced).
      images: uint8[B, S, S, C] batch (e.g. from ``device_batch``).
      crop_size: side of the random square crop, an int in [1, S] (static).
      flip: random horizontal flip (static Python bool, default True).
      mean: per-channel mean in [0, 1] units, 1 or C values (default: ImageNet's).
      std: per-channel standard deviation in [0, 1] units, 1 or C positive values (default:
        ImageNet's).
      dtype: output dtype, e.g. ``jnp.float32`` (default) or ``jnp.bfloat16``; math in float32.

    Returns:
      jax.Array [B, crop_size, crop_size, C] in ``dtype``.

    Raises:
      ValueError: ``images`` not 4-D; ``crop_size`` not a positive integer or larger than the
        images; ``mean`` or ``std`` with neither 1 nor C values; ``std`` not positive.

    Example:
      >>> import jax, numpy as np
      >>> from smine_jax import data
      >>> images = np.zeros((2, 8, 8, 3), np.uint8)
      >>> data.augment(jax.random.key(0), images, crop_size=6).shape
      (2, 6, 6, 3)
    """
    _normalisation(mean, std, np.shape(images)[-1])  # check before any work
    crops = random_crop_flip(key, jnp.asarray(images), crop_size=crop_size, flip=flip)
    return normalise(crops, mean=mean, std=std, dtype=dtype)


def center_crop(images, *, crop_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD, dtype=jnp.float32) -> jax.Array:
    """Evaluation preprocessing: the centre crop_size² window, normalised (method.md §5).

    The deterministic counterpart of ``augment``. Pure and jit-compatible.

    Args:
      images: uint8[B, H, W, C] batch.
      crop_size: side of the centred square crop, an int in [1, min(H, W)] (static); the window
        starts at ((H − crop_size) // 2, (W − crop_size) // 2).
      mean: per-channel mean in [0, 1] units, 1 or C values (default: ImageNet's).
      std: per-channel standard deviation in [0, 1] units, 1 or C positive values (default:
        ImageNet's).
      dtype: output dtype, e.g. ``jnp.float32`` (default) or ``jnp.bfloat16``; math in float32.

    Returns:
      jax.Array [B, crop_size, crop_size, C] in ``dtype``.

    Raises:
      ValueError: ``images`` not 4-D; ``crop_size`` not a positive integer or larger than the
        images; ``mean`` or ``std`` with neither 1 nor C values; ``std`` not positive.
    """
    crop_size, height, width, _ = _check_crop(images, crop_size)
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    crops = jnp.asarray(images)[:, top:top + crop_size, left:left + crop_size, :]
    return normalise(crops, mean=mean, std=std, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Whole-split inference.


class InferenceBatch(NamedTuple):
    """One batch of the inference pass (``inference_batches``), padded to a fixed size B.

    Attributes:
      ids: i32[B] sample ids, -1 where padded.
      images: uint8[B, S, S, C], zeros where padded.
      mask: bool[B], True for real samples.
    """

    ids: np.ndarray  # int32 [B]
    images: np.ndarray  # uint8 [B, S, S, C]
    mask: np.ndarray  # bool [B], True for real samples


def shard_ids(num_samples: int, shard_index: int, num_shards: int) -> np.ndarray:
    """i32 ids of shard `shard_index` of `num_samples` samples split into `num_shards`
    contiguous blocks (``np.array_split``): what one process of a multi-host run embeds, and
    whose neighbours it searches (the two must agree)."""
    return np.array_split(np.arange(num_samples, dtype=np.int32), num_shards)[int(shard_index)]


def inference_batches(images, batch_size: int, *, shard_index: int = 0,
                      num_shards: int = 1) -> Iterator[InferenceBatch]:
    """Every sample of ``images`` exactly once, in id order, in batches of a fixed size.

    The per-epoch embedding pass (method.md §2 step 1): the last batch is padded (ids -1, zero
    images, mask False) so every batch has the same shape (one compilation) and nothing is
    dropped. With num_shards > 1, shard ``shard_index`` gets its contiguous block of ids
    (``shard_ids``), for one process of a multi-host run. Host-side.

    Args:
      images: uint8[N, S, S, C] cache (memory-mapped numpy array).
      batch_size: B, a positive int.
      shard_index: this process's shard, an int in [0, num_shards) (default 0).
      num_shards: processes sharing the pass, a positive int (default 1).

    Returns:
      Iterator of ``InferenceBatch``: ids i32[B] (-1 where padded), images uint8[B, S, S, C]
      (zeros where padded), mask bool[B] (True for real samples).

    Raises:
      ValueError: ``batch_size`` or ``num_shards`` not a positive integer; ``shard_index``
        outside [0, num_shards).
    """
    num_samples = len(images)
    batch_size = positive_int(batch_size, "batch_size")
    num_shards = positive_int(num_shards, "num_shards")
    if isinstance(shard_index, bool) or not 0 <= int(shard_index) < num_shards:
        raise ValueError(f"shard_index: expected 0 <= shard_index < {num_shards}, "
                         f"got {shard_index!r}")
    ids = shard_ids(num_samples, shard_index, num_shards)
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
    """i32[num_batches, batch_size] sample ids: m samples from each of batch_size / m classes.

    The random class-balanced batches of the in-batch baselines (semi-hard, lifted structure,
    N-pairs, batch-hard). Row layout: ``batch.reshape(batch_size // m, m)`` has one class per row.
    The classes of a batch are distinct, drawn uniformly among the classes with >= 2 samples. A
    class with at least m samples gives m distinct samples; a class with 2..m-1 samples gives all
    of them, then fills up to m with repeats drawn from them (as pytorch-metric-learning's
    MPerClassSampler); a class with a single sample is never drawn (it has no positive pair).
    Host numpy.

    Args:
      labels: int[N] class labels (arbitrary integers).
      batch_size: B, a positive int, a multiple of ``m``.
      m: samples per class, an int >= 2.
      seed: an int seed or a ``np.random.Generator`` (keyword-only, required).
      num_batches: batches to draw, a positive int (default None: max(1, N // batch_size), about
        one pass over the data).

    Returns:
      numpy i32[num_batches, batch_size] sample ids in [0, N).

    Raises:
      ValueError: ``labels`` not 1-D integer; ``batch_size``, ``m`` or ``num_batches`` not
        positive integers, ``m`` < 2 or ``batch_size`` not a multiple of it; ``labels`` with fewer
        than batch_size / m classes of >= 2 samples.

    Example:
      >>> import numpy as np
      >>> from smine_jax import data
      >>> labels = np.array([0, 0, 1, 1, 2, 2, 2])
      >>> data.m_per_class_batches(labels, 4, 2, seed=0, num_batches=3).shape
      (3, 4)
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
