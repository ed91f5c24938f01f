"""A small conv net for CPU work (Omniglot-sized images: 28² or 32², 1 or 3 channels).

``depth`` blocks of conv 3×3 (``width`` channels, padding 1, no bias) + BatchNorm + ReLU + 2×2
max pool (stride 2, floor), then ``pooling``: "avg" (global average, [N, width]; the default,
independent of the image size), "max" (global max) or "flatten" ([N, H'·W'·width], the classic
"Conv-4" of few-shot learning). At 28² the four pools leave 1×1 (28 → 14 → 7 → 3 → 1), so all
three give the same 64 features there; at 32² they leave 2×2.

NHWC end to end (XLA's native layout on CPU: no transposes). Module names ``block1`` …
``block<depth>``, each with ``conv`` and ``bn`` (``params/block1/conv/kernel``,
``batch_stats/block1/bn/mean``, ...). No pretrained weights exist for it, so no fixed input
statistics (``model_spec("small_conv")``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from smine_jax.models._layers import BatchNormReluMaxPool, conv2d, global_average_pool

POOLINGS = ("avg", "max", "flatten")


class ConvBlock(nn.Module):
    """conv 3×3 (padding 1, no bias) -> BatchNorm -> ReLU -> 2×2 max pool; submodules conv, bn.

    The last three are one fused op (`BatchNormReluMaxPool`): same numbers as the unfused
    layers, 941 -> 950-1,030 train images/s on a 2-core CPU (benchmarks/train_bench.py).
    """

    features: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv2d(self.features, 3, padding=1, dtype=self.dtype, name="conv")(x)
        return BatchNormReluMaxPool(self.epsilon, dtype=self.dtype, name="bn")(x, train)


class SmallConvNet(nn.Module):
    """``depth`` × [conv 3×3 + BN + ReLU + 2×2 max pool] -> pooled float32 features.

    Attributes:
      width: channels of every conv (64).
      depth: number of blocks (4); images need at least 2**depth pixels a side.
      pooling: "avg", "max" or "flatten" (see the module docstring).
      dtype: activation dtype (parameters and batch statistics stay float32).
    """

    width: int = 64
    depth: int = 4
    pooling: str = "avg"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {self.pooling!r}")
        if min(x.shape[1:3]) < 2 ** self.depth:
            raise ValueError(f"images: {self.depth} blocks of 2×2 pooling need at least "
                             f"{2 ** self.depth} pixels a side, got shape {x.shape}")
        x = x.astype(self.dtype)
        for block in range(1, self.depth + 1):
            x = ConvBlock(self.width, dtype=self.dtype, name=f"block{block}")(x, train)
        if self.pooling == "avg":
            return global_average_pool(x)
        if self.pooling == "max":
            return jnp.max(x, axis=(1, 2)).astype(jnp.float32)
        return x.reshape(x.shape[0], -1).astype(jnp.float32)
