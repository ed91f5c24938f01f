"""torchvision ImageNet weights -> the project's weight file, no download at run time.

    python -m smine_jax.models.convert --arch googlenet --src googlenet.safetensors \
        --dst googlenet_imagenet.npz
    python -m experiments.cub ... --config.model.init_from=googlenet_imagenet.npz

or, in Python::

    state = read_state_dict("googlenet.safetensors")          # {torchvision key: array}
    variables, report = convert_state_dict("googlenet", state)
    weights.save_npz(variables, "googlenet_imagenet.npz")

**Input.** A torchvision state dict (``model.state_dict()``) as ``.safetensors`` (read with the
``safetensors`` package's numpy API: no torch needed) or ``.pth`` / ``.pt`` (``torch.load`` with
``weights_only=True``: needs torch). A training checkpoint that wraps the state dict under
``"state_dict"`` or ``"model"`` is unwrapped, and the ``module.`` prefix of a
``DataParallel`` / ``DistributedDataParallel`` model is stripped.

**Mapping.** The model's own leaves define it: every leaf of the backbone (``GoogLeNet`` /
``ResNet50`` without classifier) is looked up under ``weights.torchvision_key`` (the one
mapping of the package), conv kernels go from [out, in, kh, kw] to [kh, kw, in, out], dense
kernels from [out, in] to [in, out], batch-norm ``weight`` / ``bias`` become params
``scale`` / ``bias`` and ``running_mean`` / ``running_var`` batch_stats ``mean`` / ``var``;
values become float32. Every key of the state dict ends in exactly one of: converted; dropped
(the ImageNet classifier ``fc.*`` — the embedding head is new — and GoogLeNet's auxiliary
classifiers ``aux1.*`` / ``aux2.*``); ignored (the ``num_batches_tracked`` counter of a
converted batch norm); or unexpected. Model leaves without a key are missing, keys whose shape
(in torch's layout), dtype or values (NaN / inf) are wrong are mis-shaped; ``strict=True``
refuses any of these three with one ValueError that names them all.

**Output.** ``{"params": ..., "batch_stats": ...}`` relative to the backbone (with ``fc`` when
``keep_classifier``, e.g. to compare logits with torchvision), float32 numpy arrays, written by
``weights.save_npz``; ``config.model.init_from`` loads it through ``weights.load_pretrained``.

**Preprocessing** is part of the model: ``model_spec(arch)`` sets the data pipeline to RGB,
resize 256, crop 224 and ImageNet mean/std, which is torchvision's ``ToTensor`` + ``Normalize``.
GoogLeNet's ``transform_input`` (model config, default True) re-maps that input to the
(x - 0.5) / 0.5 scaling of the original Google weights exactly as torchvision's pretrained
``googlenet`` does (torchvision sets ``transform_input=True`` whenever it loads those weights),
so the converted model on the pipeline's images equals torchvision's model on torchvision's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from smine_jax.models import weights
from smine_jax.models.googlenet import GoogLeNet
from smine_jax.models.resnet import ResNet50

__all__ = ["ARCHS", "ConversionReport", "convert_state_dict", "main", "read_state_dict"]

ARCHS = ("googlenet", "resnet50")
# torchvision keys with no counterpart in the backbone: its classifiers (the head is new).
_CLASSIFIER_PREFIXES = {"googlenet": ("fc.", "aux1.", "aux2."), "resnet50": ("fc.",)}
_KEEP_CLASSIFIER = "fc."
_BN_COUNTER = ".num_batches_tracked"
_WRAPPER_KEYS = ("state_dict", "model")
_PARALLEL_PREFIX = "module."
_TORCH_SUFFIXES = (".pth", ".pt")
_SAFETENSORS_SUFFIX = ".safetensors"
_TORCH_HINT = ("reading a .pth / .pt file needs torch (pip install torch, or smine_jax[convert]); "
               "or, where torch is installed, save the state dict with "
               "safetensors.torch.save_file(model.state_dict(), 'FILE.safetensors') and "
               "convert that (no torch needed)")
EXIT_USAGE = 2


# ----------------------------------------------------------------------------------------------
# Reading a state dict (I/O).


def read_state_dict(path) -> dict[str, np.ndarray]:
    """{torchvision key: numpy array} of a ``.safetensors`` or ``.pth`` / ``.pt`` file.

    A checkpoint wrapping the state dict under "state_dict" / "model" is unwrapped and a
    "module." prefix stripped. ValueError (starting "path: ") for a missing, unreadable or
    foreign file; ImportError with an install hint when the file needs a missing package.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (_SAFETENSORS_SUFFIX, *_TORCH_SUFFIXES):
        raise ValueError(f"path: expected a .safetensors, .pth or .pt file, got {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"path: file {str(path)!r} does not exist")
    if suffix == _SAFETENSORS_SUFFIX:
        return _unwrap_state_dict(_read_safetensors(path), path,
                                  lambda value: value if isinstance(value, np.ndarray) else None)
    return _read_torch(path)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as error:
        raise ImportError("reading a .safetensors file needs the safetensors package "
                          "(pip install safetensors)") from error
    try:
        return load_file(path)
    except Exception as error:  # SafetensorError (not a ValueError), TypeError for bfloat16
        raise ValueError(f"path: {str(path)!r} is not a readable .safetensors file of float32 / "
                         f"float16 tensors: {error}") from error


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise ImportError(_TORCH_HINT) from error
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickled nn.Module, a foreign pickle, a corrupt zip
        raise ValueError(f"path: {str(path)!r} is not a readable torch state dict (save "
                         f"model.state_dict(), not the model): {error}") from error

    def as_array(value):
        if not isinstance(value, torch.Tensor):
            return None
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()

    return _unwrap_state_dict(checkpoint, path, as_array)


def _unwrap_state_dict(checkpoint, path: Path, as_array) -> dict[str, np.ndarray]:
    """The state dict in `checkpoint`: unwrapped from "state_dict" / "model", "module."
    stripped, every value turned into a numpy array by `as_array` (None: not a tensor)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"path: {str(path)!r} holds a {type(checkpoint).__name__}, not a "
                         "state dict (a mapping of parameter names to tensors)")
    for wrapper in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    state = {}
    for key, value in checkpoint.items():
        array = as_array(value)
        if array is None:
            raise ValueError(f"path: {str(path)!r}: entry {key!r} is a {type(value).__name__}, "
                             "not a tensor; expected a state dict")
        name = key[len(_PARALLEL_PREFIX):] if key.startswith(_PARALLEL_PREFIX) else key
        if name in state:
            raise ValueError(f"path: {str(path)!r}: key {name!r} appears both with and without "
                             f"the {_PARALLEL_PREFIX!r} prefix")
        state[name] = array
    if not state:
        raise ValueError(f"path: {str(path)!r} holds no tensors")
    return state


# ----------------------------------------------------------------------------------------------
# The conversion (pure).


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What happened to every key (torchvision names; each key of the input in exactly one of
    converted / dropped / ignored / unexpected / mis-shaped).

    Attributes:
      arch: "googlenet" | "resnet50".
      converted: keys written into the model's tree.
      dropped: classifier keys (``fc.*``, GoogLeNet's ``aux1.*`` / ``aux2.*``): the head is new.
      ignored: ``num_batches_tracked`` counters of converted batch norms.
      unexpected: keys the model has no leaf for.
      missing: torchvision keys of model leaves that the state dict lacks.
      misshaped: "key: file shape dtype, expected shape" for a wrong shape (torch's layout), a
        non-numeric dtype or NaN / inf values.
    """

    arch: str
    converted: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    misshaped: tuple[str, ...] = ()

    @property
    def problems(self) -> list[str]:
        """One line per kind of problem (missing, unexpected, mis-shaped), naming every key."""
        kinds = (("missing (the model has them, the file does not)", self.missing),
                 ("unexpected (no counterpart in the model)", self.unexpected),
                 ("mis-shaped", self.misshaped))
        return [f"{len(keys)} {kind}: " + ", ".join(keys) for kind, keys in kinds if keys]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def summary(self) -> str:
        """Human-readable counts, then the problems (if any), one per line."""
        lines = [f"{self.arch}: converted {len(self.converted)} tensors; dropped "
                 f"{len(self.dropped)} classifier keys"
                 + (f" ({', '.join(self.dropped)})" if 0 < len(self.dropped) <= 4 else "")
                 + f"; ignored {len(self.ignored)} num_batches_tracked counters"]
        return "\n".join(lines + self.problems)


def _check_arch(arch) -> str:
    if not isinstance(arch, str) or arch.lower() not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {ARCHS}")
    return arch.lower()


@functools.cache
def _model_leaves(arch: str, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    """{flat Flax key: shape} of the backbone (abstract init: no compilation, no memory)."""
    backbone = {"googlenet": GoogLeNet, "resnet50": ResNet50}[arch](num_classes=num_classes)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x), images)
    return {key: tuple(leaf.shape) for key, leaf in weights._flatten(shapes).items()}


