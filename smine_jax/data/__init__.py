"""Datasets: sources, the decoded image cache, batches and on-device augmentation.

Entry points for training code:

    split = data.load(config.data, split="train")   # ImageSplit: images (memmap), labels, ...
    train_fn, eval_fn = data.preprocessors(config.data)   # call inside the jitted step
    batch = train_fn(key, data.device_batch(split.images, ids))

The `config.data` section (an `ml_collections.ConfigDict`; `default_config()` gives one):

    name            "cub" | "cars196" | "omniglot" | "folder" (any class-folder tree);
                    aliases "cub200", "caltech_birds2011", "cars".
    source          "tfds" | "folder" | "" (default: "folder" when `dir` is set, else "tfds";
                    always "folder" for omniglot and folder). Omniglot with no `dir` is
                    downloaded once into `cache_dir` (~15 MB).
    dir             the dataset folder (e.g. CUB_200_2011/, the folder with cars_annos.mat, the
                    one with images_background/ and images_evaluation/) or its parent; for
                    source "tfds", the tfds data_dir ("" = the tfds default).
    strict_counts   True: CUB must give 5,864 / 5,924 train / test images, Cars 8,054 / 8,131,
                    Omniglot 19,280 / 13,180, else the run stops; False: the counts are logged.
    image_size      S of the cache, uint8 [N, S, S, C]; images squashed to S × S (256: method.md
                    §5).
    crop_size       random crop (training) and centre crop (evaluation); 227 (224 for the
                    torchvision-layout GoogLeNet).
    channels        3 (grey and palette images become RGB) or 1 (colour becomes luminance).
    flip            random horizontal flip in training.
    cache_dir       where caches and downloads go ("" = $SMINE_JAX_CACHE or ~/.cache/smine_jax).
    mean, std       normalisation (x / 255 - mean) / std, [0, 1] units, 1 or C values
                    (default: ImageNet statistics).
    split_dirs      class folders only: (train_subfolder, test_subfolder); () = cut the sorted
                    class list at `train_fraction` (first classes train).
    train_fraction  see split_dirs (default 0.5, as CUB and Cars split their classes in half).
    val_classes     training classes held out as the validation split (the paper's held-out
                    set, for model selection and every tuned choice; never trained on): a share
                    in [0, 1) (⌊share × classes⌋; none when that is below 2 classes or 9
                    images) or a count >= 2 (of 9 images or more); 0 = none. Default 0.1: 96
                    of Omniglot's 964, 10 of CUB's 100, 9 of Cars' 98 training classes.
                    Official counts still refer to the whole training split.
    val_seed        which classes are held out: a uniform draw seeded by it (default 0, the
                    same classes for every training seed).
    skip_unreadable False (default): an image that does not decode stops the run with its
                    path; True: such images are left out of their split, with a warning and
                    their count in the workdir's config.json (that split is then held in
                    memory instead of memory-mapped).
    download_url    base URL of the Omniglot archives (tests point it at a local server).
    num_workers     decoding threads for the cache build (0 = number of CPUs).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import numpy as np

from smine_jax.data import sources
from smine_jax.data.cache import build_cache, cache_key, cache_path, cached_images
from smine_jax.data.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InferenceBatch,
    augment,
    center_crop,
    device_batch,
    gather,
    inference_batches,
    m_per_class_batches,
    normalise,
    prefetch_batches,
    random_crop_flip,
    shard_ids,
)
from smine_jax.data.sources import (
    Dataset,
    DownloadError,
    ImageReadError,
    cars_folder,
    check_official_counts,
    class_folders,
    cub_folder,
    download_omniglot,
    omniglot_folder,
    tfds_dataset,
)

__all__ = [
    "Dataset", "DownloadError", "ImageReadError", "ImageSplit", "InferenceBatch", "augment",
    "build_cache", "build_dataset",
    "cache_key", "cache_path", "cached_images", "cars_folder", "center_crop",
    "check_official_counts", "class_folders", "cub_folder", "default_config", "device_batch",
    "download_omniglot", "gather", "inference_batches", "load", "m_per_class_batches", "shard_ids",
    "normalise", "omniglot_folder", "prefetch_batches", "preprocessors", "random_crop_flip",
    "resolve_config", "split_validation", "tfds_dataset", "validation_classes",
]

logger = logging.getLogger(__name__)

DEFAULTS = {
    "name": "cub", "source": "", "dir": "", "strict_counts": True, "image_size": 256,
    "crop_size": 227, "channels": 3, "flip": True, "cache_dir": "", "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD, "split_dirs": (), "train_fraction": 0.5,
    "download_url": sources.OMNIGLOT_URL, "num_workers": 0, "val_classes": 0.1, "val_seed": 0,
    "skip_unreadable": False,
}
SPLITS = ("train", "val", "test")
# The fewest validation images the evaluation takes (Recall@8 needs 8 other images a query).
MIN_VALIDATION_IMAGES = 9
_ALIASES = {"cub200": "cub", "caltech_birds2011": "cub", "cars": "cars196"}
_NAMES = ("cub", "cars196", "omniglot", "folder")


def default_config():
    """A ``config.data`` ConfigDict with every field at its default (the base of every config file).

    Returns:
      ``ml_collections.ConfigDict`` with the fields of the module docstring (name "cub", source
      "", image_size 256, crop_size 227, channels 3, val_classes 0.1, ...).

    Raises:
      ImportError: ml_collections is not installed.
    """
    import ml_collections

    return ml_collections.ConfigDict(dict(DEFAULTS))


def resolve_config(config_data) -> dict:
    """The data fields as a plain dict: defaults filled in, name and source resolved, checked.

    The single validation point of ``config.data``: every other data entry point goes through it.

    Args:
      config_data: the ``config.data`` section: an ``ml_collections.ConfigDict`` or a mapping of
        its fields (name, source, dir, strict_counts, image_size, crop_size, channels, flip,
        cache_dir, mean, std, split_dirs, train_fraction, val_classes, val_seed,
        skip_unreadable, download_url, num_workers; see the module docstring); missing or None
        fields take their defaults.

    Returns:
      dict with every field: ``name`` canonical ("cub", "cars196", "omniglot", "folder"),
      ``source`` resolved ("tfds" or "folder"), ``dir`` and ``cache_dir`` as str (``cache_dir``
      defaults to $SMINE_JAX_CACHE or ~/.cache/smine_jax), ``mean``/``std`` tuples of floats,
      ``val_classes`` a float share or an int count, the integers as int.

    Raises:
      ValueError: naming ``data.<field>``: an unknown field, an unknown name or source, tfds for
        a dataset that tfds does not hold, image_size or crop_size < 1, crop_size > image_size,
        channels not 1 or 3, mean/std with neither 1 nor C values or std not positive,
        val_classes neither a share in [0, 1) nor a count >= 2, a non-integer val_seed, a
        non-bool skip_unreadable.
    """
    given = dict(config_data.items()) if hasattr(config_data, "items") else dict(config_data)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.data: unknown fields {unknown}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    name = _ALIASES.get(str(cfg["name"]).lower(), str(cfg["name"]).lower())
    if name not in _NAMES:
        raise ValueError(f"data.name={cfg['name']!r}: expected one of {_NAMES} "
                         f"(or an alias: {sorted(_ALIASES)})")
    cfg["name"] = name
    cfg["dir"] = str(cfg["dir"] or "")
    if not cfg["source"]:
        only_folders = name not in sources.TFDS_NAMES  # Omniglot: downloaded into a folder
        cfg["source"] = "folder" if cfg["dir"] or only_folders else "tfds"
    if cfg["source"] not in ("tfds", "folder"):
        raise ValueError(f"data.source={cfg['source']!r}: expected 'tfds', 'folder' or ''")
    if cfg["source"] == "tfds" and name not in sources.TFDS_NAMES:
        raise ValueError(f"data.source='tfds': only {sorted(sources.TFDS_NAMES)} come from "
                         f"tfds; {name!r} is read from folders (source 'folder')")
    for field, minimum in (("image_size", 1), ("crop_size", 1), ("num_workers", 0)):
        value = cfg[field]
        if isinstance(value, bool) or int(value) != value or value < minimum:
            raise ValueError(f"data.{field}: expected an integer >= {minimum}, got {value!r}")
        cfg[field] = int(value)
    if cfg["crop_size"] > cfg["image_size"]:
        raise ValueError(f"data.crop_size={cfg['crop_size']}: larger than data.image_size="
                         f"{cfg['image_size']}")
    if cfg["channels"] not in (1, 3) or isinstance(cfg["channels"], bool):
        raise ValueError(f"data.channels: expected 1 or 3, got {cfg['channels']!r}")
    for field in ("mean", "std"):
        values = tuple(float(v) for v in np.atleast_1d(cfg[field]))
        if len(values) not in (1, cfg["channels"]):
            raise ValueError(f"data.{field}: expected 1 or {cfg['channels']} values (one per "
                             f"channel), got {len(values)}")
        cfg[field] = values
    value = cfg["val_classes"]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value < 0 or (value >= 1 and int(value) != value) \
            or value == 1:
        raise ValueError(f"data.val_classes: expected a share in [0, 1) or a count >= 2 of "
                         f"training classes, got {value!r}")
    cfg["val_classes"] = float(value) if value < 1 else int(value)
    if not isinstance(cfg["skip_unreadable"], (bool, np.bool_)):
        raise ValueError(f"data.skip_unreadable: expected True or False, got "
                         f"{cfg['skip_unreadable']!r}")
    if isinstance(cfg["val_seed"], bool) or int(cfg["val_seed"]) != cfg["val_seed"]:
        raise ValueError(f"data.val_seed: expected an integer, got {cfg['val_seed']!r}")
    cfg["val_seed"] = int(cfg["val_seed"])
    if min(cfg["std"]) <= 0:
        raise ValueError(f"data.std: expected positive values, got {cfg['std']}")
    cfg["split_dirs"] = tuple(cfg["split_dirs"] or ())
    cfg["cache_dir"] = str(Path(cfg["cache_dir"] or os.environ.get(
        "SMINE_JAX_CACHE", "~/.cache/smine_jax")).expanduser())
    return cfg


def build_dataset(config_data, *, progress: bool = True) -> Dataset:
    """The full record (both splits) that ``config_data`` names, official counts checked.

    Lists the dataset's images and labels (no decoding; Omniglot without ``dir`` is downloaded
    once into ``cache_dir``). Pass the result to ``load`` to load several splits without listing
    the data twice.

    Args:
      config_data: the ``config.data`` section: an ``ml_collections.ConfigDict`` or a mapping of
        its fields (name, source, dir, strict_counts, image_size, crop_size, channels, flip,
        cache_dir, mean, std, split_dirs, train_fraction, val_classes, val_seed,
        skip_unreadable, download_url, num_workers; see the module docstring); missing or None
        fields take their defaults.
      progress: show a progress bar while tfds labels are read (default True).

    Returns:
      ``Dataset`` with split "all": items, labels i32[N], class names, is_train bool[N].

    Raises:
      ValueError: a bad config field (as ``resolve_config``, naming ``data.<field>``);
        ``data.dir`` missing for a folder source or not holding the dataset; tfds data not
        prepared; official train/test counts that differ with ``strict_counts``.
      DownloadError: the Omniglot download failed or did not verify.
    """
    cfg = resolve_config(config_data)
    name, directory = cfg["name"], cfg["dir"]
    if cfg["source"] == "folder" and not directory and name != "omniglot":
        raise ValueError(f"data.dir: source 'folder' needs the {name} directory "
                         "(--config.data.dir=PATH)")
    if name == "omniglot":
        root = directory or sources.download_omniglot(cfg["cache_dir"],
                                                      base_url=cfg["download_url"])
        dataset = sources.omniglot_folder(root)
    elif cfg["source"] == "tfds":
        dataset = sources.tfds_dataset(name, data_dir=directory or None,
                                       cache_dir=cfg["cache_dir"], progress=progress,
                                       num_workers=cfg["num_workers"] or None)
    elif name == "cub":
        dataset = sources.cub_folder(directory)
    elif name == "cars196":
        dataset = sources.cars_folder(directory)
    else:
        dataset = sources.class_folders(directory, split_dirs=cfg["split_dirs"],
                                        train_fraction=cfg["train_fraction"])
    counts = sources.check_official_counts(dataset, strict=cfg["strict_counts"])
    logger.info("%s (%s, %s): %d train / %d test images, %d classes", dataset.name,
                dataset.source, dataset.root, counts["train"], counts["test"],
                dataset.num_classes)
    return dataset


def preprocessors(config_data):
    """(train_fn(key, images), eval_fn(images)) with the configured crop, flip, mean and std.

    Both are pure functions of uint8[B, S, S, C] batches, to call inside the jitted step:
    ``train_fn`` is ``augment`` (random crop, flip, normalisation), ``eval_fn`` is
    ``center_crop``; both return float32 [B, crop_size, crop_size, C].

    Args:
      config_data: the ``config.data`` section: an ``ml_collections.ConfigDict`` or a mapping of
        its fields (name, source, dir, strict_counts, image_size, crop_size, channels, flip,
        cache_dir, mean, std, split_dirs, train_fraction, val_classes, val_seed,
        skip_unreadable, download_url, num_workers; see the module docstring); missing or None
        fields take their defaults.

    Returns:
      (train_fn, eval_fn), two callables.

    Raises:
      ValueError: a bad config field, naming ``data.<field>``.
    """
    cfg = resolve_config(config_data)
    common = dict(crop_size=cfg["crop_size"], mean=cfg["mean"], std=cfg["std"])
    return (functools.partial(augment, flip=bool(cfg["flip"]), **common),
            functools.partial(center_crop, **common))


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split, ready for training or evaluation.

    Attributes:
      dataset: the split's record (sample id i = row i; labels 0..C_split-1).
      images: read-only memory-mapped uint8 [N, S, S, C] cache, row i = sample i.
      counts: train / test image counts of the whole dataset (for the log and the workdir).
      skipped: the images left out because they do not decode (`data.skip_unreadable`), as
        "path: reason" lines.
    """

    dataset: Dataset
    images: np.ndarray
    counts: dict
    skipped: tuple[str, ...] = ()

    @property
    def labels(self) -> np.ndarray:
        return self.dataset.labels

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset)


