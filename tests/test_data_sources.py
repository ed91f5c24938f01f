"""Dataset sources: tfds (mocked), native CUB / Cars196 folders, class folders, Omniglot, config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from smine_jax import data
from smine_jax.data import sources

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def _write_image(path: Path, size=(20, 14), mode="RGB", seed=0, fmt=None) -> Path:
    """A random image file (JPEG or PNG by extension) of `size` (width, height) and `mode`."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}.get(mode, 3)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    if mode not in ("RGB", "L"):
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


# ----------------------------------------------------------------------------------------------
# Native CUB-200-2011.

CUB_CLASSES = {1: "001.Black_footed_Albatross", 101: "101.White_Pelican", 150: "150.Sage_Thrasher",
               170: "170.Mourning_Warbler", 200: "200.Common_Yellowthroat"}


def _make_cub(parent: Path, per_class=(3, 1, 2, 2, 1)) -> Path:
    """A tiny CUB_200_2011/ tree; class 1 is the only training class (ids <= 100)."""
    root = parent / "CUB_200_2011"
    images, labels, image_id = [], [], 0
    for (class_id, class_name), count in zip(CUB_CLASSES.items(), per_class, strict=True):
        for j in range(count):
            image_id += 1
            relative = f"{class_name}/{class_name.split('.')[1]}_{j:04d}.jpg"
            _write_image(root / "images" / relative, size=(24 + j, 16), seed=image_id)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text(
        "\n".join(f"{c} {n}" for c, n in CUB_CLASSES.items()) + "\n")
    return root


def test_cub_folder_splits_by_official_class_id(tmp_path):
    root = _make_cub(tmp_path)
    dataset = sources.cub_folder(root)
    # By official id only class 1 trains; cutting the 5 present classes in half would give 2.
    assert dataset.counts() == {"train": 3, "test": 6}
    assert dataset.class_names == tuple(CUB_CLASSES.values())
    reference_ids = [int(line.split()[1]) for line in
                     (root / "image_class_labels.txt").read_text().split("\n") if line]
    np.testing.assert_array_equal(dataset.is_train, np.array(reference_ids) <= 100)
    np.testing.assert_array_equal(
        dataset.labels, [sorted(CUB_CLASSES).index(c) for c in reference_ids])
    train, test = dataset.subset("train"), dataset.subset("test")
    assert train.class_names == ("001.Black_footed_Albatross",)
    np.testing.assert_array_equal(test.labels, [0, 1, 1, 2, 2, 3])
    assert test.items[0] == os.path.join("images", "101.White_Pelican", "White_Pelican_0000.jpg")
    np.testing.assert_array_equal(test.source_ids, np.arange(3, 9))
    image = test.read_image(0)
    assert image.dtype == np.uint8 and image.shape == (16, 24, 3)
    # `dir` may be the dataset folder or its parent: the same record either way.
    assert sources.cub_folder(tmp_path).items == dataset.items


def test_cub_official_counts_strict_and_override(tmp_path, caplog):
    _make_cub(tmp_path)
    config = data.default_config()
    config.name, config.dir, config.cache_dir = "cub", str(tmp_path), str(tmp_path / "cache")
    with pytest.raises(ValueError) as error:
        data.build_dataset(config)
    message = str(error.value)
    assert "expected 5,864 train / 5,924 test images" in message
    assert "found 3 / 6" in message
    assert "--config.data.strict_counts=False" in message
    config.strict_counts = False
    with caplog.at_level(logging.WARNING):
        dataset = data.build_dataset(config)
    assert dataset.counts() == {"train": 3, "test": 6}
    assert "found 3 / 6" in caplog.text


def test_official_counts_pass_silently():
    labels = np.zeros(5864 + 5924, np.int32)
    is_train = np.arange(len(labels)) < 5864
    dataset = sources.Dataset(name="cub", source="folder", root="/x", split="all",
                              items=tuple(map(str, range(len(labels)))), labels=labels,
                              class_names=("a",), is_train=is_train,
                              reader=sources.ImageFiles("/x"))
    assert sources.check_official_counts(dataset) == {"train": 5864, "test": 5924}


def test_missing_dataset_folder_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"^data\.dir=.*found no CUB_200_2011 folder"):
        sources.cub_folder(tmp_path)
    with pytest.raises(ValueError, match=r"^data\.dir=.*not a directory"):
        sources.cars_folder(tmp_path / "absent")


# ----------------------------------------------------------------------------------------------
# Native Cars196.