def _torch_axes(ndim: int) -> tuple[int, ...]:
    """Axes that take a Flax kernel to torch's layout: HWIO -> OIHW, [in, out] -> [out, in]."""
    return {4: (3, 2, 0, 1), 2: (1, 0)}.get(ndim, tuple(range(ndim)))


def _classifier_size(arch: str, state_dict: Mapping, keep_classifier: bool) -> int | None:
    """The number of classes of the file's ``fc`` when it is kept (None: no classifier)."""
    if not keep_classifier:
        return None
    bias = state_dict.get(f"{_KEEP_CLASSIFIER}bias")
    if bias is None or np.ndim(bias) != 1 or not np.shape(bias)[0]:
        raise ValueError(f"state_dict: keep_classifier needs a 1-D {_KEEP_CLASSIFIER}bias "
                         f"({arch}'s ImageNet classifier), got "
                         f"{'none' if bias is None else np.shape(bias)}")
    return int(np.shape(bias)[0])


def _problem(value, torch_shape: tuple[int, ...]) -> str | None:
    """Why `value` cannot fill a leaf of torch shape `torch_shape`, or None."""
    array = np.asarray(value)
    real = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if array.shape != torch_shape or not real:
        return f"file {array.shape} {array.dtype}, expected {torch_shape}"
    if not np.isfinite(array).all():
        return f"file {array.shape} {array.dtype} contains NaN or inf"
    return None


