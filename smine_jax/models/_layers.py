"""Layers shared by the backbones, with PyTorch's padding and batch-norm semantics.

The backbones mirror torchvision so that converted ImageNet weights give the same outputs:
convolutions pad symmetrically by an explicit amount (never Flax's "SAME", which pads stride-2
convolutions asymmetrically), max pooling pads with -inf and supports ``ceil_mode``, and batch
norm keeps running statistics with torch's momentum 0.1 (Flax ``momentum=0.9``). All layers
work on NHWC arrays (XLA's native layout on CPU and TPU; no transposes).

Two CPU speed-ups, same numbers (measured on the small net's train step, batch 384 at 28²,
2 CPU cores: about 2× together): non-overlapping max pools are a reshape + max (their gradient is
an elementwise mask, not XLA:CPU's slow select-and-scatter), and stride-1 convolutions on the
CPU backend compute their kernel gradient as chunked im2col matmuls (`conv_general_dilated`).
A third, for the small net: batch norm + ReLU + 2×2 max pool as one op with a hand-written
gradient (`batch_norm_relu_max_pool`), fewer passes over the full-resolution activations.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# torch.nn.BatchNorm2d(momentum=0.1): running = 0.9 * running + 0.1 * batch statistic.
BN_MOMENTUM = 0.9

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"), as torchvision's ResNet.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# Rows of the im2col matrix per step of the kernel-gradient loop: ~10 MB of float32 patches for
# a 3×3×64 kernel, small enough for the caches, large enough for an efficient matmul.
_KERNEL_GRAD_ROWS = 6272
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_nhwc(x, kernel, padding):
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def _chunk_size(batch: int, rows_per_image: int) -> int:
    """Largest divisor of `batch` whose images give at most _KERNEL_GRAD_ROWS rows (>= 1)."""
    limit = max(_KERNEL_GRAD_ROWS // max(rows_per_image, 1), 1)
    return max(d for d in range(1, min(batch, limit) + 1) if batch % d == 0)


def _kernel_grad(x, d_out, kernel_shape, padding):
    """∂L/∂kernel of a stride-1 NHWC conv: Σ over images of im2col(x)ᵀ · ∂L/∂out, in chunks.

    XLA:CPU lowers this gradient to a convolution whose "kernel" is the whole output map, 5–10×
    slower than the forward pass (64 → 64 channels, 3×3, 14², batch 384); a loop of im2col
    matmuls over chunks of images that fit in cache does the same sums 2–4× faster.
    """
    kh, kw, channels, features = kernel_shape
    batch, out_h, out_w, _ = d_out.shape
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    chunk = _chunk_size(batch, out_h * out_w)

    def accumulate(total, chunk_arrays):
        x_chunk, d_chunk = chunk_arrays
        patches = jnp.concatenate([x_chunk[:, i:i + out_h, j:j + out_w, :]
                                   for i in range(kh) for j in range(kw)], axis=-1)
        total += jnp.dot(patches.reshape(-1, kh * kw * channels).T,
                         d_chunk.reshape(-1, features), preferred_element_type=jnp.float32)
        return total, None

    chunks = (x.reshape(batch // chunk, chunk, *x.shape[1:]),
              d_out.reshape(batch // chunk, chunk, *d_out.shape[1:]))
    total = jnp.zeros((kh * kw * channels, features), jnp.float32)
    total, _ = lax.scan(accumulate, total, chunks)
    return total.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_im2col_grad(x, kernel, padding):
    """A stride-1 NHWC conv (XLA's) whose kernel gradient is `_kernel_grad`."""
    return _conv_nhwc(x, kernel, padding)


def _conv_im2col_grad_fwd(x, kernel, padding):
    return _conv_nhwc(x, kernel, padding), (x, kernel)


def _conv_im2col_grad_bwd(padding, residuals, d_out):
    x, kernel = residuals
    d_x = jax.linear_transpose(lambda x_: _conv_nhwc(x_, kernel, padding), x)(d_out)[0]
    d_kernel = _kernel_grad(x, d_out, kernel.shape, padding).astype(kernel.dtype)
    return d_x, d_kernel


_conv_im2col_grad.defvjp(_conv_im2col_grad_fwd, _conv_im2col_grad_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """``lax.conv_general_dilated`` for ``nn.Conv``, with a faster kernel gradient on CPU.

    On the CPU backend, plain stride-1 NHWC convolutions take `_conv_im2col_grad` (same forward
    pass, same input gradient, im2col kernel gradient); everything else, and every other
    backend (cuDNN / TPU convolutions have fast gradients), is ``lax.conv_general_dilated``.
    """
    plain = (jax.default_backend() == "cpu" and tuple(window_strides) == (1, 1)
             and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and feature_group_count == 1 and precision is None and not kwargs
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
             and not isinstance(padding, str))
    if plain:
        return _conv_im2col_grad(lhs, rhs, tuple(tuple(int(p) for p in pair)
                                                 for pair in padding))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)


def conv2d(features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
           dtype: Any = jnp.float32, kernel_init=kaiming_fan_out,
           name: str | None = None) -> nn.Conv:
    """torch.nn.Conv2d(bias=False) in NHWC: square kernel, symmetric explicit padding."""
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=False,
                   dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                   conv_general_dilated=conv_general_dilated, name=name)


