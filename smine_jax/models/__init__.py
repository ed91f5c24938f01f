"""Backbones + embedding head (method.md §1, §5): f(x) = L2-normalised linear map of backbone
features.

    model = build_model(config.model)                   # EmbeddingModel
    variables = init_variables(model, key, (1, 224, 224, 3), config.model)  # + init_from
    emb = model.apply(variables, images)                # eval: f32 [N, 64], unit rows
    emb, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    tx = optax.multi_transform({"backbone": sgd(lr), "head": sgd(10 * lr)},
                               param_labels(variables["params"]))

Backbones (NHWC float images, already normalised by the data pipeline):
  googlenet   GoogLeNet / Inception-v1, torchvision layout, batch norm (``googlenet.py``)
  resnet50    ResNet-50, torchvision layout, v1.5 (``resnet.py``)
  small_conv  ``depth`` × [conv 3×3 + BN + ReLU + max pool 2×2] for CPU work (``small.py``)

**Flax API: Linen.** The trainer is functional — a TrainState pytree goes through ``jax.jit``,
orbax saves it, ``NamedSharding`` places it, ``optax.multi_transform`` labels its parameters by
path. Linen keeps the state outside the module: ``init`` returns a plain nested dict
``{"params", "batch_stats"}`` and ``apply`` is a pure function of (variables, images), which is
exactly what those four consume, with no conversion at the jit boundary; the dict paths are
also the weight-file keys and map one-to-one onto torchvision's state-dict keys. NNX (Flax's
newer, object-oriented API) keeps parameters and batch statistics inside mutable Python
objects; a functional trainer must ``nnx.split`` / ``nnx.merge`` them around every jitted step
(or move to ``nnx.jit`` and its own state tracking), which buys nothing here: the models are
fixed architectures, with no in-place surgery or Python-side state. Linen is maintained in
Flax 0.12 and is what flax's ``examples/imagenet`` and big_vision use.

**Parameters and dtype.** Parameters, batch statistics, the head and the embedding are float32;
``dtype="bfloat16"`` only sets the backbone's activation/compute dtype (batch-norm reductions
stay float32). The head is the only new layer (``params/head``); the L2 normalisation is safe:
a zero feature vector gives a zero embedding and finite gradients, never NaN.

**Weight files and torchvision keys** (``save_npz``, ``load_npz``, ``load_pretrained``,
``torchvision_key``; re-exported here) live in ``weights.py``, next to the converter
``convert.py``: the file format, the key mapping and the loader.

Config (``config.model``, see ``default_config``): ``name``, ``embedding_dim`` (64), ``dtype``
("float32" | "bfloat16"), ``init_from`` (weight file or None), ``allow_missing`` /
``allow_unexpected``; googlenet: ``transform_input`` (True), ``dropout_rate`` (0.0); small_conv:
``width`` (64), ``depth`` (4), ``pooling`` ("avg"). Fields of another architecture are ignored
(so ``--config.model.name=...`` can switch architecture); unknown fields are an error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smine_jax import validation
from smine_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from smine_jax.models.googlenet import GoogLeNet
from smine_jax.models.resnet import ResNet50
from smine_jax.models.small import POOLINGS, SmallConvNet
from smine_jax.models.weights import (
    BACKBONE,
    COLLECTIONS,
    HEAD,
    load_npz,
    load_pretrained,
    save_npz,
    torchvision_key,
)

__all__ = [
    "EmbeddingModel", "GoogLeNet", "ModelSpec", "ResNet50", "SmallConvNet", "build_model",
    "default_config", "init_variables", "l2_normalise", "load_npz", "load_pretrained",
    "model_spec", "param_labels", "save_npz", "torchvision_key",
]

NAMES = ("googlenet", "resnet50", "small_conv")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_COMMON_FIELDS = {"name": "googlenet", "embedding_dim": 64, "dtype": "float32", "init_from": None,
                  "allow_missing": False, "allow_unexpected": False, "l2_normalise": True}
_ARCH_FIELDS = {
    "googlenet": {"transform_input": True, "dropout_rate": 0.0},
    "resnet50": {},
    "small_conv": {"width": 64, "depth": 4, "pooling": "avg"},
}
# The compile option that makes init_variables' one-off init program cheap to compile.
_FAST_COMPILE_OPTION = "xla_backend_optimization_level"


# ----------------------------------------------------------------------------------------------
# Preprocessing that belongs to each architecture.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The input an architecture expects (preprocessing is part of the model).

    Attributes:
      name: architecture name.
      input_size: side of the (centre / random) crop fed to the network; None: any size.
      image_size: side the images are resized to before cropping (method.md §5: 256); None: any.
      channels: 3 (RGB order, as torchvision's weights) or None (1 or 3 both work).
      mean, std: per-channel normalisation (x / 255 - mean) / std in [0, 1] units; None: none
        fixed (the data config chooses).
    """

    name: str
    input_size: int | None = None
    image_size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def data_defaults(self) -> dict[str, Any]:
        """The ``config.data`` fields it fixes: crop_size, image_size, channels, mean, std."""
        fields = {"crop_size": self.input_size, "image_size": self.image_size,
                  "channels": self.channels, "mean": self.mean, "std": self.std}
        return {key: value for key, value in fields.items() if value is not None}


