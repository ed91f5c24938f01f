"""Tests of smine_jax.models: backbones in torchvision's layout, the embedding head, weight files.

References written here, independently of the package: torchvision's state-dict keys and shapes
of GoogLeNet (no aux) and ResNet-50 enumerated from the constructor arguments of torchvision's
source; slow numpy float64 forward passes with torch's semantics (explicit symmetric padding,
MaxPool2d ceil_mode rule from the PyTorch docs, eval-mode batch norm) fed with random weights in
torch layout, converted to the Flax tree through ``torchvision_key`` — what the converter
does. GoogLeNet / ResNet-50 compile in a few seconds each on CPU, so they run on 1–2 images of
64² / 65² and parameter counts use ``jax.eval_shape`` (no compile).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util
from hypothesis import given, settings
from hypothesis import strategies as st

from smine_jax import models
from smine_jax.models import _layers, weights
from smine_jax.models.googlenet import GoogLeNet, Inception
from smine_jax.models.resnet import Bottleneck, ResNet50

# ----------------------------------------------------------------------------------------------
# torchvision's state dicts, enumerated from its constructors (torchvision/models/googlenet.py
# and resnet.py): key -> torch shape.

# Inception(in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)
TV_INCEPTIONS = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}
TV_RESNET50_LAYERS = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))


def _tv_conv_bn(state, prefix, out_ch, in_ch, kernel, conv="conv", bn="bn", sep="."):
    state[f"{prefix}{sep}{conv}.weight"] = (out_ch, in_ch, kernel, kernel)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        state[f"{prefix}{sep}{bn}.{leaf}"] = (out_ch,)
    state[f"{prefix}{sep}{bn}.num_batches_tracked"] = ()


def tv_googlenet_shapes(num_classes=None) -> dict[str, tuple]:
    state = {}
    _tv_conv_bn(state, "conv1", 64, 3, 7)
    _tv_conv_bn(state, "conv2", 64, 64, 1)
    _tv_conv_bn(state, "conv3", 192, 64, 3)
    for name, (cin, c1, c3r, c3, c5r, c5, pool) in TV_INCEPTIONS.items():
        _tv_conv_bn(state, f"{name}.branch1", c1, cin, 1)
        _tv_conv_bn(state, f"{name}.branch2.0", c3r, cin, 1)
        _tv_conv_bn(state, f"{name}.branch2.1", c3, c3r, 3)
        _tv_conv_bn(state, f"{name}.branch3.0", c5r, cin, 1)
        _tv_conv_bn(state, f"{name}.branch3.1", c5, c5r, 3)  # torchvision's "5×5" is 3×3
        _tv_conv_bn(state, f"{name}.branch4.1", pool, cin, 1)
    if num_classes:
        state["fc.weight"], state["fc.bias"] = (num_classes, 1024), (num_classes,)
    return state


def tv_resnet50_shapes(num_classes=None) -> dict[str, tuple]:
    state = {}
    _tv_conv_bn(state, "", 64, 3, 7, conv="conv1", bn="bn1", sep="")
    inplanes = 64
    for layer, (blocks, width, _) in enumerate(TV_RESNET50_LAYERS, start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            _tv_conv_bn(state, prefix, width, inplanes, 1, conv="conv1", bn="bn1")
            _tv_conv_bn(state, prefix, width, width, 3, conv="conv2", bn="bn2")
            _tv_conv_bn(state, prefix, width * 4, width, 1, conv="conv3", bn="bn3")
            if block == 0:
                _tv_conv_bn(state, prefix, width * 4, inplanes, 1, conv="downsample.0",
                            bn="downsample.1")
            inplanes = width * 4
    if num_classes:
        state["fc.weight"], state["fc.bias"] = (num_classes, 2048), (num_classes,)
    return state


def tv_parameter_count(shapes) -> int:
    """torch's sum(p.numel() for p in model.parameters()): no running stats."""
    return sum(math.prod(shape) for key, shape in shapes.items()
               if not key.endswith(("running_mean", "running_var", "num_batches_tracked")))


def to_flax_layout(key: str, array: np.ndarray) -> np.ndarray:
    """torch layout -> Flax layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def random_torch_state(shapes, seed=0) -> dict[str, np.ndarray]:
    """Random float64 weights with activations that stay O(1) through deep nets."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            continue
        if len(shape) >= 2:
            state[key] = rng.normal(0, math.sqrt(2 / math.prod(shape[1:])), shape)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(".weight"):
            state[key] = rng.uniform(0.5, 1.5, shape)
        else:  # bias, running_mean
            state[key] = rng.normal(0, 0.1, shape)
    return state


