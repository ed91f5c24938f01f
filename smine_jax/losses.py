"""Metric-learning losses: the ratio triplet and global losses of Smart Mining, and baselines.

Smart Mining (Harwood et al., ICCV 2017) trains with the ratio triplet loss (Eq. 2) plus the
global loss (Eq. 3); the comparison table's baselines use the FaceNet margin triplet loss, the
lifted structured loss (Song et al., CVPR 2016) and the multi-class N-pair loss (Sohn, NIPS 2016).

Conventions shared by every function here:

* Pure and jit-compatible (static shapes, no host callbacks). Python-level options (``mask is
  None``, ``use_global``, ``triplet_loss``) are static; numeric hyper-parameters may be traced.
* Math in float32 whatever the input dtype (bf16 backbones included); outputs are float32.
* ``mask`` (bool [B] or [N]) marks the valid rows of a padded batch. A masked row changes neither
  the value nor the gradient, even if it holds NaN or inf: it is replaced by zeros *before* any
  arithmetic (a ``where`` after the arithmetic would still leak ``0 * NaN = NaN`` into the
  gradient). Per-row losses are 0 at masked rows; their gradient there is 0.
* Distances come from ``smine_jax.distances`` (explicit differences, one safe square root whose
  gradient is 0 at distance 0), so gradients are finite everywhere (duplicates included).
* Argument checks look only at shapes, dtypes and concrete hyper-parameters, so they also work
  on tracers inside ``jax.jit``; they raise ValueError naming the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from smine_jax import distances, validation

# Stand-in for log(0) in log-sum-exp: finite, so nothing becomes inf - inf = NaN, and far below
# any real logit, so exp(_EXCLUDED_LOGIT - real logit) is exactly 0 in float32.
_EXCLUDED_LOGIT = -1e30

_TRIPLET_LOSSES = ("ratio", "margin")


# ----------------------------------------------------------------------------------------------
# Argument checks (shape/dtype metadata only: valid for numpy arrays, jax arrays and tracers).
# ----------------------------------------------------------------------------------------------


def _dtype_of(value) -> np.dtype:
    """The dtype of an array, tracer or nested list (bf16 included), without a device copy."""
    dtype = getattr(value, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(value).dtype


def _check_matrix(value, name: str, num_rows: int | None = None, dim: int | None = None):
    """Checks a real [N, D] array (N may be fixed by an earlier argument); returns its shape."""
    shape = np.shape(value)
    dtype = _dtype_of(value)
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {tuple(shape)}")
    if jnp.issubdtype(dtype, jnp.bool_) or not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise ValueError(f"{name}: expected a real-valued array, got dtype {dtype}")
    if num_rows is not None and (shape[0], shape[1]) != (num_rows, dim):
        raise ValueError(
            f"{name}: expected shape ({num_rows}, {dim}) to match the first argument, "
            f"got {tuple(shape)}")
    return shape


def _check_vector(value, name: str, num_rows: int, *, kind: str):
    """Checks a [N] array of bool (`kind="bool"`) or integer (`kind="int"`) entries."""
    shape = np.shape(value)
    dtype = _dtype_of(value)
    if len(shape) != 1 or shape[0] != num_rows:
        raise ValueError(
            f"{name}: expected a 1-D array of {num_rows} entries (one per row), "
            f"got shape {tuple(shape)}")
    is_bool = jnp.issubdtype(dtype, jnp.bool_)
    if kind == "bool" and not is_bool:
        raise ValueError(f"{name}: expected a boolean array, got dtype {dtype}")
    if kind == "int" and (is_bool or not jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{name}: expected integer class labels, got dtype {dtype}")


def _check_scalar(value, name: str, *, minimum: float | None = None, strict: bool = False):
    """Checks a concrete hyper-parameter is a finite real >= (or >) `minimum`; skips tracers."""
    if not validation.is_concrete(value):
        return
    if np.ndim(value) != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {np.shape(value)}")
    number = float(value)
    bound_broken = minimum is not None and (number <= minimum if strict else number < minimum)
    if not np.isfinite(number) or bound_broken:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        raise ValueError(f"{name}: expected a finite number{bound}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Shared building blocks.
# ----------------------------------------------------------------------------------------------


def _select_rows(mask, *arrays):
    """Float32 copies of `arrays` with masked rows zeroed before any arithmetic; plus validity.

    Returns (valid f32[N] of 0/1, *arrays as f32). With `mask=None` every row is valid.
    """
    arrays = tuple(jnp.asarray(x).astype(jnp.float32) for x in arrays)
    num_rows = arrays[0].shape[0]
    if mask is None:
        return (jnp.ones((num_rows,), jnp.float32), *arrays)
    mask = jnp.asarray(mask)
    selected = tuple(jnp.where(mask[:, None], x, 0.0) for x in arrays)
    return (mask.astype(jnp.float32), *selected)


def _prepare_triplets(anchor, positive, negative, mask):
    """Checks a triplet batch and returns (valid f32[B], ||a-p||^2 f32[B], ||a-n||^2 f32[B])."""
    num_rows, dim = _check_matrix(anchor, "anchor")
    _check_matrix(positive, "positive", num_rows, dim)
    _check_matrix(negative, "negative", num_rows, dim)
    if mask is not None:
        _check_vector(mask, "mask", num_rows, kind="bool")
    valid, anchor, positive, negative = _select_rows(mask, anchor, positive, negative)
    return valid, distances.row_sq_dists(anchor, positive), distances.row_sq_dists(anchor, negative)


def _zero_invalid(per_row, valid):
    """Per-row loss with masked rows set to 0 (inputs were already zeroed, so no NaN to leak)."""
    return jnp.where(valid > 0, per_row, 0.0)


def _ratio_from_sq(sq_pos, sq_neg, margin):
    """Eq. 2 of Harwood et al.: max(0, 1 - d(a,n) / (d(a,p) + m)), plain distances."""
    return jax.nn.relu(1.0 - distances.safe_sqrt(sq_neg) / (distances.safe_sqrt(sq_pos) + margin))


def _margin_from_sq(sq_pos, sq_neg, margin):
    """FaceNet (Schroff et al. 2015): max(0, ||a-p||^2 - ||a-n||^2 + m), squared distances."""
    return jax.nn.relu(sq_pos - sq_neg + margin)


def _masked_mean(values, valid):
    """Mean over the valid entries; 0 (with zero gradient) when there is none."""
    count = jnp.sum(valid)
    return jnp.sum(values * valid) / jnp.maximum(count, 1.0)


def _global_terms(sq_pos, sq_neg, valid, margin, weight):
    """Eq. 3 of Harwood et al. and the statistics it is built from.

    d+ = ||a-p||^2 / 4, d- = ||a-n||^2 / 4 (each in [0, 1] for unit vectors); population (1/N)
    means and variances over the valid triplets (two-pass variance, not E[x^2] - E[x]^2);
    J_g = (var+ + var-) + weight * max(0, mu+ - mu- + margin). No valid triplet: every term 0.
    Returns (J_g, dict with mu_pos, mu_neg, var_pos, var_neg, num_valid).
    """
    d_pos = sq_pos / 4.0
    d_neg = sq_neg / 4.0
    mu_pos = _masked_mean(d_pos, valid)
    mu_neg = _masked_mean(d_neg, valid)
    var_pos = _masked_mean(jnp.square(d_pos - mu_pos), valid)
    var_neg = _masked_mean(jnp.square(d_neg - mu_neg), valid)
    num_valid = jnp.sum(valid)
    hinge = jnp.where(num_valid > 0, jax.nn.relu(mu_pos - mu_neg + margin), 0.0)
    value = (var_pos + var_neg) + weight * hinge
    stats = {"mu_pos": mu_pos, "mu_neg": mu_neg, "var_pos": var_pos, "var_neg": var_neg,
             "num_valid": num_valid}
    return value, stats


# ----------------------------------------------------------------------------------------------
# Public losses.
# ----------------------------------------------------------------------------------------------


def triplet_ratio_loss(anchor, positive, negative, *, margin=0.2, mask=None):
    """Ratio triplet loss of Smart Mining (Eq. 2, method.md §1), one value per triplet.

    J_t = max(0, 1 − ‖a − n‖ / (‖a − p‖ + margin)) with plain (not squared) Euclidean distances:
    zero iff ‖a − n‖ >= ‖a − p‖ + margin, so a triplet counts in the training error while the
    negative is not a margin farther than the positive. Pure and jit-compatible; finite gradients
    everywhere (duplicates included).

    Args:
      anchor: [B, D] real array (any float dtype, bf16 included, or integer; not bool): the
        anchors' embeddings. Math in float32.
      positive: [B, D] real array, same shape as ``anchor``: row i of the anchor's class.
      negative: [B, D] real array, same shape as ``anchor``: row i of another class.
      margin: m of Eq. 2, a finite scalar > 0 (keeps the ratio finite at a = p); Python float or
        f32[], may be traced (checked when concrete).
      mask: optional bool[B] (None: every row is valid); None versus an array is static under
        jit, the values may be traced.
        A False row gets loss 0 and no gradient, whatever it holds (NaN included).

    Returns:
      f32[B]: J_t of each triplet, in [0, 1]; 0 at masked rows.

    Raises:
      ValueError: naming the argument: ``anchor`` not 2-D or not real-valued; ``positive`` or
        ``negative`` not of the anchor's shape [B, D]; ``mask`` not a bool array of shape [B];
        a concrete ``margin`` not a finite scalar > 0.

    Example:
      >>> import numpy as np
      >>> from smine_jax import losses
      >>> anchor = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
      >>> positive = np.array([[0.6, 0.8], [0.0, 1.0]], np.float32)
      >>> negative = np.array([[0.8, 0.6], [1.0, 0.0]], np.float32)
      >>> np.asarray(losses.triplet_ratio_loss(anchor, positive, negative, margin=0.2)).round(3)
      array([0.422, 0.   ], dtype=float32)
    """
    _check_scalar(margin, "margin", minimum=0.0, strict=True)
    valid, sq_pos, sq_neg = _prepare_triplets(anchor, positive, negative, mask)
    return _zero_invalid(_ratio_from_sq(sq_pos, sq_neg, margin), valid)


def triplet_margin_loss(anchor, positive, negative, *, margin=0.2, mask=None):
    """FaceNet margin triplet loss (Schroff et al. 2015), one value per triplet: the baseline loss.

    max(0, ‖a − p‖² − ‖a − n‖² + margin) on squared Euclidean distances (method.md §1,
    baselines). Pure and jit-compatible.

    Args:
      anchor: [B, D] real array (any float dtype, bf16 included, or integer; not bool): the
        anchors' embeddings. Math in float32.
      positive: [B, D] real array, same shape as ``anchor``: row i of the anchor's class.
      negative: [B, D] real array, same shape as ``anchor``: row i of another class.
      margin: α of FaceNet, a finite scalar (any sign accepted); Python float or f32[], may be
        traced (checked when concrete).
      mask: optional bool[B] (None: every row is valid); None versus an array is static under
        jit, the values may be traced.
        A False row gets loss 0 and no gradient, whatever it holds (NaN included).

    Returns:
      f32[B]: the loss of each triplet, >= 0; 0 at masked rows.

    Raises:
      ValueError: naming the argument: ``anchor`` not 2-D or not real-valued; ``positive`` or
        ``negative`` not of the anchor's shape [B, D]; ``mask`` not a bool array of shape [B];
        a concrete ``margin`` not a finite scalar.

    Example:
      >>> import numpy as np
      >>> from smine_jax import losses
      >>> anchor = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
      >>> positive = np.array([[0.6, 0.8], [0.0, 1.0]], np.float32)
      >>> negative = np.array([[0.8, 0.6], [1.0, 0.0]], np.float32)
      >>> np.asarray(losses.triplet_margin_loss(anchor, positive, negative, margin=0.2)).round(3)
      array([0.6, 0. ], dtype=float32)
    """
    _check_scalar(margin, "margin")
    valid, sq_pos, sq_neg = _prepare_triplets(anchor, positive, negative, mask)
    return _zero_invalid(_margin_from_sq(sq_pos, sq_neg, margin), valid)


def global_loss(anchor, positive, negative, *, margin=0.01, weight=0.8, mask=None):
    """Global loss of Smart Mining (Eq. 3, method.md §1): one scalar over a batch of triplets.

    Pulls the distributions of positive and negative distances apart and tightens both: with
    d⁺ = ‖a − p‖² / 4, d⁻ = ‖a − n‖² / 4 (each in [0, 1] for unit vectors) and population (1/N)
    means μ and variances σ² over the valid triplets, J_g = (σ²⁺ + σ²⁻) + weight · max(0, μ⁺ − μ⁻ +
    margin). A batch without any valid triplet gives 0 with a zero gradient. Pure and
    jit-compatible.

    Args:
      anchor: [B, D] real array (any float dtype, bf16 included, or integer; not bool): the
        anchors' embeddings. Math in float32.
      positive: [B, D] real array, same shape as ``anchor``: row i of the anchor's class.
      negative: [B, D] real array, same shape as ``anchor``: row i of another class.
      margin: t of Eq. 3, a finite scalar (default 0.01); Python float or f32[], may be traced
        (checked when concrete).
      weight: λ of Eq. 3, a finite scalar >= 0 (default 0.8); may be traced (checked when
        concrete).
      mask: optional bool[B] (None: every row is valid); None versus an array is static under
        jit, the values may be traced.
        A False row counts in no statistic, whatever it holds (NaN included).

    Returns:
      f32[] scalar J_g >= 0.

    Raises:
      ValueError: naming the argument: ``anchor`` not 2-D or not real-valued; ``positive`` or
        ``negative`` not of the anchor's shape [B, D]; ``mask`` not a bool array of shape [B];
        a concrete ``margin`` not finite or ``weight`` not finite and >= 0.

    Example:
      >>> import numpy as np
      >>> from smine_jax import losses
      >>> anchor = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
      >>> positive = np.array([[0.6, 0.8], [0.0, 1.0]], np.float32)
      >>> negative = np.array([[0.8, 0.6], [1.0, 0.0]], np.float32)
      >>> round(float(losses.global_loss(anchor, positive, negative)), 3)
      0.05
    """
    _check_scalar(margin, "margin")
    _check_scalar(weight, "weight", minimum=0.0)
    valid, sq_pos, sq_neg = _prepare_triplets(anchor, positive, negative, mask)
    value, _ = _global_terms(sq_pos, sq_neg, valid, margin, weight)
    return value


def triplet_objective(anchor, positive, negative, *, mask=None, margin=0.2, global_margin=0.01,
                      global_weight=0.8, use_global=True, triplet_loss="ratio", mined=None):
    """Training objective of method.md §1: mean J_t over the valid triplets, plus J_g (Eq. 3).

    The loss of a batch of gathered triplets, with the statistics the trainer logs and the
    controller reads. Pure and jit-compatible.

    Args:
      anchor: [B, D] real array (any float dtype, bf16 included, or integer; not bool): the
        anchors' embeddings. Math in float32.
      positive: [B, D] real array, same shape as ``anchor``: row i of the anchor's class.
      negative: [B, D] real array, same shape as ``anchor``: row i of another class.
      mask: optional bool[B] of valid (non-padding) triplets (None: all valid); a False row counts
        nowhere, whatever it holds.
      margin: margin of the per-triplet loss: > 0 for "ratio", any finite value for "margin";
        may be traced (checked when concrete).
      global_margin: t of the global loss (Eq. 3), finite; may be traced.
      global_weight: λ of the global loss (Eq. 3), finite and >= 0; may be traced.
      use_global: add J_g to the loss (static Python bool).
      triplet_loss: "ratio" (Eq. 2, plain distances) or "margin" (FaceNet, squared distances)
        (static).
      mined: optional bool[B], the triplets that came from mining: their error is also counted
        apart (aux ``num_mined``, ``mined_violations``), the controller's signal for
        ``error_on="mined"``.

    Returns:
      (loss, aux): loss is f32[], the mean J_t over the valid triplets plus J_g when
      ``use_global``. aux is a dict of f32[] scalars: ``loss``; ``triplet_loss`` (mean J_t over
      valid triplets); ``global_loss`` (J_g, reported even when ``use_global`` is False, then not
      part of ``loss``); ``training_error`` (fraction of valid triplets with J_t > 0: the
      controller's signal); ``mu_pos``, ``mu_neg``, ``var_pos``, ``var_neg`` (the global loss
      statistics of squared distances / 4) and ``num_valid``. Every entry is 0 when no triplet is
      valid.
      With ``mined``, aux also holds ``num_mined`` (valid mined triplets) and
      ``mined_violations`` (those with J_t > 0), counts so that an epoch's error sums exactly over
      batches.

    Raises:
      ValueError: naming the argument: ``anchor`` not 2-D or not real-valued; ``positive`` or
        ``negative`` not of the anchor's shape [B, D]; ``mask`` not a bool array of shape [B];
        ``mined`` not a bool array of shape [B]; ``triplet_loss`` not "ratio" or "margin"; a
        concrete ``margin``, ``global_margin`` or ``global_weight`` out of its range.
    """
    _check_objective_settings(triplet_loss, margin, global_margin, global_weight)
    valid, sq_pos, sq_neg = _prepare_triplets(anchor, positive, negative, mask)
    if mined is not None:
        _check_vector(mined, "mined", valid.shape[0], kind="bool")
    return _objective_from_sq(sq_pos, sq_neg, valid, mined, margin=margin,
                              global_margin=global_margin, global_weight=global_weight,
                              use_global=use_global, triplet_loss=triplet_loss)


def indexed_triplet_objective(embeddings, anchor, positive, negative, valid, *, mask=None,
                              margin=0.2, global_margin=0.01, global_weight=0.8, use_global=True,
                              triplet_loss="ratio"):
    """``triplet_objective`` over triplets given as row indices into one batch of embeddings.

    For the dense triplet sets of an in-batch miner (e.g. ``batch_miners.all_triplets``: B·P·B
    slots): the [B, B] squared distances are computed once, from explicit differences, and each
    slot gathers two scalars instead of three D-dimensional rows. Same value, gradient and aux as
    ``triplet_objective`` on ``embeddings[anchor]`` etc. with ``mask=valid``. Pure and
    jit-compatible.

    Args:
      embeddings: [B, D] real array (any float dtype; math in float32), the batch.
      anchor: int[S] row indices in [0, B) of the slots' anchors.
      positive: int[S] row indices in [0, B) of the slots' positives.
      negative: int[S] row indices in [0, B) of the slots' negatives.
      valid: bool[S], the slots that are triplets (the others count nowhere).
      mask: optional bool[B] of real rows: padded rows are zeroed before any arithmetic, so their
        values (even NaN) reach neither the loss nor the gradient. Valid slots must not point at
        padded rows.
      margin: margin of the per-triplet loss: > 0 for "ratio", any finite value for "margin";
        may be traced (checked when concrete).
      global_margin: t of the global loss (Eq. 3), finite; may be traced.
      global_weight: λ of the global loss (Eq. 3), finite and >= 0; may be traced.
      use_global: add J_g to the loss (static Python bool).
      triplet_loss: "ratio" (Eq. 2, plain distances) or "margin" (FaceNet, squared distances)
        (static).

    Returns:
      (loss, aux): loss is f32[], the mean J_t over the valid triplets plus J_g when
      ``use_global``. aux is a dict of f32[] scalars: ``loss``; ``triplet_loss`` (mean J_t over
      valid triplets); ``global_loss`` (J_g, reported even when ``use_global`` is False, then not
      part of ``loss``); ``training_error`` (fraction of valid triplets with J_t > 0: the
      controller's signal); ``mu_pos``, ``mu_neg``, ``var_pos``, ``var_neg`` (the global loss
      statistics of squared distances / 4) and ``num_valid``. Every entry is 0 when no triplet is
      valid.

    Raises:
      ValueError: naming the argument: ``embeddings`` not a real 2-D array; ``anchor``,
        ``positive`` or ``negative`` not integer arrays of one shape [S]; ``valid`` not bool[S];
        ``mask`` not bool[B]; ``triplet_loss`` not "ratio" or "margin"; a concrete ``margin``,
        ``global_margin`` or ``global_weight`` out of its range.
    """
    _check_objective_settings(triplet_loss, margin, global_margin, global_weight)
    num_rows, _ = _check_matrix(embeddings, "embeddings")
    if np.ndim(anchor) != 1:
        raise ValueError(f"anchor: expected a 1-D array of row indices, got shape "
                         f"{tuple(np.shape(anchor))}")
    num_slots = np.shape(anchor)[0]
    for name, value in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        _check_vector(value, name, num_slots, kind="int")
    _check_vector(valid, "valid", num_slots, kind="bool")
    if mask is not None:
        _check_vector(mask, "mask", num_rows, kind="bool")
    _, embeddings = _select_rows(mask, embeddings)
    sq_dists = distances.pairwise_sq_dists(embeddings)
    anchor = jnp.asarray(anchor)
    return _objective_from_sq(sq_dists[anchor, jnp.asarray(positive)],
                              sq_dists[anchor, jnp.asarray(negative)],
                              jnp.asarray(valid).astype(jnp.float32), None, margin=margin,
                              global_margin=global_margin, global_weight=global_weight,
                              use_global=use_global, triplet_loss=triplet_loss)


def _check_objective_settings(triplet_loss, margin, global_margin, global_weight) -> None:
    if triplet_loss not in _TRIPLET_LOSSES:
        raise ValueError(
            f"triplet_loss: expected one of {_TRIPLET_LOSSES}, got {triplet_loss!r}")
    if triplet_loss == "ratio":
        _check_scalar(margin, "margin", minimum=0.0, strict=True)
    else:
        _check_scalar(margin, "margin")
    _check_scalar(global_margin, "global_margin")
    _check_scalar(global_weight, "global_weight", minimum=0.0)


def _objective_from_sq(sq_pos, sq_neg, valid, mined, *, margin, global_margin, global_weight,
                       use_global, triplet_loss):
    """(loss, aux) of ``triplet_objective`` from per-slot squared distances and validity."""
    per_triplet_fn = _ratio_from_sq if triplet_loss == "ratio" else _margin_from_sq
    per_triplet = _zero_invalid(per_triplet_fn(sq_pos, sq_neg, margin), valid)
    mean_triplet = _masked_mean(per_triplet, valid)
    global_value, stats = _global_terms(sq_pos, sq_neg, valid, global_margin, global_weight)
    loss = mean_triplet + global_value if use_global else mean_triplet
    violating = (per_triplet > 0).astype(jnp.float32)
    aux = {
        "loss": loss,
        "triplet_loss": mean_triplet,
        "global_loss": global_value,
        "training_error": _masked_mean(violating, valid),
        **stats,
    }
    if mined is not None:
        counted = (valid > 0) & jnp.asarray(mined, bool)
        aux["num_mined"] = jnp.sum(counted, dtype=jnp.float32)
        aux["mined_violations"] = jnp.sum(jnp.where(counted, violating, 0.0))
    return loss, aux


def lifted_structure_loss(embeddings, labels, *, margin=1.0, mask=None):
    """Lifted structured loss (Song et al., CVPR 2016, Eq. 4: the smooth upper bound); a baseline.

    With plain distances D_ij and P the unordered positive pairs {i, j}, i < j, y_i = y_j:

        J_ij = log(sum_{k: y_k != y_i} exp(margin - D_ik) + sum_{l: y_l != y_j} exp(margin - D_jl))
               + D_ij
        loss = sum_{(i,j) in P} max(0, J_ij)^2 / (2 |P|)

    The log-sum-exp is evaluated stably. A pair with no negative at all contributes 0; a batch
    without positive pair gives 0. Memory is O(N² D) (distances from explicit differences, exact
    for duplicates). Pure and jit-compatible.

    Args:
      embeddings: [N, D] real array (any float dtype; math in float32).
      labels: int[N] class labels.
      margin: α of Eq. 4, a finite scalar (may be traced).
      mask: optional bool[N]; False rows are neither anchors, positives nor negatives.

    Returns:
      f32[] scalar >= 0.

    Raises:
      ValueError: naming the argument: ``embeddings`` not a real 2-D array; ``labels`` not
        int[N]; ``mask`` not bool[N]; a concrete ``margin`` not finite.
    """
    num_rows, _ = _check_matrix(embeddings, "embeddings")
    _check_vector(labels, "labels", num_rows, kind="int")
    if mask is not None:
        _check_vector(mask, "mask", num_rows, kind="bool")
    _check_scalar(margin, "margin")
    valid, embeddings = _select_rows(mask, embeddings)
    labels = jnp.asarray(labels)
    valid_pair = (valid[:, None] * valid[None, :]) > 0
    same = labels[:, None] == labels[None, :]
    negative_pair = valid_pair & ~same
    upper = jnp.triu(jnp.ones((num_rows, num_rows), bool), k=1)
    positive_pair = valid_pair & same & upper

    dists = distances.safe_sqrt(distances.pairwise_sq_dists(embeddings))
    logits = jnp.where(negative_pair, margin - dists, _EXCLUDED_LOGIT)
    row_lse = jax.nn.logsumexp(logits, axis=1)  # _EXCLUDED_LOGIT + log N when no negative
    pair_loss = jnp.logaddexp(row_lse[:, None], row_lse[None, :]) + dists
    pair_loss = jnp.where(positive_pair, jnp.square(jax.nn.relu(pair_loss)), 0.0)
    num_positive_pairs = jnp.sum(positive_pair.astype(jnp.float32))
    return jnp.sum(pair_loss) / (2.0 * jnp.maximum(num_positive_pairs, 1.0))


def npairs_loss(anchors, positives, *, l2_reg=0.002, labels=None, mask=None):
    """Multi-class N-pair loss (Sohn, NIPS 2016), in TensorFlow's ``npairs_loss`` convention.

    logits = anchors @ positivesᵀ; softmax cross-entropy of each anchor row against a target that
    is the diagonal (its own positive) or, when ``labels`` is given, uniform over the columns
    whose label equals the row's; mean over rows. Plus the embedding penalty of the TF
    implementation: ``l2_reg * 0.25 * (mean_i ||a_i||^2 + mean_i ||p_i||^2)``. Pure and
    jit-compatible.

    Args:
      anchors: [B, D] real array (any float dtype; math in float32).
      positives: [B, D] real array, same shape; row i is of the class of ``anchors[i]``.
      l2_reg: weight of the embedding penalty, finite and >= 0 (may be traced).
      labels: optional int[B] labels of the pairs (several pairs may share a class).
      mask: optional bool[B]; a False pair is neither a row nor a column (negative) and takes no
        part in the means.

    Returns:
      f32[] scalar (0 when no pair is valid).

    Raises:
      ValueError: naming the argument: ``anchors`` not a real 2-D array; ``positives`` of another
        shape; ``labels`` not int[B]; ``mask`` not bool[B]; a concrete ``l2_reg`` negative or not
        finite.
    """
    num_rows, dim = _check_matrix(anchors, "anchors")
    _check_matrix(positives, "positives", num_rows, dim)
    if labels is not None:
        _check_vector(labels, "labels", num_rows, kind="int")
    if mask is not None:
        _check_vector(mask, "mask", num_rows, kind="bool")
    _check_scalar(l2_reg, "l2_reg", minimum=0.0)
    valid, anchors, positives = _select_rows(mask, anchors, positives)
    is_valid = valid > 0
    logits = jnp.dot(anchors, positives.T, precision=jax.lax.Precision.HIGHEST)
    logits = jnp.where(is_valid[None, :], logits, _EXCLUDED_LOGIT)
    if labels is None:
        target = jnp.eye(num_rows, dtype=jnp.float32)
    else:
        labels = jnp.asarray(labels)
        target = (labels[:, None] == labels[None, :]).astype(jnp.float32)
    target = target * valid[None, :]  # the diagonal keeps every valid row's target non-empty
    target = target / jnp.maximum(jnp.sum(target, axis=1, keepdims=True), 1.0)
    cross_entropy = -jnp.sum(target * jax.nn.log_softmax(logits, axis=1), axis=1)
    penalty = 0.25 * (_masked_mean(jnp.sum(anchors * anchors, axis=1), valid)
                      + _masked_mean(jnp.sum(positives * positives, axis=1), valid))
    return _masked_mean(cross_entropy, valid) + l2_reg * penalty