def _make_cars(root: Path, class_ids=(1, 1, 98, 99, 150, 196, 196)) -> Path:
    """cars_annos.mat (scipy.io.savemat) + car_ims/; the `test` flags contradict the split."""
    annotations = np.zeros(len(class_ids), dtype=[("relative_im_path", "O"), ("class", "O"),
                                                  ("test", "O")])
    for i, class_id in enumerate(class_ids):
        relative = f"car_ims/{i + 1:06d}.jpg"
        _write_image(root / relative, size=(30, 20), seed=i)
        annotations[i] = (relative, np.uint8(class_id), np.uint8(i % 2))
    names = np.array([f"Make Model {c} 2012" for c in range(1, 197)], dtype=object)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations.reshape(1, -1),
                                               "class_names": names.reshape(1, -1)})
    return root


def test_cars_folder_reads_the_mat_file_and_splits_by_class(tmp_path):
    class_ids = (1, 1, 98, 99, 150, 196, 196)
    root = _make_cars(tmp_path / "stanford_cars", class_ids)
    dataset = sources.cars_folder(tmp_path)  # the parent
    assert Path(dataset.root) == root.resolve()
    np.testing.assert_array_equal(dataset.is_train, np.array(class_ids) <= 98)
    assert dataset.class_names == ("Make Model 1 2012", "Make Model 98 2012",
                                   "Make Model 99 2012", "Make Model 150 2012",
                                   "Make Model 196 2012")
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 2, 3, 4, 4])
    test = dataset.subset("test")
    np.testing.assert_array_equal(test.labels, [0, 1, 2, 2])
    assert test.read_image(0, size=8).shape == (8, 8, 3)
    config = data.default_config()
    config.name, config.dir = "cars", str(root)
    with pytest.raises(ValueError, match=r"expected 8,054 train / 8,131 test images.*found 3 / 4"):
        data.build_dataset(config)


# ----------------------------------------------------------------------------------------------
# Class folders.


def test_class_folders_split_dirs_with_nested_classes(tmp_path):
    # Omniglot's archive layout: <split>/<alphabet>/<character>/<image>.
    for split, alphabets in (("bg", ("Latin", "Greek")), ("ev", ("Futurama",))):
        for a, alphabet in enumerate(alphabets):
            for character in range(2):
                for drawer in range(3):
                    _write_image(tmp_path / split / alphabet / f"character{character + 1:02d}"
                                 / f"{a}{character}_{drawer:02d}.png", mode="1")
    (tmp_path / "bg" / "Latin" / "notes.txt").write_text("not an image")
    _write_image(tmp_path / "bg" / "Latin" / "character01" / ".hidden.png")
    dataset = sources.class_folders(tmp_path, split_dirs=("bg", "ev"))
    assert dataset.counts() == {"train": 12, "test": 6}
    assert dataset.class_names == ("bg/Greek/character01", "bg/Greek/character02",
                                   "bg/Latin/character01", "bg/Latin/character02",
                                   "ev/Futurama/character01", "ev/Futurama/character02")
    assert all(not item.endswith((".txt", ".hidden.png")) for item in dataset.items)
    for i in range(len(dataset)):
        assert dataset.items[i].startswith(dataset.class_names[dataset.labels[i]] + "/")
    with pytest.raises(ValueError, match="has no folder 'missing'"):
        sources.class_folders(tmp_path, split_dirs=("bg", "missing"))


def test_class_folders_cut_the_sorted_class_list(tmp_path):
    sizes = {"c": 2, "a": 1, "b": 3, "e": 2, "d": 1}
    for name, count in sizes.items():
        for j in range(count):
            _write_image(tmp_path / name / f"{j}.jpg", seed=j)
    dataset = sources.class_folders(tmp_path, train_fraction=0.5)  # floor(2.5) = 2 classes
    assert dataset.subset("train").class_names == ("a", "b")
    assert dataset.subset("test").class_names == ("c", "d", "e")
    assert dataset.counts() == {"train": 4, "test": 5}
    assert sources.class_folders(tmp_path, train_fraction=0.8).counts()["train"] == 7
    with pytest.raises(ValueError, match=r"^train_fraction=0\.1: gives 0 of 5 classes"):
        sources.class_folders(tmp_path, train_fraction=0.1)
    _write_image(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="holds images directly"):
        sources.class_folders(tmp_path)


def test_empty_class_folders_and_other_files_are_reported(tmp_path, caplog):
    for name in ("a", "b", "c"):
        _write_image(tmp_path / name / "0.png")
    (tmp_path / "d").mkdir()  # an empty class
    (tmp_path / "e" / "nested").mkdir(parents=True)  # another
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "b" / ".hidden").write_text("x")
    with caplog.at_level(logging.WARNING, logger="smine_jax.data.sources"):
        dataset = sources.class_folders(tmp_path, train_fraction=0.5)
    assert dataset.num_classes == 3
    text = caplog.text
    assert "skipped 2 class folder(s) without .jpg/.jpeg/.png images (d, e/nested)" in text
    assert "skipped 1 file(s) that are not .jpg/.jpeg/.png images" in text


