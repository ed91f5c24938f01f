"""ResNet-50 in torchvision's layout (v1.5: stride on the 3×3 conv), NHWC, Flax Linen.

    conv1 (7×7/2, 64, no bias) → bn1 → ReLU → maxpool (3×3/2, pad 1)
    → layer1 (3 Bottlenecks, width 64) → layer2 (4, 128, /2) → layer3 (6, 256, /2)
    → layer4 (3, 512, /2) → global average pool [N, 2048] → fc (only with num_classes)

Bottleneck (expansion 4): conv1 1×1 → bn1 → ReLU → conv2 3×3 with the block's stride → bn2 →
ReLU → conv3 1×1 (4 × width) → bn3, plus the shortcut — ``downsample`` (1×1 conv with the stride,
then BatchNorm) in the first block of each layer — then ReLU. Batch norm eps 1e-5; convs have no
bias; weights initialised as torchvision (Kaiming normal, fan_out; BN scale 1, bias 0).

Flax path ↔ torchvision key: the rule of ``smine_jax.models.torchvision_key`` (module names
``layer<i>_<j>`` and ``downsample_<j>`` are the ``torch.nn.Sequential`` slots ``layer<i>.<j>``
and ``downsample.<j>``; kernel ↔ weight, scale ↔ weight, mean ↔ running_mean, var ↔ running_var),
e.g. ``params/layer2_0/downsample_0/kernel`` ↔ ``layer2.0.downsample.0.weight``,
``batch_stats/layer3_5/bn3/mean`` ↔ ``layer3.5.bn3.running_mean``, ``params/bn1/scale`` ↔
``bn1.weight``. Conv kernels are [kh, kw, in, out] here and [out, in, kh, kw] in torch; fc's
kernel is [in, out] here and [out, in] in torch.

Parameters: 23,508,032 without fc; 25,557,032 with a 1000-way fc (torchvision's count); plus
2 × 26,560 batch-norm statistics.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from smine_jax.models._layers import batch_norm, conv2d, global_average_pool, max_pool2d

_EPSILON = 1e-5
# (blocks, width, stride of the first block) of layer1..layer4.
_LAYERS = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))
EXPANSION = 4
FEATURE_DIM = 512 * EXPANSION


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5) with an optional downsample shortcut."""

    width: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        def conv_bn(y, features, kernel, stride, padding, conv_name, bn_name):
            y = conv2d(features, kernel, stride=stride, padding=padding, dtype=self.dtype,
                       name=conv_name)(y)
            return batch_norm(train=train, epsilon=_EPSILON, dtype=self.dtype, name=bn_name)(y)

        out_features = self.width * EXPANSION
        y = nn.relu(conv_bn(x, self.width, 1, 1, 0, "conv1", "bn1"))
        y = nn.relu(conv_bn(y, self.width, 3, self.stride, 1, "conv2", "bn2"))
        y = conv_bn(y, out_features, 1, 1, 0, "conv3", "bn3")
        if self.downsample:
            x = conv_bn(x, out_features, 1, self.stride, 0, "downsample_0", "downsample_1")
        return nn.relu(y + x)


class ResNet50(nn.Module):
    """ResNet-50 backbone: NHWC float images -> float32 features [N, 2048] (or logits).

    Attributes:
      num_classes: None (default) returns the pooled features; an int adds the classifier fc.
      dtype: activation dtype (parameters and batch statistics stay float32).
    """

    num_classes: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        x = conv2d(64, 7, stride=2, padding=3, dtype=self.dtype, name="conv1")(x)
        x = batch_norm(train=train, epsilon=_EPSILON, dtype=self.dtype, name="bn1")(x)
        x = max_pool2d(nn.relu(x), 3, 2, padding=1)
        in_features = 64
        for layer, (blocks, width, stride) in enumerate(_LAYERS, start=1):
            for block in range(blocks):
                block_stride = stride if block == 0 else 1
                downsample = block == 0 and (block_stride != 1
                                             or in_features != width * EXPANSION)
                x = Bottleneck(width, block_stride, downsample, dtype=self.dtype,
                               name=f"layer{layer}_{block}")(x, train)
                in_features = width * EXPANSION
        x = global_average_pool(x)  # float32 [N, 2048]
        if self.num_classes is not None:
            x = nn.Dense(self.num_classes, param_dtype=jnp.float32,
                         kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                         name="fc")(x)
        return x
