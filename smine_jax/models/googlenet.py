"""GoogLeNet / Inception-v1 in torchvision's layout (batch-norm variant), NHWC, Flax Linen.

The backbone of the paper (method.md §5), written so that torchvision's ``googlenet``
ImageNet weights convert mechanically. Layers, in torchvision's order and names:

    conv1 (7×7/2, 64) → maxpool1 (3×3/2, ceil) → conv2 (1×1, 64) → conv3 (3×3, 192)
    → maxpool2 → inception3a, 3b → maxpool3 → inception4a … 4e → maxpool4 (2×2/2, ceil)
    → inception5a, 5b → global average pool [N, 1024] → dropout → fc (only with num_classes)

Each convolution is a BasicConv2d (conv without bias + BatchNorm(eps=0.001) + ReLU). An Inception
block concatenates, in this channel order, branch1 (1×1), branch2 (1×1 → 3×3), branch3 (1×1 →
"5×5", which torchvision — and therefore its weights — implements as a **3×3** conv; kept) and
branch4 (3×3/1 max pool → 1×1). The auxiliary classifiers (aux1, aux2) are omitted: they only
add a training-time classification loss, which metric learning does not use; a torchvision
state dict's ``aux1.*`` / ``aux2.*`` keys are therefore not part of the mapping (the converter
drops them).

``transform_input`` (torchvision semantics; default True here, as torchvision sets it whenever
it loads its ImageNet weights): the input is expected normalised with ImageNet mean/std
(``model_spec("googlenet")``, done by the data pipeline) and is re-mapped per channel to
``(x_raw - 0.5) / 0.5``, the scaling the original Google weights were trained with:
``x_c * std_c / 0.5 + (mean_c - 0.5) / 0.5``. It needs 3 (RGB) channels.

**Flax path ↔ torchvision key** (one rule for every backbone in ``smine_jax.models``; see
``smine_jax.models.torchvision_key``): join the path components with "." after turning a
trailing ``_<index>`` of a module name into ``.<index>`` (a ``torch.nn.Sequential`` slot), and
rename the leaf:

    params/<module>/conv/kernel   [kh, kw, in, out]  ↔ <module>.conv.weight   [out, in, kh, kw]
    params/<module>/bn/scale                          ↔ <module>.bn.weight
    params/<module>/bn/bias                           ↔ <module>.bn.bias
    batch_stats/<module>/bn/mean                      ↔ <module>.bn.running_mean
    batch_stats/<module>/bn/var                       ↔ <module>.bn.running_var
    params/fc/kernel              [in, out]           ↔ fc.weight               [out, in]
    params/fc/bias                                    ↔ fc.bias
    (``*.bn.num_batches_tracked`` has no Flax counterpart)

e.g. ``params/inception3a/branch2_0/conv/kernel`` ↔ ``inception3a.branch2.0.conv.weight`` and
``batch_stats/inception4e/branch4_1/bn/var`` ↔ ``inception4e.branch4.1.bn.running_var``
(``branch4.0`` is the parameter-free max pool, so branch4's conv is slot 1, as in torchvision).

Parameters: 5,599,904 without fc (torchvision's 6,624,904 for ``aux_logits=False`` minus the
1,025,000 of fc), plus 2 × 7,280 batch-norm statistics.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from smine_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from smine_jax.models._layers import BasicConv2d, global_average_pool, max_pool2d

# torchvision's GoogLeNet init: trunc_normal_(std=0.01, a=-2, b=2) for conv and linear weights
# (bounds at ±200 σ: a plain normal).
_init = nn.initializers.normal(0.01)

# After conv3/maxpool2, as in torchvision: (name, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5,
# pool_proj) for an Inception block, (name, window) for a stride-2 ceil-mode max pool.
_STAGES = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    ("maxpool3", 3),
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    ("maxpool4", 2),
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)
FEATURE_DIM = 1024


class Inception(nn.Module):
    """torchvision's Inception block (branches concatenated on the channel axis, NHWC)."""

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv2d, dtype=self.dtype, kernel_init=_init)
        branch1 = conv(self.ch1x1, 1, name="branch1")(x, train)
        branch2 = conv(self.ch3x3red, 1, name="branch2_0")(x, train)
        branch2 = conv(self.ch3x3, 3, padding=1, name="branch2_1")(branch2, train)
        branch3 = conv(self.ch5x5red, 1, name="branch3_0")(x, train)
        branch3 = conv(self.ch5x5, 3, padding=1, name="branch3_1")(branch3, train)  # "5×5"
        branch4 = max_pool2d(x, 3, 1, padding=1, ceil_mode=True)  # branch4.0
        branch4 = conv(self.pool_proj, 1, name="branch4_1")(branch4, train)
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class GoogLeNet(nn.Module):
    """Inception-v1 backbone: NHWC float images -> float32 features [N, 1024] (or logits).

    Attributes:
      num_classes: None (default) returns the pooled features; an int adds torchvision's
        classifier ``fc`` (e.g. 1000 to compare logits with torchvision).
      transform_input: torchvision's input re-mapping (see the module docstring).
      dropout_rate: dropout on the pooled features in training (torchvision: 0.2); a rate > 0
        needs ``rngs={"dropout": key}`` when applied with ``train=True``.
      dtype: activation dtype (parameters and batch statistics stay float32).
    """

    num_classes: int | None = None
    transform_input: bool = True
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.transform_input:
            if x.shape[-1] != 3:
                raise ValueError(f"images: transform_input needs 3 (RGB) channels, got shape "
                                 f"{x.shape}")
            mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
            x = x.astype(jnp.float32) * (std / 0.5) + (mean - 0.5) / 0.5
        x = x.astype(self.dtype)
        conv = functools.partial(BasicConv2d, dtype=self.dtype, kernel_init=_init)
        x = conv(64, 7, stride=2, padding=3, name="conv1")(x, train)
        x = max_pool2d(x, 3, 2, ceil_mode=True)  # maxpool1
        x = conv(64, 1, name="conv2")(x, train)
        x = conv(192, 3, padding=1, name="conv3")(x, train)
        x = max_pool2d(x, 3, 2, ceil_mode=True)  # maxpool2
        for name, *sizes in _STAGES:
            if name.startswith("maxpool"):
                x = max_pool2d(x, sizes[0], 2, ceil_mode=True)
            else:
                x = Inception(*sizes, dtype=self.dtype, name=name)(x, train)
        x = global_average_pool(x)  # float32 [N, 1024]
        if self.dropout_rate > 0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        if self.num_classes is not None:
            x = nn.Dense(self.num_classes, kernel_init=_init, param_dtype=jnp.float32,
                         name="fc")(x)
        return x
