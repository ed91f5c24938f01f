"""Batches and augmentation: gathers, random crop / flip / normalisation, inference, sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smine_jax import data
from smine_jax.data import pipeline

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
SIZE, CROP = 12, 8


def _images(batch: int, size: int = SIZE, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, channels), np.uint8)


def _normalised(x: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """Reference normalisation in float64."""
    return (x.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)


_augment = jax.jit(lambda key, x: data.augment(key, x, crop_size=CROP, mean=MEAN, std=STD))


# ----------------------------------------------------------------------------------------------
# Gathers.


def test_gather_matches_fancy_indexing_on_a_memmap(tmp_path):
    images = _images(30)
    np.save(tmp_path / "c.npy", images)
    mapped = np.load(tmp_path / "c.npy", mmap_mode="r")
    rng = np.random.default_rng(1)
    for shape in ((7,), (3, 5), (0,)):
        ids = rng.integers(0, 30, shape)
        np.testing.assert_array_equal(data.gather(mapped, ids), images[ids])
    ids = np.array([4, 4, 29, 0, 4])  # duplicates and any order
    batch = data.device_batch(mapped, ids)
    assert isinstance(batch, jax.Array) and batch.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(batch), images[ids])
    with pytest.raises(ValueError, match=r"^ids: expected values in \[0, 30\)"):
        data.gather(mapped, [30])
    with pytest.raises(ValueError, match="^ids: expected integer"):
        data.gather(mapped, [0.5])


def test_prefetch_yields_the_batches_in_order():
    images = _images(20, size=2)
    id_batches = [np.arange(i, i + 4) % 20 for i in range(0, 28, 4)]
    for size in (1, 3, 10):
        out = list(data.prefetch_batches(images, iter(id_batches), size=size))
        assert len(out) == len(id_batches)
        for batch, ids in zip(out, id_batches, strict=True):
            np.testing.assert_array_equal(np.asarray(batch), images[ids])
    stream = data.prefetch_batches(images, [[0], [99]])
    np.testing.assert_array_equal(np.asarray(next(stream)), images[[0]])
    with pytest.raises(ValueError, match=r"^ids: expected values in \[0, 20\)"):
        next(stream)
    stream = data.prefetch_batches(images, ([i] for i in range(1000)))
    next(stream)
    stream.close()  # stops the background thread without draining the source


# ----------------------------------------------------------------------------------------------
# Augmentation.


def _find_window(out: np.ndarray, image: np.ndarray) -> list[tuple[int, int, bool]]:
    """Reference: every (top, left, flipped) whose normalised window equals `out`."""
    matches = []
    for top in range(image.shape[0] - CROP + 1):
        for left in range(image.shape[1] - CROP + 1):
            window = _normalised(image[top:top + CROP, left:left + CROP])
            for flipped in (False, True):
                candidate = window[:, ::-1] if flipped else window
                if np.allclose(out, candidate, atol=1e-5):
                    matches.append((top, left, flipped))
    return matches


def test_augment_is_a_random_window_maybe_mirrored_then_normalised():
    images = _images(64)
    out = np.asarray(_augment(jax.random.key(0), images))
    assert out.shape == (64, CROP, CROP, 3) and out.dtype == np.float32
    windows = [_find_window(out[i], images[i]) for i in range(len(images))]
    assert all(len(w) == 1 for w in windows)  # random pixels: exactly one window matches
    tops, lefts, flips = zip(*(w[0] for w in windows), strict=True)
    assert set(tops) == set(range(SIZE - CROP + 1)) == set(lefts)  # all offsets reachable
    assert 16 < sum(flips) < 48  # about half mirrored


def test_augment_is_deterministic_for_a_key():
    images = _images(64, seed=3)  # the shape of the test above: no new compilation
    first = _augment(jax.random.key(7), images)
    np.testing.assert_array_equal(first, _augment(jax.random.key(7), images))
    assert not np.array_equal(first, _augment(jax.random.key(8), images))


def test_no_flip_full_crop_and_bfloat16():
    images = _images(16, seed=4)
    out = data.augment(jax.random.key(1), images, crop_size=SIZE, flip=False, mean=MEAN,
                       std=STD)
    np.testing.assert_allclose(out, _normalised(images), atol=1e-5)
    crops = pipeline.random_crop_flip(jax.random.key(2), images, crop_size=CROP, flip=False)
    assert crops.dtype == jnp.uint8
    assert all(_find_window(_normalised(np.asarray(c)), im)[0][2] is False
               for c, im in zip(np.asarray(crops), images, strict=True))
    half = data.augment(jax.random.key(1), images, crop_size=SIZE, flip=False, mean=MEAN,
                        std=STD, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), _normalised(images), atol=0.05)


def test_center_crop_and_normalise_match_numpy():
    images = _images(3, size=11, channels=1)  # odd margin: (11 - 8) // 2 = 1 before, 2 after
    out = data.center_crop(images, crop_size=CROP, mean=0.5, std=0.25)
    np.testing.assert_allclose(out, _normalised(images[:, 1:9, 1:9], 0.5, 0.25), atol=1e-5)
    rgb = _images(2, seed=5)
    np.testing.assert_allclose(data.normalise(rgb, mean=MEAN, std=STD), _normalised(rgb),
                               atol=1e-5)


def test_augment_argument_errors():
    images = _images(2)
    cases = [
        (dict(crop_size=SIZE + 1), r"^crop_size=13: larger than the images \(12×12\)"),
        (dict(crop_size=0), "^crop_size: expected a positive integer"),
        (dict(crop_size=CROP, mean=(0.1, 0.2)), r"^mean: expected 1 or 3 values"),
        (dict(crop_size=CROP, std=(0.1, 0.0, 0.1)), "^std: expected positive"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            data.augment(jax.random.key(0), images, **kwargs)
    with pytest.raises(ValueError, match=r"^images: expected a 4-D array"):
        data.center_crop(images[0], crop_size=CROP)


def test_preprocessors_from_config():
    config = data.default_config()
    config.update(crop_size=CROP, mean=MEAN, std=STD, flip=False)
    train_fn, eval_fn = data.preprocessors(config)
    images = _images(4, seed=6)
    np.testing.assert_allclose(eval_fn(images), _normalised(images[:, 2:10, 2:10]), atol=1e-5)
    out = np.asarray(jax.jit(train_fn)(jax.random.key(0), images))
    assert all(not _find_window(out[i], images[i])[0][2] for i in range(4))


# ----------------------------------------------------------------------------------------------
# Whole-split inference.


@pytest.mark.parametrize("num_samples,batch_size,num_shards",
                         [(10, 4, 1), (8, 4, 1), (3, 8, 1), (11, 3, 3), (2, 4, 3)])
def test_inference_batches_cover_every_sample_once(num_samples, batch_size, num_shards):
    images = _images(num_samples, size=2)
    seen = []
    for shard in range(num_shards):
        batches = list(data.inference_batches(images, batch_size, shard_index=shard,
                                              num_shards=num_shards))
        shard_ids = np.array_split(np.arange(num_samples), num_shards)[shard]
        assert len(batches) == -(-len(shard_ids) // batch_size)
        for batch in batches:
            assert batch.ids.shape == batch.mask.shape == (batch_size,)
            assert batch.images.shape == (batch_size, 2, 2, 3)
            np.testing.assert_array_equal(batch.mask, batch.ids >= 0)
            real = batch.ids[batch.mask]
            np.testing.assert_array_equal(batch.images[batch.mask], images[real])
            assert not batch.images[~batch.mask].any()
            assert batch.mask[: batch.mask.sum()].all()  # padding only at the end
            seen += real.tolist()
    assert seen == list(range(num_samples))  # every id exactly once, in order
    with pytest.raises(ValueError, match="^shard_index: expected 0 <= shard_index < 2"):
        next(data.inference_batches(images, 4, shard_index=2, num_shards=2))


# ----------------------------------------------------------------------------------------------
# m-per-class sampling.


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=2, max_size=12),
       m=st.integers(2, 4), classes_per_batch=st.integers(1, 4), seed=st.integers(0, 99))
def test_m_per_class_batches_invariants(sizes, m, classes_per_batch, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)) * 3 + 5, sizes))  # non-contiguous
    eligible = {label for label in set(labels.tolist()) if (labels == label).sum() >= 2}
    batch_size = m * classes_per_batch
    if len(eligible) < classes_per_batch:
        with pytest.raises(ValueError, match="distinct classes are needed per batch"):
            data.m_per_class_batches(labels, batch_size, m, seed=seed)
        return
    batches = data.m_per_class_batches(labels, batch_size, m, seed=seed, num_batches=6)
    assert batches.shape == (6, batch_size) and batches.dtype == np.int32
    for batch in batches:
        groups = batch.reshape(classes_per_batch, m)
        group_labels = labels[groups]
        assert (group_labels == group_labels[:, :1]).all()  # one class per row
        assert len(set(group_labels[:, 0].tolist())) == classes_per_batch  # distinct classes
        for group, label in zip(groups, group_labels[:, 0], strict=True):
            assert label in eligible  # never a single-sample class
            members = np.flatnonzero(labels == label)
            if len(members) >= m:
                assert len(set(group.tolist())) == m  # distinct samples
            else:
                assert set(group.tolist()) == set(members.tolist())  # all, then repeats
    again = data.m_per_class_batches(labels, batch_size, m, seed=seed, num_batches=6)
    np.testing.assert_array_equal(again, batches)


def test_m_per_class_defaults_and_errors():
    labels = np.repeat(np.arange(10), 5)
    assert data.m_per_class_batches(labels, 8, 4, seed=0).shape == (50 // 8, 8)
    rng = np.random.default_rng(0)
    assert data.m_per_class_batches(labels, 8, 2, seed=rng, num_batches=2).shape == (2, 8)
    for args, pattern in (((labels, 6, 4), "^batch_size=6: expected a multiple of m=4"),
                          ((labels, 8, 1), "^m: expected at least 2"),
                          ((labels, 0, 2), "^batch_size: expected a positive integer"),
                          ((labels[:, None], 8, 2), "^labels: expected a 1-D")):
        with pytest.raises(ValueError, match=pattern):
            data.m_per_class_batches(*args, seed=0)