_IMAGENET = dict(input_size=224, image_size=256, channels=3, mean=tuple(IMAGENET_MEAN),
                 std=tuple(IMAGENET_STD))
_SPECS = {
    "googlenet": ModelSpec("googlenet", **_IMAGENET),
    "resnet50": ModelSpec("resnet50", **_IMAGENET),
    "small_conv": ModelSpec("small_conv"),
}


def _check_name(name) -> str:
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise ValueError(f"model.name={name!r}: expected one of {NAMES}")
    return name.lower()


def model_spec(name: str) -> ModelSpec:
    """The ModelSpec of architecture ``name``: the input size, channels and normalisation it needs.

    Args:
      name: "googlenet", "resnet50" or "small_conv" (case-insensitive).

    Returns:
      ``ModelSpec`` (input_size, image_size, channels, mean, std; None where any value works).

    Raises:
      ValueError: naming ``model.name`` for an unknown architecture.
    """
    return _SPECS[_check_name(name)]


# ----------------------------------------------------------------------------------------------
# The embedding model.


def l2_normalise(x, epsilon: float = 1e-12):
    """x / max(‖x‖₂, epsilon) along the last axis, in float32: unit embeddings (method.md §1).

    Safe at x = 0: the output is 0 and the gradient finite (the max cuts the 1/‖x‖ branch), as
    torch.nn.functional.normalize. Pure and jit-compatible.

    Args:
      x: real array [..., D] (any float dtype).
      epsilon: smallest norm divided by, a float > 0 (default 1e-12).

    Returns:
      jax.Array f32[..., D], each row of norm 1 (or 0 for a zero row).
    """
    x = x.astype(jnp.float32)
    squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, epsilon * epsilon))


class EmbeddingModel(nn.Module):
    """backbone features -> linear ``head`` (embedding_dim) -> L2 normalisation, float32 out.

    ``l2_normalise=False`` (``config.model.l2_normalise``) returns the head's raw output, as
    the lifted structured loss is defined (the ``lifted`` variant uses it: on unit vectors every
    J_ij stays above log(#negatives) + margin - 2 > 0). The N-pair loss is also defined on raw
    embeddings, but the ``npairs`` variant keeps unit vectors: unnormalised at lr 0.1 it diverged.

    ``__call__(images, train=False)``: images NHWC float [N, H, W, C], normalised. With
    ``train=True`` batch norm uses batch statistics: apply with ``mutable=["batch_stats"]``
    (and ``rngs={"dropout": key}`` for a GoogLeNet with dropout_rate > 0).
    """

    backbone: nn.Module
    embedding_dim: int = 64
    l2_normalise: bool = True

    @nn.compact
    def __call__(self, images, train: bool = False):
        if images.ndim != 4:
            raise ValueError(f"images: expected NHWC [N, H, W, C], got shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images: expected float images normalised by the data pipeline, "
                             f"got dtype {images.dtype}")
        features = self.backbone(images, train=train).astype(jnp.float32)
        embeddings = nn.Dense(self.embedding_dim, dtype=jnp.float32, param_dtype=jnp.float32,
                              name=HEAD)(features)
        return l2_normalise(embeddings) if self.l2_normalise else embeddings