def flax_variables_from_torch(module, sample, state) -> dict:
    """What the converter does: every Flax leaf from its torchvision key, relaid out."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), sample))
    flat = {}
    for key, leaf in weights._flatten(shapes).items():
        array = to_flax_layout(key, state[models.torchvision_key(key)])
        assert array.shape == leaf.shape, key
        flat[key] = jnp.asarray(array, jnp.float32)
    return _unflatten(flat)


def _unflatten(flat) -> dict:
    out = {}
    for collection in ("params", "batch_stats"):
        sub = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(collection + "/")}
        if sub:
            out[collection] = traverse_util.unflatten_dict(sub, sep="/")
    return out


# ----------------------------------------------------------------------------------------------
# Slow numpy forward passes with torch semantics (float64).


def ref_conv(x, weight, stride=1, padding=0):
    """torch.nn.functional.conv2d on NHWC x with an OIHW weight, no bias."""
    n, h, w, _ = x.shape
    out_ch, _, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    out = np.zeros((n, oh, ow, out_ch))
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a:a + stride * (oh - 1) + 1:stride, b:b + stride * (ow - 1) + 1:stride]
            out += patch @ weight[:, :, a, b].T
    return out


def ref_max_pool(x, kernel, stride, padding=0, ceil_mode=False):
    """torch.nn.MaxPool2d, from its documentation: padding never wins, and in ceil mode a
    window that would start in the right padding is dropped."""
    n, h, w, c = x.shape

    def size(length):
        rounding = math.ceil if ceil_mode else math.floor
        out = rounding((length + 2 * padding - kernel) / stride) + 1
        if ceil_mode and (out - 1) * stride >= length + padding:
            out -= 1
        return out

    oh, ow = size(h), size(w)
    out = np.empty((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            r, q = i * stride - padding, j * stride - padding
            window = x[:, max(r, 0):min(r + kernel, h), max(q, 0):min(q + kernel, w)]
            out[:, i, j] = window.max(axis=(1, 2))
    return out


def ref_bn(x, state, prefix, eps):
    scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + eps)
    return (x - state[f"{prefix}.running_mean"]) * scale + state[f"{prefix}.bias"]


def ref_basic_conv(state, prefix, x, stride=1, padding=0):
    y = ref_conv(x, state[f"{prefix}.conv.weight"], stride, padding)
    return np.maximum(ref_bn(y, state, f"{prefix}.bn", 1e-3), 0)


def ref_inception(state, name, x):
    b1 = ref_basic_conv(state, f"{name}.branch1", x)
    b2 = ref_basic_conv(state, f"{name}.branch2.1",
                        ref_basic_conv(state, f"{name}.branch2.0", x), padding=1)
    b3 = ref_basic_conv(state, f"{name}.branch3.1",
                        ref_basic_conv(state, f"{name}.branch3.0", x), padding=1)
    b4 = ref_basic_conv(state, f"{name}.branch4.1", ref_max_pool(x, 3, 1, 1, ceil_mode=True))
    return np.concatenate([b1, b2, b3, b4], axis=-1)


def ref_googlenet(state, x, transform_input):
    """torchvision GoogLeNet.forward (eval, aux_logits=False), literally."""
    if transform_input:
        x = np.stack([x[..., 0] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
                      x[..., 1] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
                      x[..., 2] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5], axis=-1)
    x = ref_basic_conv(state, "conv1", x, stride=2, padding=3)
    x = ref_max_pool(x, 3, 2, ceil_mode=True)
    x = ref_basic_conv(state, "conv2", x)
    x = ref_basic_conv(state, "conv3", x, padding=1)
    x = ref_max_pool(x, 3, 2, ceil_mode=True)
    x = ref_inception(state, "inception3b", ref_inception(state, "inception3a", x))
    x = ref_max_pool(x, 3, 2, ceil_mode=True)
    for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"):
        x = ref_inception(state, name, x)
    x = ref_max_pool(x, 2, 2, ceil_mode=True)
    x = ref_inception(state, "inception5b", ref_inception(state, "inception5a", x))
    x = x.mean(axis=(1, 2))
    return x @ state["fc.weight"].T + state["fc.bias"]


def ref_resnet50(state, x):
    """torchvision ResNet.forward with Bottleneck (v1.5), eval."""
    def conv_bn(y, conv, bn, stride=1, padding=0):
        return ref_bn(ref_conv(y, state[f"{conv}.weight"], stride, padding), state, bn, 1e-5)

    x = np.maximum(conv_bn(x, "conv1", "bn1", 2, 3), 0)
    x = ref_max_pool(x, 3, 2, padding=1)
    for layer, (blocks, _, stride) in enumerate(TV_RESNET50_LAYERS, start=1):
        for block in range(blocks):
            p, s = f"layer{layer}.{block}", stride if block == 0 else 1
            out = np.maximum(conv_bn(x, f"{p}.conv1", f"{p}.bn1"), 0)
            out = np.maximum(conv_bn(out, f"{p}.conv2", f"{p}.bn2", s, 1), 0)
            out = conv_bn(out, f"{p}.conv3", f"{p}.bn3")
            identity = conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", s) if block == 0 \
                else x
            x = np.maximum(out + identity, 0)
    return x.mean(axis=(1, 2)) @ state["fc.weight"].T + state["fc.bias"]


def assert_close_to_reference(actual, reference, rtol=1e-4):
    actual = np.asarray(actual, np.float64)
    np.testing.assert_allclose(actual, reference, rtol=rtol,
                               atol=rtol * float(np.abs(reference).max()))


# ----------------------------------------------------------------------------------------------
# Small models shared across tests (one compile each).

SMALL = dict(name="small_conv", width=8, depth=2, embedding_dim=16)


def small_config(**overrides):
    config = models.default_config("small_conv")
    config.update({**SMALL, **overrides})
    return config


@pytest.fixture(scope="module")
def small_model():
    model = models.build_model(small_config())
    variables = models.init_variables(model, jax.random.key(0), (1, 12, 12, 1))
    return model, variables


# ----------------------------------------------------------------------------------------------
# Architecture: parameter counts, torchvision keys, reference forward passes.

ONE_IMAGE = jnp.zeros((1, 64, 64, 3))


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("backbone, expected_params, expected_bn_channels, reference", [
    # torchvision googlenet(aux_logits=False): 6,624,904 = 5,599,904 + fc 1024·1000 + 1000.
    (GoogLeNet(), 5_599_904, 7_280, tv_googlenet_shapes()),
    (GoogLeNet(num_classes=1000), 6_624_904, 7_280, tv_googlenet_shapes(1000)),
    # torchvision resnet50: 25,557,032 = 23,508,032 + fc 2048·1000 + 1000.
    (ResNet50(), 23_508_032, 26_560, tv_resnet50_shapes()),
    (ResNet50(num_classes=1000), 25_557_032, 26_560, tv_resnet50_shapes(1000)),
], ids=["googlenet", "googlenet_fc", "resnet50", "resnet50_fc"])
def test_parameter_counts_equal_torchvision(backbone, expected_params, expected_bn_channels,
                                            reference):
    shapes = jax.eval_shape(lambda: backbone.init(jax.random.key(0), ONE_IMAGE))
    assert count(shapes["params"]) == expected_params == tv_parameter_count(reference)
    assert count(shapes["batch_stats"]) == 2 * expected_bn_channels
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("backbone, reference", [
    (GoogLeNet(num_classes=1000), tv_googlenet_shapes(1000)),
    (ResNet50(num_classes=1000), tv_resnet50_shapes(1000)),
], ids=["googlenet", "resnet50"])
def test_flax_paths_map_one_to_one_onto_torchvision_keys(backbone, reference):
    shapes = weights._flatten(jax.eval_shape(lambda: backbone.init(jax.random.key(0),
                                                                  ONE_IMAGE)))
    mapped = {models.torchvision_key(key): key for key in shapes}
    assert len(mapped) == len(shapes)  # injective
    expected = {k for k in reference if not k.endswith("num_batches_tracked")}
    assert set(mapped) == expected  # onto: every torchvision key but the step counters
    for torch_key, flax_key in mapped.items():
        torch_shape = reference[torch_key]
        flax_shape = to_flax_layout(torch_key, np.empty(torch_shape)).shape
        assert shapes[flax_key].shape == flax_shape, (flax_key, torch_key)


def test_torchvision_key_examples_and_errors():
    key = models.torchvision_key
    assert key("params/inception3a/branch2_0/conv/kernel") == "inception3a.branch2.0.conv.weight"
    assert key("batch_stats/inception4e/branch4_1/bn/var") == \
        "inception4e.branch4.1.bn.running_var"
    assert key("params/layer2_0/downsample_0/kernel") == "layer2.0.downsample.0.weight"
    assert key("params/layer2_0/downsample_1/scale") == "layer2.0.downsample.1.weight"
    assert key("batch_stats/layer3_5/bn3/mean") == "layer3.5.bn3.running_mean"
    assert key("params/backbone/conv1/bn/bias") == "conv1.bn.bias"  # whole-model path
    assert key("params/fc/kernel") == "fc.weight"
    for bad in ("params/kernel", "opt_state/conv1/kernel", "params/conv1/bn/mean",
                "batch_stats/conv1/bn/scale"):
        with pytest.raises(ValueError, match="flat_key"):
            key(bad)


def test_googlenet_matches_torchvision_reference_forward():
    """Whole GoogLeNet (transform_input, ceil-mode pools, 3×3 "5×5" branch, branch order, fc)
    against the numpy transcription of torchvision's forward, 2 images of 64²."""
    backbone = GoogLeNet(num_classes=10, transform_input=True)
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3))
    state = random_torch_state(tv_googlenet_shapes(10), seed=2)
    variables = flax_variables_from_torch(backbone, images[:1], state)
    logits = jax.jit(backbone.apply)(variables, jnp.asarray(images, jnp.float32))
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert_close_to_reference(logits, ref_googlenet(state, images, transform_input=True))