def batch_norm(*, train: bool, epsilon: float, dtype: Any = jnp.float32,
               name: str | None = None) -> nn.BatchNorm:
    """torch.nn.BatchNorm2d over the channel axis; statistics and parameters in float32.

    Difference from torch: the running variance is updated with the biased batch variance
    (torch uses the unbiased one); it only matters for tiny batches.
    """
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=epsilon,
                        dtype=dtype, param_dtype=jnp.float32, name=name)


def pool_output_size(size: int, window: int, stride: int, padding: int,
                     ceil_mode: bool) -> int:
    """torch.nn.MaxPool2d's output length along one axis (dilation 1)."""
    span = size + 2 * padding - window
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:  # the last window must start inside the input
        out -= 1
    return out


def max_pool2d(x, window: int, stride: int, *, padding: int = 0, ceil_mode: bool = False):
    """torch.nn.MaxPool2d on NHWC input: padding with -inf, optional ceil_mode.

    Non-overlapping windows (window == stride, e.g. 2×2/2) are a reshape + max: on XLA:CPU its
    gradient is an elementwise mask, 5–10× faster than the select-and-scatter of
    ``reduce_window``'s gradient (measured at [384, 28, 28, 64]). At tied maxima the gradient is
    shared among the ties instead of going to the first one; after a ReLU the ties are zeros,
    whose gradient the ReLU blocks anyway.
    """
    outs = [pool_output_size(size, window, stride, padding, ceil_mode) for size in x.shape[1:3]]
    # High padding so that exactly `out` windows fit (> padding in ceil mode, <= in floor).
    pads = [(padding, max((out - 1) * stride + window - size - padding, 0))
            for size, out in zip(x.shape[1:3], outs, strict=True)]
    if window != stride:
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))
    if any(low or high for low, high in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    (out_h, out_w), channels = outs, x.shape[-1]
    x = x[:, :out_h * window, :out_w * window]
    x = x.reshape(x.shape[0], out_h, window, out_w, window, channels)
    return jnp.max(x, axis=(2, 4))


def global_average_pool(x):
    """Mean over H and W in float32 -> [N, C] (torch AdaptiveAvgPool2d(1) + flatten)."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm -> ReLU; submodules conv, bn."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    epsilon: float = 1e-3
    dtype: Any = jnp.float32
    kernel_init: Any = kaiming_fan_out

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv2d(self.features, self.kernel_size, stride=self.stride, padding=self.padding,
                   dtype=self.dtype, kernel_init=self.kernel_init, name="conv")(x)
        x = batch_norm(train=train, epsilon=self.epsilon, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


# ----------------------------------------------------------------------------------------------
# Batch norm (train mode) + ReLU + 2×2 max pool as one op with a hand-written gradient.


def _pool_windows(z):
    """[N, H, W, C] -> [N, H//2, 2, W//2, 2, C]: the 2×2/2 windows (floor: odd edges dropped)."""
    n, h, w, c = z.shape
    return z[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


def _normalise(y, scale, bias, mean, inv_std):
    """The batch-normalised y in float32 (one expression for the forward and backward pass)."""
    return y.astype(jnp.float32) * (scale * inv_std) + (bias - mean * scale * inv_std)


def _bn_statistics(y):
    """Batch mean and biased variance E[y²] − E[y]² per channel, in float32 (as nn.BatchNorm)."""
    y32 = y.astype(jnp.float32)
    mean = jnp.mean(y32, axis=(0, 1, 2))
    return mean, jnp.maximum(jnp.mean(jnp.square(y32), axis=(0, 1, 2)) - jnp.square(mean), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_relu_max_pool(y, scale, bias, epsilon: float):
    """relu(max_pool_2x2(batch_norm(y))) in train mode -> (out, batch mean, batch variance).

    Same values and (sub)gradients as the composition of ``nn.BatchNorm`` (batch statistics,
    float32), ``nn.relu`` and ``max_pool2d(·, 2, 2)`` — a window's gradient is shared among tied
    maxima, as JAX's ``max`` does — in fewer passes over the full-resolution activations: nothing
    but ``y`` is kept for the backward pass, which recomputes the normalised values instead of
    reading saved ones, and ReLU (which commutes with max) runs on the pooled map. XLA:CPU spends
    most of the small net's first block on memory traffic; see ``SmallConvNet``.
    """
    return _bn_relu_pool_fwd(y, scale, bias, epsilon)[0]


def _bn_relu_pool_fwd(y, scale, bias, epsilon):
    mean, var = _bn_statistics(y)
    inv_std = lax.rsqrt(var + epsilon)
    pooled = jnp.max(_pool_windows(_normalise(y, scale, bias, mean, inv_std)), axis=(2, 4))
    out = jnp.maximum(pooled, 0.0).astype(y.dtype)
    return (out, mean, var), (y, scale, bias, mean, inv_std)


def _bn_relu_pool_bwd(epsilon, residuals, cotangents):
    y, scale, bias, mean, inv_std = residuals
    d_out, d_mean, d_var = (c.astype(jnp.float32) for c in cotangents)
    n, h, w, c = y.shape
    count = n * h * w
    # Window maxima recomputed from the same values they are compared with (exact ties).
    windows = _pool_windows(_normalise(y, scale, bias, mean, inv_std))
    pooled = jnp.max(windows, axis=(2, 4), keepdims=True)
    is_max = (windows == pooled).astype(jnp.float32)
    share = jnp.where(pooled > 0, d_out[:, :, None, :, None, :], 0.0) / jnp.sum(
        is_max, axis=(2, 4), keepdims=True)
    d_normalised = (is_max * share).reshape(n, h // 2 * 2, w // 2 * 2, c)
    d_normalised = jnp.pad(d_normalised, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    # Batch-norm backward (the statistics depend on y), plus the mean / variance outputs' terms.
    centred = y.astype(jnp.float32) - mean
    d_bias = jnp.sum(d_normalised, axis=(0, 1, 2))
    d_scale = jnp.sum(d_normalised * centred, axis=(0, 1, 2)) * inv_std
    d_y = (scale * inv_std) * (d_normalised - (d_bias + centred * inv_std * d_scale) / count)
    d_y = d_y + (d_mean + 2.0 * d_var * centred) / count
    return d_y.astype(y.dtype), d_scale, d_bias


batch_norm_relu_max_pool.defvjp(_bn_relu_pool_fwd, _bn_relu_pool_bwd)


class BatchNormReluMaxPool(nn.Module):
    """``batch_norm`` + ReLU + ``max_pool2d(·, 2, 2)``, fused (``batch_norm_relu_max_pool``).

    Variables as ``nn.BatchNorm``'s (params scale / bias, batch_stats mean / var, torch's
    momentum), so checkpoints and converted weights are those of the unfused layers.
    """

    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y, train: bool = False):
        channels = y.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if not train:
            inv_std = lax.rsqrt(running_var.value + self.epsilon)
            normalised = _normalise(y, scale, bias, running_mean.value, inv_std)
            return nn.relu(jnp.max(_pool_windows(normalised), axis=(2, 4))).astype(self.dtype)
        out, mean, var = batch_norm_relu_max_pool(y, scale, bias, self.epsilon)
        if not self.is_initializing():
            running_mean.value = BN_MOMENTUM * running_mean.value + (1 - BN_MOMENTUM) * mean
            running_var.value = BN_MOMENTUM * running_var.value + (1 - BN_MOMENTUM) * var
        return out.astype(self.dtype)