# ----------------------------------------------------------------------------------------------
# Decoding: modes, resize, errors.


def _single_image_dataset(path: Path) -> sources.Dataset:
    return sources.Dataset(name="folder", source="folder", root=str(path.parent), split="all",
                           items=(path.name,), labels=[0], class_names=("x",), is_train=[True],
                           reader=sources.ImageFiles(str(path.parent)))


def test_grey_palette_one_bit_and_transparent_images_become_rgb(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgb = _single_image_dataset(tmp_path / "grey.png").read_image(0)
    np.testing.assert_array_equal(rgb, np.repeat(grey[..., None], 3, axis=2))

    bits = np.zeros((5, 7), bool)
    bits[1:3, 2:6] = True
    Image.fromarray(bits).save(tmp_path / "bits.png")  # mode "1", as Omniglot
    image = _single_image_dataset(tmp_path / "bits.png").read_image(0, channels=1)
    np.testing.assert_array_equal(image[..., 0], np.where(bits, 255, 0))

    palette = Image.new("P", (4, 3))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1] * 6)
    palette.save(tmp_path / "palette.png")
    image = _single_image_dataset(tmp_path / "palette.png").read_image(0)
    np.testing.assert_array_equal(image.reshape(-1, 3)[:2], [[10, 20, 30], [200, 100, 50]])

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = _single_image_dataset(tmp_path / "rgba.png").read_image(0)
    np.testing.assert_array_equal(image[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(image[1, 1], [255, 255, 255])  # on white

    colour = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    luminance = _single_image_dataset(tmp_path / "colour.png").read_image(0, channels=1)
    expected = np.asarray(Image.fromarray(colour).convert("L"))
    np.testing.assert_array_equal(luminance[..., 0], expected)


def test_resize_squashes_to_a_square(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = _single_image_dataset(tmp_path / "wide.png").read_image(0, size=16)
    reference = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(image, reference)
    flat = np.full((9, 31, 3), (7, 99, 201), np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.jpg", quality=100)
    image = _single_image_dataset(tmp_path / "flat.jpg").read_image(0, size=12)
    assert image.shape == (12, 12, 3)
    assert np.abs(image.astype(int) - [7, 99, 201]).max() <= 2


def test_corrupt_and_truncated_images_name_their_file(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(sources.ImageReadError, match=r"corrupt\.jpg: UnidentifiedImageError"):
        _single_image_dataset(tmp_path / "corrupt.jpg").read_image(0)
    good = _write_image(tmp_path / "whole.jpg", size=(64, 48)).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(sources.ImageReadError, match=r"truncated\.jpg.*truncated"):
        _single_image_dataset(tmp_path / "truncated.jpg").read_image(0)
    with pytest.raises(sources.ImageReadError, match="gone.png"):
        _single_image_dataset(tmp_path / "gone.png").fingerprint()


def test_dataset_record_checks_and_select(tmp_path):
    with pytest.raises(ValueError, match=r"^labels: expected shape \(2,\)"):
        sources.Dataset(name="x", source="folder", root="/", split="all", items=("a", "b"),
                        labels=[0], class_names=("c",), is_train=[True, True],
                        reader=sources.ImageFiles("/"))
    with pytest.raises(ValueError, match=r"^labels: expected values in \[0, 1\)"):
        sources.Dataset(name="x", source="folder", root="/", split="all", items=("a",),
                        labels=[1], class_names=("c",), is_train=[True],
                        reader=sources.ImageFiles("/"))
    dataset = sources.Dataset(name="x", source="folder", root="/", split="all",
                              items=("a", "b", "c"), labels=[2, 0, 2],
                              class_names=("zero", "one", "two"), is_train=[1, 0, 1],
                              reader=sources.ImageFiles("/"))
    picked = dataset.select([2, 0])
    assert picked.items == ("c", "a") and picked.class_names == ("two",)
    np.testing.assert_array_equal(picked.labels, [0, 0])
    assert not picked.labels.flags.writeable
    with pytest.raises(ValueError, match=r"^ids: expected values in \[0, 3\)"):
        dataset.select([3])
    with pytest.raises(ValueError, match="^split: expected 'train' or 'test'"):
        dataset.subset("val")


# ----------------------------------------------------------------------------------------------
# tfds (mocked: no TensorFlow, no network).


@pytest.mark.parametrize("name,tfds_name,last_train_class",
                         [("cub", "caltech_birds2011", 100), ("cars196", "cars196", 98)])
def test_tfds_sources_merge_and_resplit_by_class(tmp_path, name, tfds_name, last_train_class):
    tfds = pytest.importorskip("tensorflow_datasets")
    num_examples = 9
    with tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        records = tfds.data_source(tfds_name, split=["train", "test"], download=False)
        reference = [int(records[s][i]["label"]) for s in range(2) for i in range(num_examples)]
        config = data.default_config()
        config.update(name=name, source="tfds", cache_dir=str(tmp_path), image_size=16,
                      crop_size=12, strict_counts=False)
        dataset = data.build_dataset(config, progress=False)
        assert len(dataset) == 2 * num_examples and dataset.source == "tfds"
        assert dataset.items[num_examples] == "test/0"
        # Official class id = tfds label + 1; training classes are ids 1..last_train_class.
        np.testing.assert_array_equal(dataset.is_train,
                                      np.array(reference) + 1 <= last_train_class)
        global_ids = sorted(set(reference), key=lambda c: (c + 1 > last_train_class, c))
        np.testing.assert_array_equal(dataset.labels, [global_ids.index(c) for c in reference])
        if name == "cars196":
            names = tfds.builder("cars196").info.features["label"].names
            assert dataset.class_names == tuple(names[c] for c in global_ids)
        first = dataset.read_image(0)
        np.testing.assert_array_equal(first, records[0][0]["image"])

        split = data.load(config, split="test", dataset=dataset, progress=False)
        assert split.images.shape == (len(dataset.subset("test")), 16, 16, 3)
        assert split.counts == dataset.counts()

        # The labels pass is kept in the cache directory: a second listing reads no record.
        def no_reads(self, item):
            raise AssertionError("record read again")

        original = sources.TfdsImages.record
        sources.TfdsImages.record = no_reads
        try:
            again = data.build_dataset(config, progress=False)
        finally:
            sources.TfdsImages.record = original
        np.testing.assert_array_equal(again.labels, dataset.labels)

        config.strict_counts = True
        expected = sources.OFFICIAL_COUNTS[name]
        with pytest.raises(ValueError, match=f"expected {expected[0]:,} train / "
                                             f"{expected[1]:,} test images"):
            data.build_dataset(config, progress=False)


def test_tfds_not_prepared_explains_how(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=r"cannot open tfds cars196.*array_record.*data\.dir"):
        sources.tfds_dataset("cars196", data_dir=tmp_path, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# Configuration.


def test_config_defaults_selection_and_errors(tmp_path):
    cfg = data.resolve_config(data.default_config())
    assert cfg["source"] == "tfds" and cfg["image_size"] == 256 and cfg["crop_size"] == 227
    cfg = data.resolve_config({"name": "CUB200", "dir": str(tmp_path)})
    assert cfg["name"] == "cub" and cfg["source"] == "folder"
    assert data.resolve_config({"name": "omniglot"})["source"] == "folder"  # downloaded
    cases = [
        ({"nmae": "cub"}, r"^config\.data: unknown fields \['nmae'\]"),
        ({"name": "imagenet"}, r"^data\.name='imagenet': expected one of"),
        ({"source": "web"}, r"^data\.source='web'"),
        ({"name": "folder", "source": "tfds"}, r"^data\.source='tfds': only"),
        ({"name": "omniglot", "source": "tfds"}, r"^data\.source='tfds': only"),
        ({"image_size": 0}, r"^data\.image_size: expected an integer >= 1"),
        ({"crop_size": 300}, r"^data\.crop_size=300: larger than data\.image_size=256"),
        ({"channels": 2}, r"^data\.channels: expected 1 or 3"),
        ({"channels": 1}, r"^data\.mean: expected 1 or 1 values"),
        ({"std": (0.2, 0.0, 0.2)}, r"^data\.std: expected positive"),
    ]
    for fields, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            data.resolve_config(fields)
    for name in ("folder", "cub"):
        with pytest.raises(ValueError, match=f"^data\\.dir: source 'folder' needs the {name}"):
            data.build_dataset({"name": name, "source": "folder"})


# ----------------------------------------------------------------------------------------------
# Omniglot from ../shared/data (skipped when absent).


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"no Omniglot at {OMNIGLOT}")
def test_omniglot_from_shared_data():
    config = data.default_config()
    config.update(name="omniglot", dir=str(OMNIGLOT.parent), channels=1, mean=(0.5,),
                  std=(0.5,))
    dataset = data.build_dataset(config)  # strict counts: 19,280 / 13,180
    train, test = dataset.subset("train"), dataset.subset("test")
    assert (len(train), len(test)) == (19280, 13180)
    assert (train.num_classes, test.num_classes) == (964, 659)
    assert np.all(np.bincount(train.labels) == 20) and np.all(np.bincount(test.labels) == 20)
    assert all(name.startswith("images_evaluation/") for name in test.class_names)
    for i in (0, 19, 20, 13179):  # a handful, not 32k
        image = test.read_image(i)
        assert image.shape == (105, 105, 3) and set(np.unique(image)) <= {0, 255}
        assert test.items[i].startswith(test.class_names[test.labels[i]] + "/")
    assert train.read_image(5, size=28, channels=1).shape == (28, 28, 1)