def default_config(name: str = "googlenet"):
    """A ``config.model`` ConfigDict for architecture ``name``, every field at its default.

    Args:
      name: "googlenet" (default), "resnet50" or "small_conv".

    Returns:
      ``ml_collections.ConfigDict``: name, embedding_dim 64, dtype "float32", init_from None (a
      str placeholder), allow_missing False, allow_unexpected False, l2_normalise True, plus the
      architecture's own fields (googlenet: transform_input True, dropout_rate 0.0; small_conv:
      width 64, depth 4, pooling "avg").

    Raises:
      ValueError: naming ``model.name`` for an unknown architecture.
    """
    import ml_collections
    from ml_collections import config_dict

    fields = {**_COMMON_FIELDS, **_ARCH_FIELDS[_check_name(name)], "name": name.lower()}
    fields["init_from"] = config_dict.placeholder(str)  # None, overridable with a path
    return ml_collections.ConfigDict(fields)


def _boolean(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"model.{field}: expected True or False, got {value!r}")
    return bool(value)


def _resolve_config(model_config) -> dict[str, Any]:
    """The model fields as a plain dict: defaults filled in, checked (ValueError naming one)."""
    given = dict(model_config.items()) if hasattr(model_config, "items") else None
    if given is None:
        raise ValueError(f"config.model: expected a ConfigDict or mapping, got "
                         f"{type(model_config).__name__}")
    known = set(_COMMON_FIELDS).union(*map(set, _ARCH_FIELDS.values()))
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"config.model: unknown fields {unknown}; known: {sorted(known)}")
    name = _check_name(given.get("name", _COMMON_FIELDS["name"]))
    cfg = {**_COMMON_FIELDS, **_ARCH_FIELDS[name]}
    cfg.update({key: value for key, value in given.items() if key in cfg})
    cfg["name"] = name
    cfg["embedding_dim"] = validation.positive_int(cfg["embedding_dim"], "model.embedding_dim")
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"model.dtype={cfg['dtype']!r}: expected one of {tuple(DTYPES)}")
    for field in ("allow_missing", "allow_unexpected", "transform_input", "l2_normalise"):
        if field in cfg:
            cfg[field] = _boolean(cfg[field], field)
    init_from = cfg["init_from"]
    if init_from is not None and not isinstance(init_from, (str, os.PathLike)):
        raise ValueError(f"model.init_from: expected a file path or None, got {init_from!r}")
    cfg["init_from"] = os.fspath(init_from) if init_from else None
    if name == "googlenet":
        rate = cfg["dropout_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"model.dropout_rate: expected a number in [0, 1), got {rate!r}")
    if name == "small_conv":
        cfg["width"] = validation.positive_int(cfg["width"], "model.width")
        cfg["depth"] = validation.positive_int(cfg["depth"], "model.depth")
        if cfg["pooling"] not in POOLINGS:
            raise ValueError(f"model.pooling={cfg['pooling']!r}: expected one of {POOLINGS}")
    return cfg


def build_model(model_config) -> EmbeddingModel:
    """The ``EmbeddingModel`` that ``config.model`` describes: backbone -> linear head -> L2 norm.

    ``init_from`` is not read here: ``init_variables`` (or ``load_pretrained``) applies it.

    Args:
      model_config: the ``config.model`` section, an ``ml_collections.ConfigDict`` or a mapping:
        name ("googlenet" | "resnet50" | "small_conv"), embedding_dim (64), dtype ("float32" |
        "bfloat16"), init_from (weight file or None), allow_missing, allow_unexpected,
        l2_normalise; googlenet: transform_input, dropout_rate in [0, 1); small_conv: width,
        depth, pooling. Fields of another architecture are ignored; missing ones default.

    Returns:
      ``EmbeddingModel`` (a Flax Linen module); ``apply(variables, images)`` maps normalised
      float images [N, H, W, C] to f32[N, embedding_dim] embeddings.

    Raises:
      ValueError: naming the field (``config.model`` not a mapping, an unknown field, an unknown
        name or dtype, a bad embedding_dim, dropout_rate, width, depth, pooling or flag).
    """
    cfg = _resolve_config(model_config)
    dtype = DTYPES[cfg["dtype"]]
    if cfg["name"] == "googlenet":
        backbone = GoogLeNet(transform_input=cfg["transform_input"],
                             dropout_rate=float(cfg["dropout_rate"]), dtype=dtype)
    elif cfg["name"] == "resnet50":
        backbone = ResNet50(dtype=dtype)
    else:
        backbone = SmallConvNet(width=cfg["width"], depth=cfg["depth"], pooling=cfg["pooling"],
                                dtype=dtype)
    return EmbeddingModel(backbone=backbone, embedding_dim=cfg["embedding_dim"],
                          l2_normalise=cfg["l2_normalise"])


def init_variables(model: nn.Module, key, input_shape, model_config=None) -> dict:
    """The model's variables: ``model.init`` on zeros of ``input_shape``, then ``init_from`` if set.

    ``model.init`` runs jitted in eval mode; with ``model_config.init_from`` set,
    ``load_pretrained`` then loads that weight file with the config's allow_* flags. The init
    program is compiled without LLVM optimisation (it runs once): on XLA:CPU the ~60
    random-normal initialisers of GoogLeNet otherwise take ~20 s to compile, ~5 s so.

    Args:
      model: the ``EmbeddingModel`` (any Linen module with ``__call__(images, train=False)``).
      key: PRNG key of the initialisers.
      input_shape: (N, H, W, C) of the float32 zero images used to trace the model.
      model_config: optional ``config.model`` (default None: no weight file is loaded); only
        init_from, allow_missing and allow_unexpected are read.

    Returns:
      dict ``{"params": ..., "batch_stats": ...}`` of float32 arrays on the default device
      (shard them afterwards).

    Raises:
      ValueError: a bad ``config.model`` field; a weight file that is missing, unreadable, or
        whose keys or shapes do not match the model (unless the allow_* flags allow it).
    """
    images = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    lowered = jax.jit(lambda k, x: model.init(k, x, train=False)).lower(key, images)
    compiled = _compile_unoptimised(lowered)
    variables = dict(compiled(key, jnp.zeros(tuple(input_shape), jnp.float32)))
    if model_config is not None:
        cfg = _resolve_config(model_config)
        if cfg["init_from"]:
            variables = load_pretrained(variables, cfg["init_from"],
                                        allow_missing=cfg["allow_missing"],
                                        allow_unexpected=cfg["allow_unexpected"])
    return variables


def _compile_unoptimised(lowered):
    """`lowered` compiled at XLA backend optimisation level 0, or as usual on a backend that
    rejects that option (a runtime error naming it, e.g. "No such compile option"). Any other
    compile error propagates: a retry would only fail again, slower. Model bugs (a TypeError in
    ``__call__``) are raised earlier, by ``lower``.
    """
    try:
        return lowered.compile(compiler_options={_FAST_COMPILE_OPTION: 0})
    except RuntimeError as error:  # jax.errors.JaxRuntimeError, or older jaxlib's XlaRuntimeError
        if _FAST_COMPILE_OPTION not in str(error):
            raise
        return lowered.compile()


def param_labels(params) -> Any:
    """A pytree like ``params`` with "head" on the head's leaves and "backbone" elsewhere.

    For ``optax.multi_transform`` (the head trains with ×10 learning rate, method.md §5).

    Args:
      params: the ``variables["params"]`` pytree of an ``EmbeddingModel``.

    Returns:
      pytree of the same structure with str leaves "head" or "backbone".

    Raises:
      ValueError: naming ``params`` when given the whole variables dict instead.
    """
    if isinstance(params, Mapping) and set(params) & set(COLLECTIONS) and HEAD not in params:
        raise ValueError(f"params: got the variables dict (keys {sorted(params)}); pass "
                         "variables['params']")

    def label(path, _):
        first = path[0].key if path and hasattr(path[0], "key") else None
        return HEAD if first == HEAD else BACKBONE

    return jax.tree_util.tree_map_with_path(label, params)
