"""The decoded image cache: content, reuse, invalidation, atomic writes, errors, executors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smine_jax import data
from smine_jax.data import cache, sources


def _make_tree(root: Path) -> Path:
    """Class folders with JPEG and PNG images of several sizes and modes (grey, palette)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cat", "dog")):
        for j in range(3):
            height, width = 10 + 3 * j, 14 + 5 * c
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if j == 1:
                image = image.convert("L")
            if c == 3 and j == 2:
                image = image.convert("P")
            (root / name).mkdir(parents=True, exist_ok=True)
            image.save(root / name / f"{j}.{'jpg' if j == 0 else 'png'}")
    return root


def _reference(dataset: sources.Dataset, size: int, channels: int) -> np.ndarray:
    """Slow and obvious: every image decoded on its own."""
    return np.stack([dataset.read_image(i, size=size, channels=channels)
                     for i in range(len(dataset))])


@pytest.fixture
def tree(tmp_path):
    return _make_tree(tmp_path / "images")


def test_cache_holds_the_decoded_images_and_is_read_only(tree, tmp_path):
    dataset = sources.class_folders(tree).subset("test")
    images = cache.cached_images(dataset, tmp_path / "cache", image_size=8, channels=3,
                                 num_workers=2, progress=False)
    assert isinstance(images, np.memmap) and images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(images, _reference(dataset, 8, 3))
    assert not images.flags.writeable
    grey = cache.cached_images(dataset, tmp_path / "cache", image_size=5, channels=1,
                               progress=False)
    np.testing.assert_array_equal(grey, _reference(dataset, 5, 1))
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 4 and all(n.startswith("folder-test-") for n in names)
    assert {n.split("-")[2] for n in names} == {"8px", "5px"}