def test_resnet50_matches_torchvision_reference_forward():
    """Whole ResNet-50 (stride on the 3×3 conv, downsample shortcut, padded max pool) against
    torchvision's forward in numpy; 65² so that every stride-2 layer sees an odd size."""
    backbone = ResNet50(num_classes=10)
    images = np.random.default_rng(3).normal(size=(1, 65, 65, 3))
    state = random_torch_state(tv_resnet50_shapes(10), seed=4)
    variables = flax_variables_from_torch(backbone, images, state)
    logits = jax.jit(backbone.apply)(variables, jnp.asarray(images, jnp.float32))
    assert_close_to_reference(logits, ref_resnet50(state, images))


def test_inception_block_and_transform_input_off():
    """One Inception block with small channels, and GoogLeNet's own stem without the input
    transform: block-level checks that need no full-network compile."""
    block = Inception(3, 2, 4, 2, 3, 2)
    x = np.random.default_rng(5).normal(size=(2, 5, 7, 6))
    shapes = {}
    for name, (c_out, c_in, k) in {"branch1": (3, 6, 1), "branch2.0": (2, 6, 1),
                                   "branch2.1": (4, 2, 3), "branch3.0": (2, 6, 1),
                                   "branch3.1": (3, 2, 3), "branch4.1": (2, 6, 1)}.items():
        _tv_conv_bn(shapes, f"blk.{name}", c_out, c_in, k)
    state = {key.removeprefix("blk."): value
             for key, value in random_torch_state(shapes, seed=6).items()}
    variables = flax_variables_from_torch(block, x, state)
    out = jax.jit(block.apply)(variables, jnp.asarray(x, jnp.float32))
    ref = ref_inception({f"blk.{k}": v for k, v in state.items()}, "blk", x)
    assert out.shape == (2, 5, 7, 3 + 4 + 3 + 2)
    assert_close_to_reference(out, ref)
    with pytest.raises(ValueError, match="images: transform_input needs 3"):
        jax.eval_shape(lambda: GoogLeNet().init(jax.random.key(0), jnp.zeros((1, 64, 64, 1))))


def test_bottleneck_stride_is_on_the_3x3_conv():
    """ResNet v1.5: conv1 keeps the size, conv2 halves it (intermediate shapes, no compile)."""
    shapes = jax.eval_shape(lambda: ResNet50().init_with_output(
        jax.random.key(0), ONE_IMAGE, capture_intermediates=True))[1]["intermediates"]
    block = shapes["layer2_0"]
    assert block["conv1"]["__call__"][0].shape == (1, 16, 16, 128)
    assert block["conv2"]["__call__"][0].shape == (1, 8, 8, 128)
    assert block["downsample_0"]["__call__"][0].shape == (1, 8, 8, 512)
    assert "downsample_0" not in shapes["layer2_1"]
    assert Bottleneck(4).downsample is False


@pytest.mark.parametrize("size, expected", [
    # torchvision GoogLeNet at 224: 112 → 56 → 28 → 14 → 7; at 227: 114 → 57 → 28 → 14 → 7.
    (224, (56, 28, 14, 7)), (227, (57, 28, 14, 7)),
])
def test_googlenet_feature_map_sizes(size, expected):
    shapes = jax.eval_shape(lambda: GoogLeNet().init_with_output(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), capture_intermediates=True))
    inter = shapes[1]["intermediates"]
    got = (inter["conv2"]["__call__"][0].shape[1], inter["inception3a"]["__call__"][0].shape[1],
           inter["inception4a"]["__call__"][0].shape[1],
           inter["inception5a"]["__call__"][0].shape[1])
    assert got == expected
    assert shapes[0].shape == (1, 1024)


POOL_SETTINGS = [(3, 2, 0, True), (3, 1, 1, True), (2, 2, 0, True), (3, 2, 1, False),
                 (2, 2, 0, False), (3, 3, 1, True), (2, 2, 1, True)]