def convert_state_dict(arch: str, state_dict: Mapping, *, strict: bool = True,
                       keep_classifier: bool = False) -> tuple[dict, ConversionReport]:
    """(variables, report): a torchvision state dict as the backbone's Flax variables.

    Args:
      arch: "googlenet" | "resnet50".
      state_dict: {torchvision key: array} (numpy arrays, or anything ``np.asarray`` takes,
        e.g. CPU torch tensors), e.g. from ``read_state_dict``.
      strict: refuse (ValueError naming every key) missing, unexpected or mis-shaped keys;
        False returns what converts and lists the rest in the report.
      keep_classifier: convert ``fc.*`` too (a ``fc`` of the file's number of classes) instead
        of dropping it; ``load_pretrained`` drops it again for an EmbeddingModel.

    Returns:
      variables: ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays, paths
        relative to the backbone (the format of ``weights.save_npz`` / ``load_pretrained``).
      report: a ConversionReport.
    """
    arch = _check_arch(arch)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict: expected a mapping of torchvision keys to arrays, got "
                         f"{type(state_dict).__name__}")
    leaves = _model_leaves(arch, _classifier_size(arch, state_dict, keep_classifier))
    flax_key_of = {weights.torchvision_key(key): key for key in leaves}
    if len(flax_key_of) != len(leaves):  # a broken mapping, never a user error
        raise AssertionError(f"torchvision_key is not one-to-one on {arch}'s leaves")
    dropped_prefixes = tuple(prefix for prefix in _CLASSIFIER_PREFIXES[arch]
                             if not (keep_classifier and prefix == _KEEP_CLASSIFIER))
    flat, kinds = {}, {kind: [] for kind in ("converted", "dropped", "ignored", "unexpected",
                                             "misshaped")}
    for key, value in state_dict.items():
        flax_key = flax_key_of.get(key)
        if not isinstance(key, str):
            kinds["unexpected"].append(repr(key))
        elif key.startswith(dropped_prefixes):
            kinds["dropped"].append(key)
        elif flax_key is not None:
            shape = leaves[flax_key]
            axes = _torch_axes(len(shape))
            problem = _problem(value, tuple(shape[axis] for axis in axes))
            if problem:
                kinds["misshaped"].append(f"{key}: {problem}")
            else:
                flat[flax_key] = np.ascontiguousarray(
                    np.asarray(value).transpose(np.argsort(axes)), dtype=np.float32)
                kinds["converted"].append(key)
        elif (key.endswith(_BN_COUNTER)
              and key[:-len(_BN_COUNTER)] + ".running_mean" in flax_key_of):
            kinds["ignored"].append(key)
        else:
            kinds["unexpected"].append(key)
    missing = sorted(key for key in flax_key_of if key not in state_dict)
    report = ConversionReport(arch, missing=tuple(missing),
                              **{kind: tuple(sorted(keys)) for kind, keys in kinds.items()})
    if strict and not report.ok:
        hint = "" if report.converted else f" (no key converts: is it a {arch} state dict?)"
        raise ValueError(f"state_dict: does not match torchvision's {arch}{hint}: "
                         + "; ".join(report.problems))
    variables = {}
    for collection in weights.COLLECTIONS:
        prefix = f"{collection}/"
        tree = {key[len(prefix):]: value for key, value in flat.items()
                if key.startswith(prefix)}
        if tree:
            variables[collection] = traverse_util.unflatten_dict(tree, sep="/")
    return variables, report