def test_cache_is_reused_without_decoding(tree, tmp_path, monkeypatch):
    dataset = sources.class_folders(tree).subset("train")
    first = cache.cached_images(dataset, tmp_path, image_size=8, progress=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(sources.Dataset, "read_image", no_decoding)
    fresh_listing = sources.class_folders(tree).subset("train")  # a later run
    again = cache.cached_images(fresh_listing, tmp_path, image_size=8, progress=False)
    assert again.filename == first.filename
    np.testing.assert_array_equal(again, first)


def test_changed_files_invalidate_the_cache(tree, tmp_path):
    dataset = sources.class_folders(tree).subset("train")
    before = cache.cached_images(dataset, tmp_path, image_size=8, progress=False)
    before_values, fingerprint_before = np.array(before), dataset.fingerprint()
    Image.new("RGB", (9, 9), (255, 0, 0)).save(tree / "ant" / "2.png")  # new content and size
    changed = sources.class_folders(tree).subset("train")
    assert changed.fingerprint() != fingerprint_before
    after = cache.cached_images(changed, tmp_path, image_size=8, progress=False)
    assert after.filename != before.filename
    np.testing.assert_array_equal(after[2], np.full((8, 8, 3), (255, 0, 0)))
    np.testing.assert_array_equal(after[3:], before_values[3:])
    # A touched file (same bytes, new mtime) is a change too (the key is computed from stat).
    key_before = cache.cache_key(changed, image_size=8, channels=3)
    stat = os.stat(tree / "bee" / "0.jpg")
    os.utime(tree / "bee" / "0.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.cache_key(changed, image_size=8, channels=3) != key_before


def test_only_a_complete_cache_with_its_sidecar_is_trusted(tree, tmp_path):
    dataset = sources.class_folders(tree).subset("test")
    path = cache.cache_path(dataset, tmp_path, image_size=8, channels=3)
    # A file under the final name without a sidecar (e.g. from a foreign writer) is rebuilt.
    np.save(path, np.zeros((6, 8, 8, 3), np.uint8))
    images = cache.cached_images(dataset, tmp_path, image_size=8, progress=False)
    np.testing.assert_array_equal(images, _reference(dataset, 8, 3))
    # A sidecar with another key is not trusted either.
    sidecar = path.with_name(path.name + ".json")
    sidecar.write_text('{"key": "something else"}')
    np.save(path, np.zeros((6, 8, 8, 3), np.uint8))
    images = cache.cached_images(dataset, tmp_path, image_size=8, progress=False)
    np.testing.assert_array_equal(images, _reference(dataset, 8, 3))


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_bad_image_stops_the_build_with_its_path(tree, tmp_path, damage):
    target = tree / "dog" / "0.jpg"
    if damage == "corrupt":
        target.write_bytes(b"\x00" * 100)
    else:
        target.write_bytes(target.read_bytes()[:200])
    dataset = sources.class_folders(tree).subset("test")
    with pytest.raises(sources.ImageReadError, match=str(target)):
        cache.cached_images(dataset, tmp_path / "cache", image_size=8, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no half cache, no temporary file


_SLOW_BUILD = """
import sys, time
from smine_jax.data import cache, sources
original = sources.Dataset.read_image
def slow(self, i, **kwargs):
    if i == 1:
        print("started", flush=True)
    time.sleep(0.5)
    return original(self, i, **kwargs)
sources.Dataset.read_image = slow
dataset = sources.class_folders(sys.argv[1]).subset("train")
cache._CHUNK = 1
cache.cached_images(dataset, sys.argv[2], image_size=8, num_workers=1, progress=False)
"""


def test_a_killed_build_leaves_nothing_that_is_trusted(tree, tmp_path):
    cache_dir = tmp_path / "cache"
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(tree), str(cache_dir)],
                             stdout=subprocess.PIPE, text=True, cwd=repo,
                             env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        assert child.stdout.readline().strip() == "started"
    finally:
        child.kill()
        child.wait()
    left = list(cache_dir.iterdir())
    assert len(left) == 1 and ".tmp-" in left[0].name  # a temporary, never the final name
    dataset = sources.class_folders(tree).subset("train")
    images = cache.cached_images(dataset, cache_dir, image_size=8, progress=False)
    np.testing.assert_array_equal(images, _reference(dataset, 8, 3))
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".npy"]  # cleaned up


def test_concurrent_builds_agree(tree, tmp_path):
    dataset = sources.class_folders(tree).subset("train")
    results, errors = [], []

    def build():
        try:
            results.append(np.array(cache.cached_images(
                dataset, tmp_path / "cache", image_size=8, num_workers=1, progress=False)))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for result in results:
        np.testing.assert_array_equal(result, _reference(dataset, 8, 3))
    assert len(results) == 3
    assert len(list((tmp_path / "cache").iterdir())) == 2  # .npy + sidecar, no temporaries


def test_process_executor_matches_threads(tree, tmp_path):
    dataset = sources.class_folders(tree).subset("train")
    threads = cache.cached_images(dataset, tmp_path / "t", image_size=8, progress=False)
    processes = cache.cached_images(dataset, tmp_path / "p", image_size=8, num_workers=2,
                                    executor="process", progress=False)
    np.testing.assert_array_equal(processes, threads)


def test_progress_bar_and_argument_checks(tree, tmp_path, capsys):
    dataset = sources.class_folders(tree).subset("train")
    cache.cached_images(dataset, tmp_path, image_size=4, progress=True)
    assert "caching folder train at 4px" in capsys.readouterr().err
    for kwargs, pattern in (({"image_size": 0}, "^image_size: expected a positive integer"),
                            ({"channels": 4}, "^channels: expected 1 or 3"),
                            ({"executor": "gpu"}, "^executor: expected 'thread' or 'process'")):
        with pytest.raises(ValueError, match=pattern):
            cache.cached_images(dataset, tmp_path, progress=False, **kwargs)
    with pytest.raises(ValueError, match="has no images"):
        cache.cached_images(dataset.select([]), tmp_path, progress=False)


def test_load_builds_both_splits(tree, tmp_path):
    config = data.default_config()
    config.update(name="folder", dir=str(tree), cache_dir=str(tmp_path / "cache"),
                  image_size=12, crop_size=10)
    dataset = data.build_dataset(config, progress=False)
    train = data.load(config, split="train", dataset=dataset, progress=False)
    test = data.load(config, split="test", progress=False)
    assert (len(train), len(test)) == (6, 6) and train.num_classes == 2
    assert train.class_names == ("ant", "bee") and test.class_names == ("cat", "dog")
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(test.images, _reference(dataset.subset("test"), 12, 3))
    assert train.counts == {"train": 6, "test": 6}
    assert data.load(config, split="val", dataset=dataset, progress=False) is None  # 2 classes
    with pytest.raises(ValueError, match=r"^split: expected one of \('train', 'val', 'test'\)"):
        data.load(config, split="all", dataset=dataset)


def test_unreadable_images_stop_the_build_or_are_left_out(tree, tmp_path):
    broken = tree / "cat" / "1.png"
    broken.write_bytes(broken.read_bytes()[:30])  # truncated
    dataset = sources.class_folders(tree).subset("test")  # cat, dog
    bad = dataset.items.index("cat/1.png")
    with pytest.raises(sources.ImageReadError, match=r"cat/1\.png"):
        cache.cached_images(dataset, tmp_path / "c", image_size=8, progress=False)
    built = cache.build_cache(dataset, tmp_path / "c", image_size=8, progress=False,
                              skip_unreadable=True)
    assert list(built.unreadable) == [bad] and "cat/1.png" in built.unreadable[bad]
    assert not built.images[bad].any()
    good = [i for i in range(len(dataset)) if i != bad]
    np.testing.assert_array_equal(built.images[good],
                                  _reference(dataset.select(good), 8, 3))
    # The list is kept with the cache: no decoding the next time, and without the option the
    # cache still refuses, naming the file and the option.
    again = cache.build_cache(dataset, tmp_path / "c", image_size=8, progress=False,
                              skip_unreadable=True, num_workers=0)
    assert again.unreadable == built.unreadable
    with pytest.raises(sources.ImageReadError, match=r"cat/1\.png.*skip_unreadable=True"):
        cache.cached_images(dataset, tmp_path / "c", image_size=8, progress=False)
    config = data.default_config()
    config.update(name="folder", dir=str(tree), cache_dir=str(tmp_path / "c"), image_size=8,
                  crop_size=8, skip_unreadable=True)
    split = data.load(config, split="test", progress=False)
    assert len(split) == len(dataset) - 1 and len(split.skipped) == 1
    assert "cat/1.png" not in split.dataset.items
    np.testing.assert_array_equal(split.images, built.images[good])
    with pytest.raises(ValueError, match=r"^data\.skip_unreadable: expected True or False"):
        data.resolve_config({"skip_unreadable": "yes"})


def test_validation_classes_share_count_and_seed():
    assert data.validation_classes(964, 0.1).size == 96
    assert data.validation_classes(100, 0.1).size == 10
    assert data.validation_classes(98, 0.1).size == 9
    assert data.validation_classes(19, 0.1).size == 0  # ⌊1.9⌋ < 2: no validation split
    assert data.validation_classes(50, 0).size == 0
    chosen = data.validation_classes(50, 7, seed=3)
    assert chosen.size == 7 and np.all(np.diff(chosen) > 0) and chosen.max() < 50
    np.testing.assert_array_equal(chosen, data.validation_classes(50, 7, seed=3))
    assert not np.array_equal(chosen, data.validation_classes(50, 7, seed=4))
    with pytest.raises(ValueError, match=r"^data\.val_classes=9: holds out 9 of the 10"):
        data.validation_classes(10, 9)
    with pytest.raises(ValueError, match=r"^data\.val_classes=1: a count must be >= 2"):
        data.validation_classes(10, 1)
    for value in (1, 1.0, 2.5, -0.1, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match=r"^data\.val_classes: expected a share"):
            data.resolve_config({"val_classes": value})
    with pytest.raises(ValueError, match=r"^data\.val_seed: expected an integer"):
        data.resolve_config({"val_seed": 0.5})


def test_load_holds_the_validation_classes_out_of_train(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(8):
        (tmp_path / "images" / f"c{c}").mkdir(parents=True)
        for j in range(5 + c % 2):
            pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / f"c{c}" / f"{j}.png")
    config = data.default_config()
    config.update(name="folder", dir=str(tmp_path / "images"), cache_dir=str(tmp_path / "c"),
                  image_size=6, crop_size=6, train_fraction=0.75, val_classes=2, val_seed=1)
    dataset = data.build_dataset(config, progress=False)
    train = data.load(config, split="train", dataset=dataset, progress=False)
    val = data.load(config, split="val", dataset=dataset, progress=False)
    test = data.load(config, split="test", dataset=dataset, progress=False)
    all_train = dataset.subset("train")
    held_out = data.validation_classes(6, 2, seed=1)
    assert set(val.class_names) == {all_train.class_names[c] for c in held_out}
    assert set(train.class_names) | set(val.class_names) == set(all_train.class_names)
    assert not set(train.class_names) & set(val.class_names)
    assert len(train) + len(val) == len(all_train) and test.num_classes == 2
    assert val.dataset.split == "val" and val.num_classes == 2
    np.testing.assert_array_equal(val.labels, np.unique(val.labels, return_inverse=True)[1])
    np.testing.assert_array_equal(val.images, _reference(val.dataset, 6, 3))
    assert train.counts == {"train": len(all_train), "test": len(test)}  # official counts
    # Too few images to evaluate: with a share, nothing held out (logged); with a count, an
    # error naming the field.
    few = dataset.select([i for i in range(len(dataset))
                          if not dataset.is_train[i] or i % 4 == 0])  # 1-2 images a class
    held = np.isin(few.subset("train").labels, data.validation_classes(6, 3, seed=1))
    assert 0 < held.sum() < data.MIN_VALIDATION_IMAGES
    config.update(val_classes=0.5)  # 3 of the 6 classes
    assert data.load(config, split="val", dataset=few, progress=False) is None
    assert len(data.load(config, split="train", dataset=few, progress=False)) == sum(
        few.is_train)
    config.update(val_classes=3)
    with pytest.raises(ValueError, match=r"^data\.val_classes=3: the validation classes hold"):
        data.load(config, split="train", dataset=few, progress=False)