@settings(max_examples=30, deadline=None)
@given(setting=st.sampled_from(POOL_SETTINGS), height=st.integers(3, 11),
       width=st.integers(3, 11), seed=st.integers(0, 2**16))
def test_max_pool2d_matches_torch_rule(setting, height, width, seed):
    window, stride, padding, ceil_mode = setting
    # All negative: a padded zero (instead of -inf) would win and show.
    x = -np.random.default_rng(seed).uniform(1, 2, size=(2, height, width, 3))
    out = _layers.max_pool2d(jnp.asarray(x, jnp.float32), window, stride, padding=padding,
                             ceil_mode=ceil_mode)
    np.testing.assert_allclose(np.asarray(out), ref_max_pool(x, window, stride, padding,
                                                             ceil_mode), rtol=1e-6)


def test_max_pool2d_reshape_path_gradient_matches_reduce_window():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 6, 3)), jnp.float32)  # odd H

    def reduce_window(y):
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                     "VALID")

    for pool in (lambda y: _layers.max_pool2d(y, 2, 2), reduce_window):
        assert pool(x).shape == (2, 3, 3, 3)
    grad_ours = jax.grad(lambda y: jnp.sum(_layers.max_pool2d(y, 2, 2) ** 2))(x)
    grad_xla = jax.grad(lambda y: jnp.sum(reduce_window(y) ** 2))(x)
    np.testing.assert_allclose(grad_ours, grad_xla, rtol=1e-6)  # no ties in random data


# ----------------------------------------------------------------------------------------------
# The fused batch norm + ReLU + 2×2 max pool against the unfused composition (JAX autodiff).


