"""Weight files and torchvision key mapping: what ``init_from`` loads and the converter writes.

    save_npz(variables, "model.npz")                    # a model's params + batch_stats
    variables = load_pretrained(variables, "googlenet_imagenet.npz")   # backbone replaced
    torchvision_key("params/layer1_0/conv1/kernel")     # -> "layer1.0.conv1.weight"

Kept apart from the model (``smine_jax.models``) because the file format and the torch
mapping are I/O: the converter (``convert.py``) and ``init_variables`` both use this module,
and it imports nothing from ``smine_jax.models``, so no import is circular.

**Weight files** (``.npz``: numpy's zip of ``.npy`` arrays; ``save_npz`` and the converter
write them, ``load_pretrained`` reads them). One array per leaf, keyed
``"<collection>/<module path>/<leaf>"`` with "/" separators, collection ``params`` or
``batch_stats``, Flax layouts and float32: e.g. ``params/conv1/conv/kernel`` [kh, kw, in, out],
``params/conv1/bn/scale``, ``batch_stats/conv1/bn/mean``, ``params/fc/kernel`` [in, out]. The
module path is relative to the backbone (a converter's output, possibly with the ImageNet
classifier ``fc``) or to the whole EmbeddingModel (``params/backbone/...``, ``params/head/...``:
what ``save_npz`` writes for a model's variables); both load. No other keys.

**torchvision keys** (``torchvision_key``): a path component ``<name>_<i>`` is the slot ``i`` of
a ``torch.nn.Sequential`` (``branch2_0`` ↔ ``branch2.0``, ``layer1_0`` ↔ ``layer1.0``,
``downsample_1`` ↔ ``downsample.1``); components are joined with "."; leaves ``kernel`` /
``scale`` ↔ ``weight``, ``bias`` ↔ ``bias``, batch-stats ``mean`` / ``var`` ↔ ``running_mean``
/ ``running_var``. Conv kernels transpose [kh, kw, in, out] ↔ [out, in, kh, kw], dense kernels
[in, out] ↔ [out, in]; ``num_batches_tracked`` and GoogLeNet's ``aux1`` / ``aux2`` have no
counterpart.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from smine_jax import fileio

__all__ = ["BACKBONE", "COLLECTIONS", "HEAD", "load_npz", "load_pretrained", "save_npz",
           "torchvision_key"]

logger = logging.getLogger(__name__)

# The variable collections a weight file holds, and the EmbeddingModel's top-level modules.
COLLECTIONS = ("params", "batch_stats")
HEAD = "head"
BACKBONE = "backbone"
# Classifier of a converted ImageNet backbone: dropped unless the target model has one too.
_CLASSIFIER = "fc"

_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}
_SEQUENTIAL_SLOT = re.compile(r"(.+)_(\d+)")


def torchvision_key(flat_key: str) -> str:
    """The torchvision state-dict key of a flat Flax key (the mapping of the module docstring).

    ``"params/inception3a/branch2_0/conv/kernel"`` -> ``"inception3a.branch2.0.conv.weight"``;
    a leading ``backbone/`` (a whole-model path) is skipped.
    """
    collection, *path = flat_key.split("/")
    if collection not in COLLECTIONS or len(path) < 2:
        raise ValueError(f"flat_key={flat_key!r}: expected '<params|batch_stats>/<module>/<leaf>'")
    if path[0] == BACKBONE:
        path = path[1:]
    leaf = _LEAF_NAMES.get((collection, path[-1]))
    if leaf is None:
        raise ValueError(f"flat_key={flat_key!r}: leaf {path[-1]!r} has no torchvision name")
    parts = []
    for name in path[:-1]:
        slot = _SEQUENTIAL_SLOT.fullmatch(name)
        parts.extend(slot.groups() if slot else (name,))
    return ".".join([*parts, leaf])


def _flatten(variables) -> dict[str, Any]:
    """{"params/a/b/kernel": leaf, ...} for the params and batch_stats collections."""
    flat = {}
    for collection in COLLECTIONS:
        if collection in variables:
            tree = traverse_util.flatten_dict(variables[collection], sep="/")
            flat.update({f"{collection}/{key}": value for key, value in tree.items()})
    return flat


def save_npz(variables, path) -> Path:
    """Writes the params and batch_stats of `variables` as a weight file (format above).

    Atomic: written to a temporary file in the same folder, then renamed over `path` (which is
    used exactly as given; no ".npz" is appended). bfloat16 leaves are stored as float32.
    """
    path = Path(path)
    flat = {}
    for key, value in _flatten(variables).items():
        array = np.asarray(jax.device_get(value))
        flat[key] = array.astype(np.float32) if array.dtype == jnp.bfloat16 else array
    if not flat:
        raise ValueError("variables: no 'params' or 'batch_stats' collection to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_atomically(path, lambda file: np.savez(file, **flat))
    return path


def load_npz(path) -> dict[str, np.ndarray]:
    """The flat {key: array} of a weight file (ValueError naming `path` if unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: weight file {str(path)!r} does not exist (model.init_from)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:  # not a zip / pickled objects / corrupt member
        raise ValueError(f"path: {str(path)!r} is not a readable .npz weight file: {error}") \
            from error


def _backbone_relative(keys) -> tuple[dict[str, str], list[str]]:
    """({backbone-relative key: key}, head keys) of the flat keys of a whole model or backbone.

    Whole-model keys (some ``<collection>/backbone/...``) lose the ``backbone/``; any other
    non-head key of a whole model is kept as it is (and will not match the backbone's keys).
    """
    keys = list(keys)
    whole_model = any(key.split("/")[1:2] == [BACKBONE] for key in keys)
    relative, head = {}, []
    for key in keys:
        collection, _, rest = key.partition("/")
        first, _, below = rest.partition("/")
        if first == HEAD:
            head.append(key)
        elif whole_model and first == BACKBONE:
            relative[f"{collection}/{below}"] = key
        else:
            relative[key] = key
    return relative, head


def load_pretrained(variables, path, *, allow_missing: bool = False,
                    allow_unexpected: bool = False) -> dict:
    """`variables` with the backbone's params and batch_stats replaced from a weight file.

    `variables`: an EmbeddingModel's ``{"params": {"backbone": ..., "head": ...},
    "batch_stats": ...}`` (or a bare backbone's). The file's ``head`` is dropped (the head is the
    new layer and keeps its initial values), and so is a classifier ``fc`` the model does not
    have. Every key of the backbone missing from the file, every key of the file the model does
    not have (unexpected) and every key whose shape differs (mis-shaped) is reported by name:
    a ValueError lists them all unless `allow_missing` / `allow_unexpected` (then they are
    logged; missing leaves keep their initial values); mis-shaped keys always stop. Values are
    cast to the model's dtype (float32).
    """
    file_arrays = load_npz(path)
    file_keys, file_head = _backbone_relative(file_arrays)
    model_flat = _flatten(variables)
    model_keys, _ = _backbone_relative(model_flat)
    model_relative = {key: model_flat[original] for key, original in model_keys.items()}
    dropped = file_head + [
        original for key, original in file_keys.items()
        if key.split("/")[1:2] == [_CLASSIFIER] and key not in model_relative]
    file_flat = {key: file_arrays[original] for key, original in file_keys.items()
                 if original not in dropped}
    missing = sorted(set(model_relative) - set(file_flat))
    unexpected = sorted(set(file_flat) - set(model_relative))
    misshaped = [
        f"{key}: file {tuple(np.shape(file_flat[key]))} {np.asarray(file_flat[key]).dtype}, "
        f"model {tuple(np.shape(model_relative[key]))}"
        for key in sorted(set(file_flat) & set(model_relative))
        if np.shape(file_flat[key]) != np.shape(model_relative[key])
        or not np.issubdtype(np.asarray(file_flat[key]).dtype, np.number)]
    problems = []
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped (never allowed): " + "; ".join(misshaped))
    if missing and not allow_missing:
        problems.append(f"{len(missing)} missing (in the model, not in the file; allow with "
                        f"model.allow_missing): " + ", ".join(missing))
    if unexpected and not allow_unexpected:
        problems.append(f"{len(unexpected)} unexpected (in the file, not in the model; allow "
                        f"with model.allow_unexpected): " + ", ".join(unexpected))
    if problems:
        raise ValueError(f"load_pretrained({str(path)!r}): the weight file does not match the "
                         "model:\n  " + "\n  ".join(problems))
    if dropped:
        logger.info("load_pretrained: dropped %d head/classifier keys: %s", len(dropped),
                    ", ".join(sorted(dropped)))
    if missing:
        logger.warning("load_pretrained: %d missing keys keep their initial values: %s",
                       len(missing), ", ".join(missing))
    if unexpected:
        logger.warning("load_pretrained: %d unexpected keys ignored: %s", len(unexpected),
                       ", ".join(unexpected))
    loaded = dict(model_flat)
    for key, value in file_flat.items():
        if key in model_relative:
            loaded[model_keys[key]] = jnp.asarray(value, dtype=model_relative[key].dtype)
    result = {key: value for key, value in dict(variables).items() if key not in COLLECTIONS}
    for collection in COLLECTIONS:
        if collection in variables:
            prefix = f"{collection}/"
            result[collection] = traverse_util.unflatten_dict(
                {key[len(prefix):]: value for key, value in loaded.items()
                 if key.startswith(prefix)}, sep="/")
    return result