# ----------------------------------------------------------------------------------------------
# Command line.


class _UsageError(Exception):
    """A bad command line (argparse's message), reported as one line with exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="python -m smine_jax.models.convert",
        description="Convert a torchvision ImageNet state dict into a smine_jax weight file "
                    "for --config.model.init_from.")
    parser.add_argument("--arch", required=True, choices=ARCHS, help="backbone architecture")
    parser.add_argument("--src", required=True,
                        help="torchvision state dict: .safetensors (no torch needed) or .pth/.pt")
    parser.add_argument("--dst", required=True, help="weight file to write (.npz)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                        help="refuse missing, unexpected or mis-shaped keys (default); with "
                             "--no-strict write what converts and list the rest")
    parser.add_argument("--keep-classifier", action="store_true",
                        help="also convert the ImageNet classifier fc (dropped by default: "
                             "the embedding head is new)")
    return parser


def _flag_message(flag: str, error: Exception) -> str:
    """One line naming `flag`: a leading "path: " / "state_dict: " becomes "--flag: "."""
    text = " ".join(str(error).split())
    for argument in ("path: ", "state_dict: "):
        if text.startswith(argument):
            return f"{flag}: {text[len(argument):]}"
    return f"{flag}: {text}"


def _check_destination(src: str, dst: str) -> None:
    if os.path.isdir(dst):
        raise ValueError(f"path: {dst!r} is a directory; expected a file name (e.g. FILE.npz)")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"path: {dst!r} is the --src file; choose another name")


def main(argv=None) -> int:
    """The command line (module docstring); returns the exit status: 0, or 2 after one line
    ``error: --flag: ...`` on stderr."""
    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        args = _parser().parse_args(argv)
    except _UsageError as error:
        return fail(" ".join(str(error).split()))
    try:
        state = read_state_dict(args.src)
        variables, report = convert_state_dict(args.arch, state, strict=args.strict,
                                               keep_classifier=args.keep_classifier)
    except (ValueError, ImportError) as error:
        return fail(_flag_message("--src", error))
    if not variables:
        return fail(f"--src: nothing in {args.src!r} converts to {args.arch}")
    try:
        _check_destination(args.src, args.dst)
        weights.save_npz(variables, args.dst)
    except (OSError, ValueError) as error:
        return fail(_flag_message("--dst", error))
    print(report.summary())
    print(f"wrote {args.dst} (load with --config.model.name={args.arch} "
          f"--config.model.init_from={args.dst})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