def unfused_bn_relu_pool(y, scale, bias, epsilon):
    """nn.BatchNorm's train-mode formula, then nn.relu, then max_pool2d(2, 2), all plain JAX."""
    mean = jnp.mean(y, axis=(0, 1, 2))
    var = jnp.maximum(jnp.mean(y * y, axis=(0, 1, 2)) - mean ** 2, 0.0)
    normalised = (y - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias
    return _layers.max_pool2d(jax.nn.relu(normalised), 2, 2), mean, var


def _bn_pool_problem(seed, shape, ties):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=shape).astype(np.float32)
    if ties:  # constant regions (a white page): exact ties inside the windows, some positive
        y[:, : shape[1] // 2] = np.round(y[:, : shape[1] // 2])
        y[0, :4, :4] = 0.5
    scale = rng.normal(size=shape[-1]).astype(np.float32)  # some negative: max != affine(max)
    bias = rng.normal(size=shape[-1]).astype(np.float32)
    weights = [rng.normal(size=s).astype(np.float32)
               for s in ((shape[0], shape[1] // 2, shape[2] // 2, shape[3]), shape[-1:],
                         shape[-1:])]
    return y, scale, bias, weights


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (3, 7, 7, 5), (2, 6, 9, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_bn_relu_pool_matches_unfused_values_and_gradients(shape, ties):
    y, scale, bias, weights = _bn_pool_problem(sum(shape), shape, ties)

    def functional(fn):
        def total(y_, scale_, bias_):
            out, mean, var = fn(y_, scale_, bias_, 1e-5)
            return sum(jnp.sum(w * t) for w, t in zip(weights, (out, mean, var), strict=True))
        return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))

    for ours, reference in zip(_layers.batch_norm_relu_max_pool(y, scale, bias, 1e-5),
                               unfused_bn_relu_pool(y, scale, bias, 1e-5), strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    (value, grads), (ref_value, ref_grads) = (
        functional(fn)(y, scale, bias)
        for fn in (_layers.batch_norm_relu_max_pool, unfused_bn_relu_pool))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for name, ours, reference in zip(("y", "scale", "bias"), grads, ref_grads, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=2e-4, atol=2e-5, err_msg=name)


def test_fused_bn_relu_pool_shares_tied_maxima_and_skips_dropped_edges():
    # One channel, scale 1, bias 0: a window of four equal positive values shares the gradient.
    y = np.zeros((1, 3, 3, 1), np.float32)
    y[0, :2, :2, 0] = 1.0  # the 2×2 window; row / column 2 are dropped by the floor pool
    y[0, 2, 2, 0] = -3.0
    out, grad_y = jax.value_and_grad(
        lambda y_: _layers.batch_norm_relu_max_pool(y_, jnp.ones(1), jnp.zeros(1), 1e-5)[0]
        .sum())(y)
    ref_out, ref_grad_y = jax.value_and_grad(
        lambda y_: unfused_bn_relu_pool(y_, jnp.ones(1), jnp.zeros(1), 1e-5)[0].sum())(y)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    np.testing.assert_allclose(grad_y, ref_grad_y, rtol=1e-5, atol=1e-6)
    # The four tied maxima get equal shares (the batch-norm terms add the same to each).
    assert np.ptp(np.asarray(grad_y)[0, :2, :2, 0]) < 1e-6


class UnfusedSmallNet(nn.Module):
    """SMALL's backbone from the unfused layers (conv + BN + ReLU, then max_pool2d)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for block in ("block1", "block2"):
            x = _layers.BasicConv2d(8, 3, padding=1, epsilon=1e-5, name=block)(x, train)
            x = _layers.max_pool2d(x, 2, 2)
        return _layers.global_average_pool(x)


def test_small_net_with_fused_blocks_equals_unfused_layers(small_model):
    """SmallConvNet's blocks give the outputs, gradients and batch statistics of
    BasicConv2d + max_pool2d run with the same variables (train and eval mode)."""
    model, variables = small_model
    images = np.random.default_rng(5).normal(size=(6, 12, 12, 1)).astype(np.float32)
    images[:, :6] = 1.0  # constant regions: tied maxima

    reference = models.EmbeddingModel(UnfusedSmallNet(), embedding_dim=16)

    def loss(model_, params, x):
        out, updates = model_.apply({"params": params,
                                     "batch_stats": variables["batch_stats"]}, x, train=True,
                                    mutable=["batch_stats"])
        return jnp.sum(out * jnp.arange(out.size).reshape(out.shape)), updates

    for train_mode in (False, True):
        np.testing.assert_allclose(
            model.apply(variables, images, train=train_mode, mutable=["batch_stats"])[0],
            reference.apply(variables, images, train=train_mode, mutable=["batch_stats"])[0],
            rtol=1e-5, atol=1e-6)
    (ours, ours_stats), ours_grads = jax.value_and_grad(
        lambda p: loss(model, p, images), has_aux=True)(variables["params"])
    (ref, ref_stats), ref_grads = jax.value_and_grad(
        lambda p: loss(reference, p, images), has_aux=True)(variables["params"])
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 (ours_grads, ours_stats), (ref_grads, ref_stats))


# ----------------------------------------------------------------------------------------------
# The CPU conv with the im2col kernel gradient.


@pytest.mark.parametrize("x_shape, kernel_shape, padding, stride, dtype", [
    ((5, 6, 6, 3), (3, 3, 3, 4), 1, 1, jnp.float32),   # prime batch: chunks of 1 below
    ((8, 5, 7, 2), (1, 1, 2, 3), 0, 1, jnp.float32),
    ((3, 6, 6, 4), (3, 3, 4, 2), 0, 1, jnp.float32),   # valid conv
    ((2, 4, 5, 3), (3, 3, 3, 2), 2, 1, jnp.float32),   # padding larger than the kernel reach
    ((4, 6, 6, 3), (3, 3, 3, 4), 1, 2, jnp.float32),   # stride 2: plain lax path
    ((6, 6, 6, 3), (3, 3, 3, 4), 1, 1, jnp.bfloat16),
])
def test_conv_matches_lax_values_and_gradients(monkeypatch, x_shape, kernel_shape, padding,
                                               stride, dtype):
    monkeypatch.setattr(_layers, "_KERNEL_GRAD_ROWS", 40)  # several chunks in the scan
    rng = np.random.default_rng(sum(x_shape))
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), dtype)
    pads = ((padding, padding), (padding, padding))
    dims = jax.lax.conv_dimension_numbers(x_shape, kernel_shape, ("NHWC", "HWIO", "NHWC"))
    out_shape = jax.eval_shape(lambda: jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), pads, dimension_numbers=dims)).shape
    cotangent = jnp.asarray(rng.normal(size=out_shape), dtype)

    def loss(conv, x_, k_):
        out = conv(x_, k_, (stride, stride), pads, dimension_numbers=dims)
        return jnp.sum((out * cotangent).astype(jnp.float32)), out

    grads = {}
    for name, conv in (("ours", _layers.conv_general_dilated),
                       ("lax", jax.lax.conv_general_dilated)):
        grads[name] = jax.jit(jax.grad(lambda a, b, c=conv: loss(c, a, b), argnums=(0, 1),
                                       has_aux=True))(x, kernel)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    (dx, dk), out = grads["ours"]
    (dx_ref, dk_ref), out_ref = grads["lax"]
    assert dk.dtype == dtype and dx.dtype == dtype
    for got, want in ((out, out_ref), (dx, dx_ref), (dk, dk_ref)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 400), rows=st.integers(1, 10_000))
def test_chunk_size_divides_the_batch_and_bounds_the_rows(batch, rows):
    chunk = _layers._chunk_size(batch, rows)
    assert batch % chunk == 0
    assert chunk == 1 or chunk * rows <= _layers._KERNEL_GRAD_ROWS
    # The largest such divisor.
    assert not any(batch % d == 0 and d * rows <= _layers._KERNEL_GRAD_ROWS
                   for d in range(chunk + 1, batch + 1))


# ----------------------------------------------------------------------------------------------
# EmbeddingModel: shapes, unit norm, zero safety, batch norm modes, dtype.


@pytest.mark.parametrize("size, channels, pooling, feature_dim", [
    (28, 1, "avg", 64), (32, 3, "avg", 64), (28, 1, "flatten", 64), (32, 3, "flatten", 256),
    (32, 1, "max", 64),
])
def test_small_conv_net_shapes_at_28_and_32(size, channels, pooling, feature_dim):
    backbone = models.SmallConvNet(pooling=pooling)
    shapes = jax.eval_shape(lambda: backbone.init_with_output(
        jax.random.key(0), jnp.zeros((3, size, size, channels))))
    assert shapes[0].shape == (3, feature_dim) and shapes[0].dtype == jnp.float32
    params = shapes[1]["params"]
    assert sorted(params) == ["block1", "block2", "block3", "block4"]
    assert params["block1"]["conv"]["kernel"].shape == (3, 3, channels, 64)
    assert "bias" not in params["block1"]["conv"]  # BN follows: no conv bias


def test_l2_normalise_off_returns_the_heads_raw_output(small_model):
    model, variables = small_model
    raw = models.build_model(small_config(l2_normalise=False))
    images = np.random.default_rng(2).normal(size=(4, 12, 12, 1)).astype(np.float32)
    unit = np.asarray(model.apply(variables, images))
    out = np.asarray(raw.apply(variables, images))  # same variables: normalising adds none
    assert not np.allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(out / np.linalg.norm(out, axis=1, keepdims=True), unit,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="model.l2_normalise: expected True or False"):
        models.build_model({**small_config().to_dict(), "l2_normalise": "no"})


def test_embeddings_are_unit_rows_in_float32(small_model):
    model, variables = small_model
    images = np.random.default_rng(1).normal(size=(5, 12, 12, 1)).astype(np.float32)
    embeddings = jax.jit(model.apply)(variables, images)
    assert embeddings.shape == (5, 16) and embeddings.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 5), dim=st.integers(1, 8), scale_exp=st.integers(-30, 10),
       seed=st.integers(0, 2**16))
def test_l2_normalise_matches_numpy(rows, dim, scale_exp, seed):
    x = np.random.default_rng(seed).normal(size=(rows, dim)) * 10.0 ** scale_exp
    got = np.asarray(models.l2_normalise(jnp.asarray(x, jnp.float32)))
    norms = np.linalg.norm(x.astype(np.float32).astype(np.float64), axis=1, keepdims=True)
    want = x / np.maximum(norms, 1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)


def test_zero_features_give_zero_embeddings_and_finite_gradients(small_model):
    model, variables = small_model
    params = jax.tree.map(jnp.asarray, variables["params"])
    params["head"] = jax.tree.map(jnp.zeros_like, params["head"])  # head output exactly 0
    images = np.random.default_rng(2).normal(size=(4, 12, 12, 1)).astype(np.float32)

    def loss(p):
        emb, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, images,
                             train=True, mutable=["batch_stats"])
        return jnp.sum(emb * jnp.arange(16.0)), emb

    grads, emb = jax.jit(jax.grad(loss, has_aux=True))(params)
    np.testing.assert_array_equal(emb, 0.0)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    zero_grad = jax.grad(lambda v: jnp.sum(models.l2_normalise(v)))(jnp.zeros((2, 3)))
    assert np.isfinite(zero_grad).all()


def test_train_mode_updates_batch_stats_like_torch_and_eval_mode_does_not(small_model):
    model, variables = small_model
    images = np.random.default_rng(3).normal(size=(6, 12, 12, 1)).astype(np.float32)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    embeddings, updates = train(variables, images)
    # Reference: block1's conv output statistics (biased variance, torch momentum 0.1).
    kernel = np.asarray(variables["params"]["backbone"]["block1"]["conv"]["kernel"], np.float64)
    conv_out = ref_conv(images.astype(np.float64), kernel.transpose(3, 2, 0, 1), padding=1)
    new = updates["batch_stats"]["backbone"]["block1"]["bn"]
    np.testing.assert_allclose(new["mean"], 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4)
    assert jax.tree.structure(updates["batch_stats"]) == \
        jax.tree.structure(variables["batch_stats"])
    # Train mode normalises with the batch: an image's embedding depends on the others.
    other, _ = train(variables, np.concatenate([images[:3], 2 * images[3:]]))
    assert not np.allclose(embeddings[0], other[0], atol=1e-4)
    # Eval mode uses the running statistics: per-image, and nothing to update.
    evaluate = jax.jit(model.apply)
    alone = evaluate(variables, images[:3])
    in_batch = evaluate(variables, np.concatenate([images[:3], 2 * images[3:]]))
    np.testing.assert_allclose(alone, in_batch[:3], rtol=1e-5, atol=1e-6)


def test_bfloat16_activations_give_float32_embeddings(small_model):
    model32, variables = small_model
    model16 = models.build_model(small_config(dtype="bfloat16"))
    images = np.random.default_rng(4).normal(size=(4, 12, 12, 1)).astype(np.float32)
    emb16, updates = jax.jit(lambda v, x: model16.apply(v, x, train=True,
                                                        mutable=["batch_stats"]))(variables,
                                                                                  images)
    emb32 = jax.jit(lambda v, x: model32.apply(v, x, train=True,
                                               mutable=["batch_stats"])[0])(variables, images)
    assert emb16.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
    np.testing.assert_allclose(np.linalg.norm(emb16, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb16, emb32, atol=5e-2)
    shapes = jax.eval_shape(lambda: model16.init(jax.random.key(0), images))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["googlenet", "resnet50"])
def test_imagenet_backbones_train_step_shapes(name):
    """build_model(googlenet / resnet50): unit 64-d float32 rows, batch stats updated."""
    model = models.build_model(models.default_config(name))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ONE_IMAGE))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype),
                             shapes)
    variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
    images = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
    emb, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images)
    assert emb.shape == (2, 64) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert jax.tree.structure(updates["batch_stats"]) == \
        jax.tree.structure(variables["batch_stats"])
    assert sorted(variables["params"]) == ["backbone", "head"]
    assert variables["params"]["head"]["kernel"].shape == (
        models.googlenet.FEATURE_DIM if name == "googlenet" else models.resnet.FEATURE_DIM, 64)


def test_images_are_checked(small_model):
    model, variables = small_model
    with pytest.raises(ValueError, match="images: expected NHWC"):
        model.apply(variables, jnp.zeros((12, 12, 1)))
    with pytest.raises(ValueError, match="images: expected float"):
        model.apply(variables, jnp.zeros((1, 12, 12, 1), jnp.uint8))
    with pytest.raises(ValueError, match="images: 2 blocks of 2×2 pooling need at least 4"):
        model.apply(variables, jnp.zeros((1, 3, 12, 1)))


# ----------------------------------------------------------------------------------------------
# Parameter labels for optax.multi_transform.


def test_param_labels_and_ten_times_head_learning_rate(small_model):
    _, variables = small_model
    params = variables["params"]
    labels = models.param_labels(params)
    flat = traverse_util.flatten_dict(labels, sep="/")
    assert {k: v for k, v in flat.items() if k.startswith("head/")} == {
        "head/kernel": "head", "head/bias": "head"}
    assert set(v for k, v in flat.items() if not k.startswith("head/")) == {"backbone"}
    tx = optax.multi_transform({"backbone": optax.sgd(0.1), "head": optax.sgd(1.0)}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for key, value in traverse_util.flatten_dict(updates, sep="/").items():
        np.testing.assert_allclose(value, -1.0 if key.startswith("head/") else -0.1)
    with pytest.raises(ValueError, match="params: got the variables dict"):
        models.param_labels(variables)


# ----------------------------------------------------------------------------------------------
# Weight files: save_npz / load_pretrained.


def _flat(variables):
    return {k: np.asarray(v) for k, v in weights._flatten(variables).items()}


@pytest.fixture(scope="module")
def two_inits(small_model):
    """Two different initialisations of the same small model (source, target)."""
    model, source = small_model
    target = models.init_variables(model, jax.random.key(7), (1, 12, 12, 1))
    source = jax.tree.map(np.asarray, source)
    source["batch_stats"] = jax.tree.map(lambda s: s + 0.5, source["batch_stats"])
    return source, target


def test_round_trip_loads_backbone_and_keeps_new_head(tmp_path, two_inits):
    source, target = two_inits
    path = models.save_npz(source, tmp_path / "model.npz")
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]
    with np.load(path) as archive:
        assert "params/backbone/block1/conv/kernel" in archive.files
        assert "batch_stats/backbone/block2/bn/var" in archive.files
    loaded = models.load_pretrained(target, path)
    got, src, tgt = _flat(loaded), _flat(source), _flat(target)
    assert set(got) == set(tgt)
    for key in got:
        want = tgt[key] if "/head/" in key else src[key]
        np.testing.assert_array_equal(got[key], want, err_msg=key)
        assert got[key].dtype == np.float32


def test_converter_style_file_loads_and_drops_classifier_and_head(tmp_path, two_inits):
    source, target = two_inits
    flat = {k.replace("/backbone/", "/", 1): v for k, v in _flat(source).items()}
    flat["params/fc/kernel"] = np.ones((8, 1000), np.float64)  # float64: cast to float32
    flat["params/fc/bias"] = np.ones((1000,))
    np.savez(tmp_path / "converted.npz", **flat)
    loaded = _flat(models.load_pretrained(target, tmp_path / "converted.npz"))
    np.testing.assert_array_equal(loaded["params/backbone/block1/conv/kernel"],
                                  _flat(source)["params/backbone/block1/conv/kernel"])
    np.testing.assert_array_equal(loaded["params/head/kernel"],
                                  _flat(target)["params/head/kernel"])
    # A bare backbone that has a classifier keeps the file's fc.
    bare = {"params": {"block1": {"conv": {"kernel": np.zeros((3, 3, 1, 8), np.float32)}},
                       "fc": {"kernel": np.zeros((8, 1000), np.float32),
                              "bias": np.zeros((1000,), np.float32)}}}
    loaded = models.load_pretrained(bare, tmp_path / "converted.npz", allow_unexpected=True)
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], 1.0)
    assert loaded["params"]["fc"]["kernel"].dtype == jnp.float32


def _broken_file(tmp_path, source):
    flat = _flat(source)
    missing = ["params/backbone/block2/conv/kernel", "batch_stats/backbone/block1/bn/mean"]
    for key in missing:
        del flat[key]
    unexpected = ["params/backbone/block9/conv/kernel", "batch_stats/backbone/block1/bn/extra",
                  "params/stray/kernel"]
    for key in unexpected:
        flat[key] = np.zeros(3, np.float32)
    misshaped = ["params/backbone/block1/bn/scale", "params/backbone/block2/bn/bias"]
    for key in misshaped:
        flat[key] = np.zeros(5, np.float32)
    path = tmp_path / "broken.npz"
    np.savez(path, **flat)
    strip = {key: key.replace("/backbone/", "/", 1) for key in missing + unexpected + misshaped}
    return path, [strip[k] for k in missing], [strip[k] for k in unexpected], \
        [strip[k] for k in misshaped]


def test_every_missing_unexpected_and_misshaped_key_is_reported_by_name(tmp_path, two_inits):
    source, target = two_inits
    path, missing, unexpected, misshaped = _broken_file(tmp_path, source)
    with pytest.raises(ValueError) as error:
        models.load_pretrained(target, path)
    message = str(error.value)
    assert "2 missing" in message and "3 unexpected" in message and "2 mis-shaped" in message
    for key in missing + unexpected + misshaped:
        assert key in message, key
    assert "file (5,) float32, model (8,)" in message


def test_allow_flags_and_misshaped_always_stops(tmp_path, two_inits, caplog):
    source, target = two_inits
    path, missing, unexpected, misshaped = _broken_file(tmp_path, source)
    for flags in ({"allow_missing": True}, {"allow_unexpected": True},
                  {"allow_missing": True, "allow_unexpected": True}):
        with pytest.raises(ValueError, match="mis-shaped") as error:
            models.load_pretrained(target, path, **flags)
        message = str(error.value)
        assert ("missing" in message) != flags.get("allow_missing", False)
        assert ("unexpected" in message) != flags.get("allow_unexpected", False)
    # Without the mis-shaped keys both flags let it load; missing leaves keep their init.
    flat = dict(np.load(path))
    for key in misshaped:
        flat[key.replace("/", "/backbone/", 1)] = _flat(source)[
            key.replace("/", "/backbone/", 1)]
    np.savez(path, **flat)
    with pytest.raises(ValueError, match="2 missing"):
        models.load_pretrained(target, path, allow_unexpected=True)
    with caplog.at_level("WARNING"):
        loaded = _flat(models.load_pretrained(target, path, allow_missing=True,
                                              allow_unexpected=True))
    for key in missing:
        full = key.replace("/", "/backbone/", 1)
        np.testing.assert_array_equal(loaded[full], _flat(target)[full])
        assert key in caplog.text
    np.testing.assert_array_equal(loaded["params/backbone/block1/conv/kernel"],
                                  _flat(source)["params/backbone/block1/conv/kernel"])
    assert all(key in caplog.text for key in unexpected)


def test_unreadable_weight_files(tmp_path, two_inits):
    _, target = two_inits
    with pytest.raises(ValueError, match="path: weight file .*does not exist"):
        models.load_pretrained(target, tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        models.load_pretrained(target, tmp_path / "junk.npz")
    np.savez(tmp_path / "objects.npz", **{"params/backbone/block1/conv/kernel":
                                          np.array([{}], dtype=object)})
    with pytest.raises(ValueError, match="not a readable .npz"):
        models.load_pretrained(target, tmp_path / "objects.npz")


def test_save_npz_is_atomic(tmp_path, two_inits, monkeypatch):
    source, target = two_inits
    path = models.save_npz(source, tmp_path / "sub" / "weights.npz")
    before = path.read_bytes()

    def failing_savez(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        models.save_npz(target, path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["weights.npz"]  # no temporary left behind
    monkeypatch.undo()
    models.save_npz(target, path)  # overwrite
    loaded = models.load_npz(path)
    np.testing.assert_array_equal(loaded["params/head/kernel"],
                                  _flat(target)["params/head/kernel"])
    bf16 = {"params": {"w": jnp.ones((2,), jnp.bfloat16)}}
    assert models.load_npz(models.save_npz(bf16, tmp_path / "b.npz"))["params/w"].dtype == \
        np.float32
    with pytest.raises(ValueError, match="variables: no 'params'"):
        models.save_npz({}, tmp_path / "empty.npz")


def test_init_variables_reads_init_from(tmp_path, two_inits, small_model):
    source, _ = two_inits
    model, _ = small_model
    path = models.save_npz(source, tmp_path / "pretrained.npz")
    loaded = models.init_variables(model, jax.random.key(9), (1, 12, 12, 1),
                                   small_config(init_from=str(path)))
    np.testing.assert_array_equal(loaded["params"]["backbone"]["block2"]["conv"]["kernel"],
                                  source["params"]["backbone"]["block2"]["conv"]["kernel"])
    assert not np.array_equal(loaded["params"]["head"]["kernel"],
                              source["params"]["head"]["kernel"])
    with pytest.raises(ValueError, match="does not exist"):
        models.init_variables(model, jax.random.key(9), (1, 12, 12, 1),
                              small_config(init_from=str(tmp_path / "nope.npz")))


class _BuggyBackbone(nn.Module):
    @nn.compact
    def __call__(self, images, train: bool = False):
        raise TypeError("a bug in the backbone")


def test_init_variables_does_not_swallow_model_errors():
    model = models.EmbeddingModel(backbone=_BuggyBackbone(), embedding_dim=4)
    with pytest.raises(TypeError, match="a bug in the backbone"):
        models.init_variables(model, jax.random.key(0), (1, 4, 4, 1))


class _FakeLowered:
    """Records compile calls; fails the optimisation-level one with `error`."""

    def __init__(self, error):
        self.error, self.calls = error, []

    def compile(self, compiler_options=None):
        self.calls.append(compiler_options)
        if compiler_options:
            raise self.error
        return "compiled"


def test_init_compile_falls_back_only_when_the_option_is_rejected():
    rejected = _FakeLowered(jax.errors.JaxRuntimeError(
        "INVALID_ARGUMENT: No such compile option: 'xla_backend_optimization_level'"))
    assert models._compile_unoptimised(rejected) == "compiled"
    assert rejected.calls == [{"xla_backend_optimization_level": 0}, None]
    for error in (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"),
                  TypeError("unexpected keyword argument"), ValueError("bad program")):
        failing = _FakeLowered(error)
        with pytest.raises(type(error), match=str(error)):
            models._compile_unoptimised(failing)
        assert len(failing.calls) == 1  # no silent retry


def test_weight_file_functions_are_reexported_from_models():
    for name in ("save_npz", "load_npz", "load_pretrained", "torchvision_key"):
        assert getattr(models, name) is getattr(weights, name)
        assert name in models.__all__


# ----------------------------------------------------------------------------------------------
# Config, build_model, model_spec.


def test_build_model_from_default_configs():
    for name, backbone_type in (("googlenet", GoogLeNet), ("resnet50", ResNet50),
                                ("small_conv", models.SmallConvNet)):
        config = models.default_config(name)
        assert config.name == name and config.embedding_dim == 64 and config.init_from is None
        model = models.build_model(config)
        assert isinstance(model, models.EmbeddingModel)
        assert isinstance(model.backbone, backbone_type) and model.embedding_dim == 64
        assert model.backbone.dtype == jnp.float32
    model = models.build_model(ml_collections.ConfigDict(dict(
        name="googlenet", embedding_dim=32, dtype="bfloat16", transform_input=False,
        dropout_rate=0.4, width=3)))  # width belongs to small_conv: ignored
    assert model.embedding_dim == 32 and model.backbone.dtype == jnp.bfloat16
    assert model.backbone.transform_input is False and model.backbone.dropout_rate == 0.4
    small = models.build_model({"name": "small_conv", "width": 32, "depth": 3,
                                "pooling": "flatten"})
    assert (small.backbone.width, small.backbone.depth, small.backbone.pooling) == \
        (32, 3, "flatten")
    config = models.default_config("small_conv")
    config.init_from = "/some/file.npz"  # the placeholder accepts a path
    assert models.build_model(config).backbone.width == 64


@pytest.mark.parametrize("overrides, match", [
    ({"name": "vgg16"}, r"model\.name='vgg16'"),
    ({"name": 3}, r"model\.name=3"),
    ({"dtype": "float16"}, r"model\.dtype='float16'"),
    ({"embedding_dim": 0}, r"model\.embedding_dim"),
    ({"embedding_dim": True}, r"model\.embedding_dim"),
    ({"embedding_dim": 6.5}, r"model\.embedding_dim"),
    ({"width": -1}, r"model\.width"),
    ({"depth": 0}, r"model\.depth"),
    ({"pooling": "mean"}, r"model\.pooling='mean'"),
    ({"allow_missing": "yes"}, r"model\.allow_missing"),
    ({"init_from": 3}, r"model\.init_from"),
    ({"colour": 1}, r"config\.model: unknown fields \['colour'\]"),
])
def test_build_model_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.build_model({"name": "small_conv", **overrides})


def test_build_model_errors_for_googlenet_fields():
    with pytest.raises(ValueError, match=r"model\.dropout_rate"):
        models.build_model({"name": "googlenet", "dropout_rate": 1.0})
    with pytest.raises(ValueError, match=r"model\.transform_input"):
        models.build_model({"name": "googlenet", "transform_input": 1})
    with pytest.raises(ValueError, match="config.model: expected a ConfigDict"):
        models.build_model("googlenet")
    with pytest.raises(ValueError, match=r"model\.name"):
        models.default_config("alexnet")


def test_model_spec():
    for name in ("googlenet", "resnet50"):
        spec = models.model_spec(name)
        assert (spec.input_size, spec.image_size, spec.channels) == (224, 256, 3)
        np.testing.assert_allclose(spec.mean, (0.485, 0.456, 0.406))
        np.testing.assert_allclose(spec.std, (0.229, 0.224, 0.225))
        assert spec.data_defaults() == {"crop_size": 224, "image_size": 256, "channels": 3,
                                        "mean": spec.mean, "std": spec.std}
    small = models.model_spec("small_conv")
    assert (small.input_size, small.channels, small.mean, small.std) == (None,) * 4
    assert small.data_defaults() == {}
    assert models.model_spec("GoogLeNet").name == "googlenet"
    with pytest.raises(ValueError, match=r"model\.name='inception'"):
        models.model_spec("inception")


def test_weight_file_path_is_used_as_given(tmp_path, two_inits):
    source, _ = two_inits
    path = models.save_npz(source, tmp_path / "weights.bin")
    assert path == Path(tmp_path / "weights.bin") and path.is_file()
