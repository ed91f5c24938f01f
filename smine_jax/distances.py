"""The distance numerics every loss and in-batch miner shares: one formula, one square root.

Squared Euclidean distances come from explicit differences, sum((x_i - x_j)^2), not from the
expanded ||x||^2 + ||y||^2 - 2 x.y. The expanded form cancels catastrophically for close rows:
it leaves ~1e-7 residues on duplicates (distances ~3e-4, and a noisy gradient of the lifted
loss) and can round a near-tie differently from the loss that later evaluates the same pair.
The difference form is exactly 0 on the diagonal and for duplicate rows, exactly symmetric, and
XLA fuses the subtract-square-reduce, so the [B, B, D] difference tensor is not materialised.

Plain distances go through ``safe_sqrt``: its value and gradient are 0 for squared distances
below float32's smallest normal (distances < 1.1e-19), so d sqrt(s)/ds = 1 / (2 sqrt(s)) stays
finite even where denormals are flushed to zero, and duplicates get a zero, not infinite,
gradient. The "double where" keeps the untaken branch's infinite derivative out of the gradient.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Smallest normal float32: squared distances below it count as 0 in ``safe_sqrt``.
SQRT_FLOOR = float(np.finfo(np.float32).tiny)


def row_sq_dists(x, y):
    """float32 [...]: ||x_i - y_i||^2 over the last axis, from the differences."""
    difference = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
    return jnp.sum(difference * difference, axis=-1)


def pairwise_sq_dists(x, mask=None):
    """float32 [N, N] squared distances between the rows of ``x`` [N, D].

    With ``mask`` (bool [N]) the padded rows are zeroed first, so NaN or inf in them cannot
    reach any other row's distances (or their gradients).
    """
    x = jnp.asarray(x, jnp.float32)
    if mask is not None:
        x = jnp.where(jnp.asarray(mask)[:, None], x, 0.0)
    return row_sq_dists(x[:, None, :], x[None, :, :])


def safe_sqrt(squared):
    """sqrt(s), with value and gradient 0 where s is below float32's smallest normal."""
    positive = squared > SQRT_FLOOR
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