def validation_classes(num_classes: int, val_classes, *, seed: int = 0) -> np.ndarray:
    """The labels (sorted) of the training classes held out for validation (method.md §4).

    Args:
      num_classes: C, the number of training classes (labels 0..C-1).
      val_classes: a share in [0, 1) (⌊share × C⌋ classes, none when that is below 2) or a count
        >= 2; 0 = none.
      seed: integer seed of the uniform draw of the classes (default 0).

    Returns:
      numpy i32[V] sorted labels in [0, C); V = 0 when nothing is held out.

    Raises:
      ValueError: naming ``data.val_classes``: a count below 2, or fewer than 2 training classes
        would remain.
    """
    count = (int(np.floor(val_classes * num_classes)) if val_classes < 1 else int(val_classes))
    if val_classes < 1 and count < 2:
        return np.zeros(0, np.int32)
    if count < 2:
        raise ValueError(f"data.val_classes={val_classes!r}: a count must be >= 2 (retrieval "
                         "needs two classes)")
    if count > num_classes - 2:
        raise ValueError(f"data.val_classes={val_classes!r}: holds out {count} of the "
                         f"{num_classes} training classes; at least 2 must remain to train on")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_classes, size=count, replace=False)).astype(np.int32)


def split_validation(train: Dataset, val_classes, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train minus the validation classes, the validation classes) of a training record.

    Each record has its labels re-indexed 0-based; ``validation_classes`` picks the classes.

    Args:
      train: the training ``Dataset`` (e.g. ``build_dataset(...).subset("train")``).
      val_classes: a share in [0, 1) or a count >= 2 of the training classes; 0 = none.
      seed: integer seed of the draw of the classes (default 0).

    Returns:
      (kept, val): two ``Dataset`` records with splits "train" and "val"; ``val`` is empty when
      no class is held out.

    Raises:
      ValueError: naming ``data.val_classes`` (see ``validation_classes``).
    """
    held_out = np.isin(train.labels, validation_classes(train.num_classes, val_classes,
                                                        seed=seed))
    return (train.select(np.flatnonzero(~held_out), split="train"),
            train.select(np.flatnonzero(held_out), split="val"))


def _validation_split(train: Dataset, val_classes, seed: int):
    """(training record, validation record or None) for `data.val_classes`: a share that
    leaves fewer than MIN_VALIDATION_IMAGES images holds nothing out (logged); a count that
    does is a ValueError naming data.val_classes."""
    if not val_classes:
        return train, None
    kept, val = split_validation(train, val_classes, seed=seed)
    if not len(val):  # a share below two classes: nothing held out
        return train, None
    if len(val) >= MIN_VALIDATION_IMAGES:
        return kept, val
    if isinstance(val_classes, int):
        raise ValueError(f"data.val_classes={val_classes}: the validation classes hold "
                         f"{len(val)} images; evaluating them needs at least "
                         f"{MIN_VALIDATION_IMAGES} (Recall@8), so hold out more classes or 0")
    logger.warning("data.val_classes=%s holds out %d images, fewer than the %d an evaluation "
                   "needs: no validation split", val_classes, len(val), MIN_VALIDATION_IMAGES)
    return train, None


def load(config_data, *, split: str, dataset: Dataset | None = None,
         progress: bool = True) -> ImageSplit | None:
    """The ``split`` ("train", "val" or "test") of the configured dataset with its image cache.

    "train" leaves out the validation classes (``data.val_classes``), "val" is those classes.
    The cache is built on first use (every image decoded once, in parallel, resized to
    image_size²) and memory-mapped afterwards.

    Args:
      config_data: the ``config.data`` section: an ``ml_collections.ConfigDict`` or a mapping of
        its fields (name, source, dir, strict_counts, image_size, crop_size, channels, flip,
        cache_dir, mean, std, split_dirs, train_fraction, val_classes, val_seed,
        skip_unreadable, download_url, num_workers; see the module docstring); missing or None
        fields take their defaults.
      split: "train", "val" or "test" (keyword-only).
      dataset: optional ``Dataset`` from ``build_dataset`` (default None: built here), to load
        several splits without listing the data twice.
      progress: show progress bars (default True).

    Returns:
      ``ImageSplit`` (dataset, images uint8[N, S, S, C] read-only memory map, counts, skipped;
      ``labels`` i32[N] 0-based), or None for "val" when no class is held out.

    Raises:
      ValueError: ``split`` unknown; a bad config field, naming ``data.<field>``; a validation
        split too small to evaluate.
      ImageReadError: an image does not decode (without ``data.skip_unreadable``).
      DownloadError: the Omniglot download failed.
    """
    cfg = resolve_config(config_data)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    full = dataset if dataset is not None else build_dataset(config_data, progress=progress)
    part = full.subset("test" if split == "test" else "train")
    if split != "test":
        train, val = _validation_split(part, cfg["val_classes"], cfg["val_seed"])
        part = train if split == "train" else val
        if split == "val" and val is None:
            return None
    cached = build_cache(part, cfg["cache_dir"], image_size=cfg["image_size"],
                         channels=cfg["channels"], num_workers=cfg["num_workers"] or None,
                         progress=progress, skip_unreadable=cfg["skip_unreadable"])
    images, skipped = cached.images, ()
    if cached.unreadable:  # left out: the readable rows, in memory
        bad = sorted(cached.unreadable)
        keep = np.setdiff1d(np.arange(len(part)), bad)
        skipped = tuple(cached.unreadable[i] for i in bad)
        logger.warning("%s %s: left out %d unreadable image(s) (data.skip_unreadable), e.g. %s",
                       part.name, split, len(skipped), skipped[0])
        part, images = part.select(keep, split=part.split), np.asarray(images[keep])
        images.setflags(write=False)
    return ImageSplit(dataset=part, images=images, counts=full.counts(), skipped=skipped)
