"""Dataset sources: one record for every dataset, whatever it is read from.

A `Dataset` lists the samples of one dataset (or of one split of it): a stable locator per
sample (`items`), integer labels, class names, which samples are training samples, and a
reader that turns sample i into an RGB (or one-channel) uint8 array. Sample ids are row indices
0..N-1 of the record. Sources:

- tfds (`caltech_birds2011`, `cars196`) read with `tfds.data_source` (array_record; no
  TensorFlow needed to read): both official splits merged, then re-split by class (method.md §5);
- the native `CUB_200_2011/` folder and the native Cars196 folder (`cars_annos.mat` +
  `car_ims/`);
- class folders `root/<class>/<image>`, split by two sub-roots or by cutting the sorted class
  list; Omniglot is this layout (`images_background/` train, `images_evaluation/` test), read
  from a folder or downloaded once (`download_omniglot`).

Splits are **by class**: CUB classes 1–100 train and 101–200 test, Cars 1–98 / 99–196, always by
the official class id, never by the position among the classes present. Labels of a full
record are 0-based over all its classes (training classes first); `subset(split)` re-indexes
them 0-based and contiguous over the split's classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from smine_jax import fileio
from smine_jax.data._util import check_channels, sha256_json

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# method.md §5 (train, test) image counts; Omniglot from its README (background / evaluation).
OFFICIAL_COUNTS = {"cub": (5864, 5924), "cars196": (8054, 8131), "omniglot": (19280, 13180)}
# The last official class id of the training split (class ids are 1-based).
LAST_TRAIN_CLASS = {"cub": 100, "cars196": 98}
TFDS_NAMES = {"cub": "caltech_birds2011", "cars196": "cars196"}

OMNIGLOT_SPLIT_DIRS = ("images_background", "images_evaluation")
OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
# name -> (size in bytes, sha256), as recorded by tensorflow-datasets (url_checksums/omniglot.txt).
OMNIGLOT_ARCHIVES = {
    "images_background.zip": (
        9464212, "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640"),
    "images_evaluation.zip": (
        6462886, "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee"),
}

_SPLITS = ("train", "test")


class ImageReadError(RuntimeError):
    """An image could not be read or decoded; the message names its file (or tfds record)."""


class DownloadError(RuntimeError):
    """A dataset download failed or did not verify; the message says what to do offline."""


# ----------------------------------------------------------------------------------------------
# Readers: how to open one sample's image, how to name it in errors, how to fingerprint items.


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """Images stored as files under `root`; an item is a path relative to it."""

    root: str

    def path(self, item: str) -> str:
        return os.path.join(self.root, item)

    def open(self, item: str) -> Image.Image:
        return Image.open(self.path(item))

    def describe(self, item: str) -> str:
        return self.path(item)

    def fingerprint(self, items: Sequence[str]) -> str:
        """Hash of the relative paths, sizes and modification times of the items."""
        digest = hashlib.sha256()
        for item in items:
            try:
                stat = os.stat(self.path(item))
            except OSError as err:
                raise ImageReadError(f"cannot read image {self.path(item)}: {err}") from err
            digest.update(f"{item}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsImages:
    """Images of tfds array_record data sources; an item is "<official split>/<record index>"."""

    name: str
    version: str
    data_dir: str
    sources: dict  # official split name -> tfds data source (a random-access sequence)

    def record(self, item: str) -> dict:
        split, index = item.rsplit("/", 1)
        return self.sources[split][int(index)]

    def open(self, item: str) -> Image.Image:
        return _image_from_array(np.asarray(self.record(item)["image"]))

    def describe(self, item: str) -> str:
        return f"tfds {self.name}:{self.version} record {item} (data_dir={self.data_dir})"

    def fingerprint(self, items: Sequence[str]) -> str:
        counts = {split: len(source) for split, source in sorted(self.sources.items())}
        return sha256_json([self.name, self.version, self.data_dir, counts, list(items)])


def _image_from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8, copy=False)))


# ----------------------------------------------------------------------------------------------
# The record.


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """The samples of a dataset or of one split of it; sample id i is row i.

    Attributes:
      name: "cub", "cars196", "omniglot" or "folder".
      source: "tfds" or "folder".
      root: the folder read (or the tfds data_dir); part of the cache key.
      split: "all" for a full record, else "train" or "test".
      items: per sample, its locator for `reader` (relative path or tfds record).
      labels: int32 [N], 0-based; contiguous over the record's classes.
      class_names: name of each label.
      is_train: bool [N], True for samples of a training class.
      reader: opens an item as a PIL image (`ImageFiles` or `TfdsImages`).
      source_ids: int64 [N], row of each sample in the full record it was taken from.
    """

    name: str
    source: str
    root: str
    split: str
    items: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    is_train: np.ndarray
    reader: ImageFiles | TfdsImages
    source_ids: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.items)
        labels = np.asarray(self.labels, np.int32)
        is_train = np.asarray(self.is_train, bool)
        source_ids = (np.arange(n, dtype=np.int64) if self.source_ids is None
                      else np.asarray(self.source_ids, np.int64))
        for field, array in (("labels", labels), ("is_train", is_train),
                             ("source_ids", source_ids)):
            if array.shape != (n,):
                raise ValueError(f"{field}: expected shape ({n},) to match items, "
                                 f"got {array.shape}")
            array.setflags(write=False)
            object.__setattr__(self, field, array)
        if n and not 0 <= labels.min() <= labels.max() < len(self.class_names):
            raise ValueError(f"labels: expected values in [0, {len(self.class_names)}), got "
                             f"[{labels.min()}, {labels.max()}]")
        object.__setattr__(self, "items", tuple(self.items))
        object.__setattr__(self, "class_names", tuple(self.class_names))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> np.ndarray:
        """Sample ids 0..N-1 (int32)."""
        return np.arange(len(self), dtype=np.int32)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> dict[str, int]:
        """Images per split: {"train": ..., "test": ...}."""
        train = int(self.is_train.sum())
        return {"train": train, "test": len(self) - train}

    def describe(self, i: int) -> str:
        """The file path (or tfds record) of sample i, for messages."""
        return self.reader.describe(self.items[i])

    def fingerprint(self) -> str:
        """Content fingerprint of the samples (see the reader's `fingerprint`)."""
        return self.reader.fingerprint(self.items)

    def read_image(self, i: int, *, size: int | None = None, channels: int = 3) -> np.ndarray:
        """Decodes sample i to uint8 [H, W, channels] (or [size, size, channels]).

        Grey, one-bit and palette images become RGB (channels=3) and colour images become
        luminance (channels=1); transparent pixels are composited on white. With `size`, the
        image is resized to size × size without keeping the aspect ratio (method.md §5: "resize to
        256×256"), bilinear with antialiasing. Any failure raises ImageReadError naming the file.
        """
        item = self.items[int(i)]
        try:
            with contextlib.closing(self.reader.open(item)) as image:
                image.load()
                image = _convert_mode(image, channels)
                if size is not None and image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except Exception as err:  # any failure is reported with the file's path
            raise ImageReadError(
                f"cannot read image {self.reader.describe(item)}: "
                f"{type(err).__name__}: {err}") from err
        return array.reshape(array.shape[0], array.shape[1], channels)

    def select(self, ids, *, split: str | None = None) -> Dataset:
        """The record of the samples `ids` (in that order), labels re-indexed contiguously."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and not 0 <= ids.min() <= ids.max() < len(self):
            raise ValueError(f"ids: expected values in [0, {len(self)}), "
                             f"got [{ids.min()}, {ids.max()}]")
        kept_labels, labels = np.unique(self.labels[ids], return_inverse=True)
        return dataclasses.replace(
            self, split=self.split if split is None else split,
            items=tuple(self.items[i] for i in ids), labels=labels.reshape(-1),
            class_names=tuple(self.class_names[c] for c in kept_labels),
            is_train=self.is_train[ids], source_ids=self.source_ids[ids])

    def subset(self, split: str) -> Dataset:
        """The training or test samples, labels re-indexed 0..C_split-1 (order kept)."""
        if split not in _SPLITS:
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        mask = self.is_train if split == "train" else ~self.is_train
        return self.select(np.flatnonzero(mask), split=split)


def _convert_mode(image: Image.Image, channels: int) -> Image.Image:
    check_channels(channels)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    target = "RGB" if channels == 3 else "L"
    return image if image.mode == target else image.convert(target)


def _full_record(*, name, source, root, items, class_keys, class_names, train_classes,
                 reader) -> Dataset:
    """A full record from per-sample class keys: labels ordered training classes first."""
    class_keys = list(class_keys)
    order = sorted(set(class_keys), key=lambda key: (key not in train_classes, key))
    label_of = {key: label for label, key in enumerate(order)}
    labels = np.array([label_of[key] for key in class_keys], np.int32)
    is_train = np.array([key in train_classes for key in class_keys], bool)
    return Dataset(name=name, source=source, root=str(root), split="all", items=tuple(items),
                   labels=labels, class_names=tuple(class_names[key] for key in order),
                   is_train=is_train, reader=reader)


# ----------------------------------------------------------------------------------------------
# Locating a dataset folder: `dir` may be the folder itself or its parent.


def _locate(directory, is_dataset: Callable[[Path], bool], what: str, field: str) -> Path:
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ValueError(f"{field}={directory}: not a directory (expected {what})")
    candidates = [directory] + sorted(p for p in directory.iterdir() if p.is_dir())
    for candidate in candidates:
        if is_dataset(candidate):
            return candidate.resolve()
    raise ValueError(f"{field}={directory}: found no {what} in it or in its subfolders")


# ----------------------------------------------------------------------------------------------
# Native CUB-200-2011 and Cars196 folders.


def _read_table(path: Path, columns: int) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=columns - 1)
            if len(fields) != columns:
                raise ValueError(f"{path}:{number}: expected {columns} fields, got {line!r}")
            rows.append(fields)
    return rows


def cub_folder(directory, *, field: str = "data.dir") -> Dataset:
    """The native ``CUB_200_2011/`` folder (images.txt, image_class_labels.txt, classes.txt).

    Classes 1–100 train, 101–200 test (method.md §5).

    Args:
      directory: str or path-like, the CUB_200_2011 folder or its parent.
      field: the config field to name in error messages (default "data.dir").

    Returns:
      ``Dataset`` with split "all" (both splits; ``subset("train")`` / ``subset("test")`` take
      one): items, labels i32[N] 0-based over all classes, class names, is_train bool[N].

    Raises:
      ValueError: naming ``field``: not a directory, or no CUB folder in it or its subfolders; a
        malformed table line (naming file and line) or an image without a class.
    """
    root = _locate(directory, lambda p: (p / "images.txt").is_file() and (p / "images").is_dir(),
                   "CUB_200_2011 folder (images.txt and images/)", field)
    paths = {int(i): path.strip() for i, path in _read_table(root / "images.txt", 2)}
    class_of = {int(i): int(c) for i, c in _read_table(root / "image_class_labels.txt", 2)}
    names = {int(c): name.strip() for c, name in _read_table(root / "classes.txt", 2)}
    missing = sorted(set(paths) - set(class_of))
    if missing:
        raise ValueError(f"{root / 'image_class_labels.txt'}: no class for image ids "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    image_ids = sorted(paths)
    class_keys = [class_of[i] for i in image_ids]
    return _full_record(
        name="cub", source="folder", root=root,
        items=[os.path.join("images", paths[i]) for i in image_ids], class_keys=class_keys,
        class_names={c: names.get(c, str(c)) for c in set(class_keys)},
        train_classes=set(range(1, LAST_TRAIN_CLASS["cub"] + 1)), reader=ImageFiles(str(root)))


def cars_folder(directory, *, field: str = "data.dir") -> Dataset:
    """The native Cars196 folder: ``cars_annos.mat`` (read with scipy.io.loadmat) + ``car_ims/``.

    Classes 1–98 train, 99–196 test (the mat file's own train/test flags are the classification
    split and are ignored).

    Args:
      directory: str or path-like, the folder holding cars_annos.mat, or its parent.
      field: the config field to name in error messages (default "data.dir").

    Returns:
      ``Dataset`` with split "all" (both splits; ``subset("train")`` / ``subset("test")`` take
      one): items, labels i32[N] 0-based over all classes, class names, is_train bool[N].

    Raises:
      ValueError: naming ``field``: not a directory, or no cars_annos.mat in it or its
        subfolders.
    """
    import scipy.io

    root = _locate(directory, lambda p: (p / "cars_annos.mat").is_file(),
                   "Cars196 folder (cars_annos.mat)", field)
    mat = scipy.io.loadmat(root / "cars_annos.mat", squeeze_me=True)
    annotations = np.atleast_1d(mat["annotations"])
    items = [str(path) for path in np.atleast_1d(annotations["relative_im_path"])]
    class_keys = [int(c) for c in np.atleast_1d(annotations["class"])]
    names = [str(n) for n in np.atleast_1d(mat.get("class_names", np.array([], object)))]
    return _full_record(
        name="cars196", source="folder", root=root, items=items, class_keys=class_keys,
        class_names={c: names[c - 1] if 0 < c <= len(names) else str(c) for c in set(class_keys)},
        train_classes=set(range(1, LAST_TRAIN_CLASS["cars196"] + 1)),
        reader=ImageFiles(str(root)))


# ----------------------------------------------------------------------------------------------
# Class folders and Omniglot.


def _class_images(sub_root: Path) -> dict[str, list[str]]:
    """Class name (folder path relative to sub_root) -> sorted image paths relative to it.

    A class is any folder that directly holds image files, so both `root/<class>/<image>` and
    Omniglot's archive layout `root/<alphabet>/<character>/<image>` work. Hidden files skipped.
    """
    classes: dict[str, list[str]] = {}
    empty, other_files = [], 0
    for folder, subfolders, files in os.walk(sub_root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        visible = [f for f in files if not f.startswith(".")]
        images = sorted(f for f in visible if f.lower().endswith(IMAGE_EXTENSIONS))
        other_files += len(visible) - len(images)
        if not images:
            if not subfolders and folder != str(sub_root):  # a class folder with no image
                empty.append(os.path.relpath(folder, sub_root))
            continue
        relative = os.path.relpath(folder, sub_root)
        if relative == ".":
            raise ValueError(f"{sub_root}: holds images directly; expected one subfolder "
                             "per class (root/<class>/<image>)")
        classes[relative] = [os.path.join(relative, f) for f in images]
    if empty:
        shown = ", ".join(sorted(empty)[:5]) + (", ..." if len(empty) > 5 else "")
        logger.warning("%s: skipped %d class folder(s) without %s images (%s)", sub_root,
                       len(empty), "/".join(IMAGE_EXTENSIONS), shown)
    if other_files:
        logger.warning("%s: skipped %d file(s) that are not %s images", sub_root, other_files,
                       "/".join(IMAGE_EXTENSIONS))
    return classes


def class_folders(directory, *, split_dirs: Sequence[str] | None = None,
                  train_fraction: float = 0.5, name: str = "folder",
                  field: str = "data.dir") -> Dataset:
    """Images in class folders ``directory/<class>/<image>`` (PNG or JPEG): any dataset on disk.

    A class is any folder that directly holds images (so ``root/<alphabet>/<character>/`` works
    too); hidden files are skipped. Split: with ``split_dirs=(train_dir, test_dir)``, the classes
    under ``directory/train_dir`` train and those under ``directory/test_dir`` test; otherwise the
    sorted class list is cut and its first floor(train_fraction × C) classes train.

    Args:
      directory: str or path-like, the root folder.
      split_dirs: optional (train_dir, test_dir) folder names under ``directory`` (default None:
        cut the class list).
      train_fraction: share of the sorted classes that train when ``split_dirs`` is not given, a
        float giving each split at least one class (default 0.5).
      name: the record's name (default "folder"; part of the cache key).
      field: the config field to name in error messages (default "data.dir").

    Returns:
      ``Dataset`` with split "all" (both splits; ``subset("train")`` / ``subset("test")`` take
      one): items, labels i32[N] 0-based over all classes, class names, is_train bool[N].

    Raises:
      ValueError: naming ``field``: not a directory, a missing split folder, no images, images
        directly in a split root; ``split_dirs`` not two names; ``train_fraction`` leaving a split
        without classes.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ValueError(f"{field}={root}: not a directory")
    root = root.resolve()
    items, class_keys, train_classes = [], [], set()
    if split_dirs:
        if len(split_dirs) != 2:
            raise ValueError(f"split_dirs: expected two folder names (train, test), "
                             f"got {split_dirs!r}")
        for index, sub in enumerate(split_dirs):
            if not (root / sub).is_dir():
                raise ValueError(f"{field}={root}: has no folder {sub!r} (split_dirs)")
            for class_name, paths in sorted(_class_images(root / sub).items()):
                key = f"{sub}/{class_name}"
                items += [os.path.join(sub, p) for p in paths]
                class_keys += [key] * len(paths)
                if index == 0:
                    train_classes.add(key)
    else:
        classes = sorted(_class_images(root).items())
        num_train = int(np.floor(train_fraction * len(classes)))
        if not 0 < num_train < len(classes):
            raise ValueError(
                f"train_fraction={train_fraction}: gives {num_train} of {len(classes)} classes "
                f"under {root} to training; each split needs at least one class")
        for class_name, paths in classes:
            items += paths
            class_keys += [class_name] * len(paths)
        train_classes = {class_name for class_name, _ in classes[:num_train]}
    if not items:
        raise ValueError(f"{field}={root}: found no {'/'.join(IMAGE_EXTENSIONS)} images")
    return _full_record(name=name, source="folder", root=root, items=items,
                        class_keys=class_keys, class_names={k: k for k in set(class_keys)},
                        train_classes=train_classes, reader=ImageFiles(str(root)))


def _is_omniglot(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in OMNIGLOT_SPLIT_DIRS)


def omniglot_folder(directory, *, field: str = "data.dir") -> Dataset:
    """Omniglot: ``images_background/`` (964 training classes), ``images_evaluation/`` (659 test).

    A class is a character folder (with or without the alphabet level of the official archives).

    Args:
      directory: str or path-like, the folder holding both subfolders, or its parent.
      field: the config field to name in error messages (default "data.dir").

    Returns:
      ``Dataset`` with split "all" (both splits; ``subset("train")`` / ``subset("test")`` take
      one): items, labels i32[N] 0-based over all classes, class names, is_train bool[N].

    Raises:
      ValueError: naming ``field``: not a directory, or no Omniglot folder in it or its
        subfolders.
    """
    root = _locate(directory, _is_omniglot,
                   "Omniglot folder (images_background/ and images_evaluation/)", field)
    return class_folders(root, split_dirs=OMNIGLOT_SPLIT_DIRS, name="omniglot", field=field)


def download_omniglot(cache_dir, *, base_url: str = OMNIGLOT_URL,
                      archives: dict[str, tuple[int, str]] | None = None,
                      timeout: float = 30.0) -> Path:
    """Downloads and unpacks the two official Omniglot archives once; returns the folder.

    Each archive is fetched from ``base_url + name`` (https, or file:// for tests), checked
    against its size and sha256, and unpacked into a temporary folder that is renamed to
    ``cache_dir/omniglot`` only when complete; a complete folder is reused without downloading.

    Args:
      cache_dir: str or path-like; downloads go to ``cache_dir/downloads``, the data to
        ``cache_dir/omniglot``.
      base_url: URL prefix of the archives (default: the official GitHub folder).
      archives: optional {file name: (size in bytes, sha256 hex)} (default: the two official
        archives).
      timeout: seconds per connection attempt (default 30.0).

    Returns:
      ``pathlib.Path`` of the unpacked folder (images_background/ and images_evaluation/).

    Raises:
      DownloadError: a download failed (offline: the message names ``--config.data.dir`` as the
        alternative) or did not verify.
      ValueError: the archives do not unpack to the two Omniglot folders.
    """
    archives = OMNIGLOT_ARCHIVES if archives is None else archives
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / "omniglot"
    if _is_omniglot(target):
        return target.resolve()
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for archive, (size, sha256) in archives.items():
        _fetch_verified(base_url + archive, downloads / archive, size, sha256, timeout)
    staging = Path(tempfile.mkdtemp(prefix="omniglot.partial-", dir=cache_dir))
    try:
        for archive in archives:
            with zipfile.ZipFile(downloads / archive) as zf:
                zf.extractall(staging)
        if not _is_omniglot(staging):
            raise ValueError(f"the archives {sorted(archives)} do not unpack to "
                             f"{' and '.join(OMNIGLOT_SPLIT_DIRS)}")
        try:
            os.replace(staging, target)
        except OSError:
            if not _is_omniglot(target):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target.resolve()


def _fetch_verified(url: str, path: Path, size: int, sha256: str, timeout: float) -> None:
    if path.is_file() and path.stat().st_size == size and _file_sha256(path) == sha256:
        return
    partial = path.with_name(f"{path.name}.part-{uuid.uuid4().hex}")
    digest = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, \
                    open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as err:
            raise DownloadError(
                f"cannot download Omniglot from {url} ({err}). Offline? Put the unpacked "
                f"{' and '.join(OMNIGLOT_SPLIT_DIRS)} folders somewhere and pass "
                "--config.data.dir=PATH instead.") from err
        found_size = partial.stat().st_size
        if found_size != size or digest.hexdigest() != sha256:
            raise DownloadError(
                f"{url}: download failed verification: expected {size} bytes with sha256 "
                f"{sha256}, got {found_size} bytes with sha256 {digest.hexdigest()}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets.


def tfds_dataset(name: str, *, data_dir=None, cache_dir, progress: bool = True,
                 num_workers: int | None = None) -> Dataset:
    """CUB ("cub") or Cars196 ("cars196") from tfds array_record files, re-split by class.

    Both official splits are merged; tfds labels are 0-based, so official class id = label + 1.
    Reading a record decodes its image, so the labels of all records are read once (one pass, in
    parallel) and kept in a small JSON file in ``cache_dir`` keyed by the dataset version,
    data_dir and record counts.

    Args:
      name: "cub" or "cars196".
      data_dir: the tfds data_dir (default None: tfds's default).
      cache_dir: str or path-like folder of the label file (keyword-only, required).
      progress: show a progress bar while labels are read (default True).
      num_workers: threads reading labels, a positive int (default None: the CPU count).

    Returns:
      ``Dataset`` with split "all" (source "tfds"); classes 1–100 (CUB) or 1–98 (Cars) train.

    Raises:
      ValueError: naming ``data.name`` for another name; the tfds data not prepared in
        ``data_dir`` (the message says how to prepare it).
      ImportError: tensorflow_datasets is not installed.
    """
    import tensorflow_datasets as tfds

    if name not in TFDS_NAMES:
        raise ValueError(f"data.name={name!r}: tfds source supports {sorted(TFDS_NAMES)}")
    tfds_name = TFDS_NAMES[name]
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        records = tfds.data_source(tfds_name, split=list(_SPLITS), data_dir=data_dir,
                                   download=False)
        sources = dict(zip(_SPLITS, records, strict=True))
    except Exception as err:  # any failure here means "not prepared"
        raise ValueError(
            f"cannot open tfds {tfds_name} (data_dir={data_dir}). Prepare it once (README, "
            "'Datasets'): pip install -e '.[tf]', then "
            f"tfds.builder('{tfds_name}', data_dir=DIR).download_and_prepare("
            "file_format='array_record'); or read the native folder with "
            f"--config.data.dir=PATH. Cause: {type(err).__name__}: {err}") from err
    reader = TfdsImages(name=tfds_name, version=str(builder.info.version),
                        data_dir=str(builder.data_dir), sources=sources)
    items = [f"{split}/{i}" for split in _SPLITS for i in range(len(sources[split]))]
    labels, label_names = _tfds_labels(reader, items, cache_dir, progress, num_workers)
    names = list(builder.info.features["label"].names)
    class_keys = [label + 1 for label in labels]
    return _full_record(
        name=name, source="tfds", root=reader.data_dir, items=items, class_keys=class_keys,
        class_names={c: label_names.get(str(c - 1)) or names[c - 1] for c in set(class_keys)},
        train_classes=set(range(1, LAST_TRAIN_CLASS[name] + 1)), reader=reader)


def _tfds_labels(reader: TfdsImages, items, cache_dir, progress, num_workers):
    """Label (and label_name, where the builder has one) of every record; cached as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    key = reader.fingerprint(items)
    path = Path(cache_dir).expanduser() / f"tfds-{reader.name}-{reader.version}-{key[:16]}.json"
    if path.is_file():
        with open(path) as f:
            stored = json.load(f)
        if stored.get("key") == key and len(stored.get("labels", ())) == len(items):
            return stored["labels"], stored["label_names"]

    def read(item):
        record = reader.record(item)
        return int(record["label"]), str(record.get("label_name", ""))

    with ThreadPoolExecutor(num_workers or os.cpu_count()) as pool:
        pairs = list(tqdm(pool.map(read, items), total=len(items), disable=not progress,
                          desc=f"labels of {reader.name}", unit="rec"))
    labels = [label for label, _ in pairs]
    label_names = {str(label): label_name for label, label_name in pairs if label_name}
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_json_atomically(path, {"key": key, "labels": labels, "label_names": label_names})
    return labels, label_names


# ----------------------------------------------------------------------------------------------
# Official sizes (method.md §5).


def check_official_counts(dataset: Dataset, *, strict: bool = True) -> dict[str, int]:
    """Checks the train/test image counts of CUB, Cars196 and Omniglot; returns the counts.

    Guards against a partial or differently split dataset (method.md §5). Other datasets are not
    checked.

    Args:
      dataset: a full ``Dataset`` record (both splits).
      strict: raise on a mismatch (default True); False logs a warning instead.

    Returns:
      {"train": int, "test": int} image counts.

    Raises:
      ValueError: with ``strict``, counts that differ from the official ones (the message gives
        both and the override ``--config.data.strict_counts=False``).
    """
    counts = dataset.counts()
    expected = OFFICIAL_COUNTS.get(dataset.name)
    if expected is None or (counts["train"], counts["test"]) == expected:
        return counts
    message = (f"{dataset.name}: expected {expected[0]:,} train / {expected[1]:,} test images "
               f"(the official class split), found {counts['train']:,} / {counts['test']:,} "
               f"in {dataset.root}")
    if strict:
        raise ValueError(f"{message}. To run anyway, pass --config.data.strict_counts=False.")
    logger.warning("%s; going on because data.strict_counts=False", message)
    return counts
