"""In-batch triplet miners: the baselines of the paper's comparison rows.

Unlike smart mining (``mining.sample_triplets``), which walks neighbour lists precomputed over the
whole training set, these miners look only at one batch's embeddings:

- ``semihard_triplets``: FaceNet semi-hard negatives (Schroff et al. 2015), with the fallback of
  TensorFlow Addons' ``triplet_semihard_loss``;
- ``batch_hard_triplets``: the hardest positive and negative per anchor (Hermans et al. 2017);
- ``distance_weighted_triplets``: distance-weighted negative sampling (Wu et al. 2017);
- ``all_triplets``: every valid (anchor, positive, negative) of the batch, the dense triplet set
  for the ratio + global loss on index-built batches (``mining.index_batches``).

Each returns ``BatchTriplets``: int32 indices into the batch plus a bool ``valid`` mask, with
static shapes (B * B slots, one per ordered anchor-positive pair, or B slots, one per anchor), so
a training step gathers ``embeddings[anchor]`` etc. and passes ``mask=valid`` to its loss. Memory
is O(B^2) (B x B matrices; distances from ``smine_jax.distances``, as in the losses): no
B x B x B tensor is ever formed. All of them are jit-compatible; host argument checks run only
on concrete (non-traced) inputs.

Conventions shared by all of them:

- ``mask`` (optional bool [B]) marks real rows; padded rows (False) never serve as anchor,
  positive or negative, and their values (even NaN under jit) cannot leak into other rows.
- Labels are arbitrary integers. Eagerly they are re-indexed on the host, so int64 labels that
  would collide when cast to int32 stay distinct; under jit they are compared as given.
- Ties between equal distances go to the lowest batch index.
- Invalid slots hold the anchor's own index in ``positive`` and ``negative`` (always in range,
  so gathers are safe); only ``valid`` slots are triplets.
- ``kappa`` (optional scalar >= 0, may be traced): Smart Mining's exclusion boundary inside the
  batch. A negative n of anchor a with d²(a, n) < κ · d²(a, p⁺) is skipped, p⁺ the anchor's
  nearest positive in the batch (Eq. 6 of Harwood et al. with the batch as the neighbour list),
  so "too hard" means what it means for index mining. ``None`` or 0: no negative is skipped.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smine_jax import distances, validation

SEMIHARD_FALLBACKS = ("largest", "invalid")


class BatchTriplets(NamedTuple):
    """Triplets as row indices into one batch; only slots with ``valid`` True are triplets.

    Attributes:
      anchor: i32[S] anchor rows in [0, B).
      positive: i32[S] positive rows in [0, B) (the anchor's own row in invalid slots).
      negative: i32[S] negative rows in [0, B) (the anchor's own row in invalid slots).
      valid: bool[S], the slots that are triplets; pass it as the loss's ``mask``.
    """

    anchor: jax.Array  # int32 [S]
    positive: jax.Array  # int32 [S]
    negative: jax.Array  # int32 [S]
    valid: jax.Array  # bool [S]


# --------------------------------------------------------------------------- public miners


def semihard_triplets(embeddings, labels, *, margin=0.2, mask=None,
                      fallback: str = "largest", kappa=None) -> BatchTriplets:
    """FaceNet semi-hard mining (Schroff et al. 2015, Sec. 3.2) on squared distances.

    One slot per ordered pair (a, p) of the batch, slot index ``a * B + p``; a slot is a
    candidate when p has a's class and p != a. Its negative is the other-class sample n with the
    smallest d(a, n) subject to d(a, p) < d(a, n) (strict), d the squared Euclidean distance as
    in FaceNet; ties go to the lowest index. When no negative is farther than the positive:

    - ``fallback="largest"`` (default): as TensorFlow Addons' ``triplet_semihard_loss``, take the
      negative with the largest d(a, n) (the least hard of the hard negatives); the slot is valid.
    - ``fallback="invalid"``: keep only true semi-hard triplets, d(a,p) < d(a,n) < d(a,p) + margin
      (FaceNet's band); every other slot is invalid.

    A slot is also invalid when the anchor has no negative in the batch. Jit-compatible.

    Args:
      embeddings: [B, D] real array (any float dtype; used as float32).
      labels: int[B] class labels (arbitrary integers; re-indexed on the host when concrete).
      margin: FaceNet's alpha, in squared-distance units, >= 0 (``inf`` allowed). It bounds the
        semi-hard band and matters only for ``fallback="invalid"``: under the TF-Addons rule the
        selected negative is the same whatever the margin (the closest negative beyond d(a, p)
        lies in the band whenever the band holds any negative).
      mask: optional bool[B]; False marks padded rows, which never serve as anchor, positive or
        negative (None: every row is real).
      fallback: "largest" (default) or "invalid" (static): what a slot without a semi-hard
        negative becomes, described above.
      kappa: optional κ >= 0, a scalar (may be traced): Smart Mining's exclusion boundary inside
        the batch. A negative n of anchor a with d²(a, n) < κ · d²(a, p⁺), p⁺ the anchor's nearest
        positive in the batch, is skipped (Eq. 6 with the batch as the neighbour list). None or 0:
        no negative is skipped. Skipped negatives are neither semi-hard candidates nor
        the fallback.

    Returns:
      ``BatchTriplets`` of S slots: anchor, positive, negative i32[S] row indices in [0, B) (an
      invalid slot holds the anchor's own index in positive and negative) and valid bool[S].
      S = B * B.

    Raises:
      ValueError: naming the argument: ``embeddings`` not 2-D real (or, when concrete, holding
        NaN/inf); ``labels`` not integer of shape [B]; ``mask`` not bool[B]; ``kappa`` not a
        scalar or (concrete) negative or not finite;
        ``fallback`` unknown; a concrete ``margin`` negative or NaN.
    """
    if fallback not in SEMIHARD_FALLBACKS:
        raise ValueError(f"fallback: expected one of {SEMIHARD_FALLBACKS}, got {fallback!r}")
    _check_scalar(margin, "margin", lower=0.0, allow_inf=True)
    _check_kappa(kappa)
    embeddings, labels, mask = _prepare(embeddings, labels, mask)
    return _semihard(embeddings, labels, mask, margin, kappa, fallback=fallback)


def batch_hard_triplets(embeddings, labels, *, mask=None, kappa=None) -> BatchTriplets:
    """Batch-hard mining (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss").

    One slot per anchor a (slot index a): its farthest positive (same class, != a) and its
    closest negative (other class); ties go to the lowest index. The slot is invalid when the
    anchor is padded or has no positive or no negative in the batch. Squared distances pick the
    same samples as plain ones (the square root is monotone) without rounding ties apart.
    Jit-compatible.

    Args:
      embeddings: [B, D] real array (any float dtype; used as float32).
      labels: int[B] class labels (arbitrary integers; re-indexed on the host when concrete).
      mask: optional bool[B]; False marks padded rows, which never serve as anchor, positive or
        negative (None: every row is real).
      kappa: optional κ >= 0, a scalar (may be traced): Smart Mining's exclusion boundary inside
        the batch. A negative n of anchor a with d²(a, n) < κ · d²(a, p⁺), p⁺ the anchor's nearest
        positive in the batch, is skipped (Eq. 6 with the batch as the neighbour list). None or 0:
        no negative is skipped. The closest negative beyond the boundary is taken.

    Returns:
      ``BatchTriplets`` of S slots: anchor, positive, negative i32[S] row indices in [0, B) (an
      invalid slot holds the anchor's own index in positive and negative) and valid bool[S].
      S = B.

    Raises:
      ValueError: naming the argument: ``embeddings`` not 2-D real (or, when concrete, holding
        NaN/inf); ``labels`` not integer of shape [B]; ``mask`` not bool[B]; ``kappa`` not a
        scalar or (concrete) negative or not finite.
    """
    _check_kappa(kappa)
    embeddings, labels, mask = _prepare(embeddings, labels, mask)
    return _batch_hard(embeddings, labels, mask, kappa)


def distance_weighted_triplets(key, embeddings, labels, *, cutoff=0.5, nonzero_loss_cutoff=1.4,
                               mask=None, kappa=None) -> BatchTriplets:
    """Distance-weighted negative sampling (Wu et al. 2017, "Sampling Matters", Sec. 4).

    One slot per ordered pair (a, p) of the batch, slot index ``a * B + p``, valid when p has a's
    class, p != a and the anchor has a negative. Each slot draws its own negative independently,
    with probability proportional to min(lambda, q(d)^-1) where d = ||f(a) - f(n)|| (plain
    distance) and q(d) ∝ d^(n-2) (1 - d^2/4)^((n-3)/2) is the density of pairwise distances of
    points uniform on the unit sphere in R^n, n = D. As in the authors' reference implementation,
    the cap lambda is realised by clipping d below at ``cutoff``, weights are computed in log
    space and normalised by the anchor's largest log-weight, and only negatives with
    d < ``nonzero_loss_cutoff`` (those that can still have a non-zero margin loss) are eligible.
    An anchor with no eligible negative samples uniformly over all its negatives (the reference
    implementation then samples uniformly over the whole batch, positives and the anchor
    included; here only real negatives are drawn, so every valid slot is a true triplet).

    The formula assumes L2-normalised embeddings (unit vectors, d in [0, 2]); the embeddings are
    used as given, not normalised here. Each slot draws by inverse CDF: one uniform per slot,
    searched in the anchor's cumulative weights, O(B^2) work and memory. (Gumbel-max, i.e.
    ``jax.random.categorical``, would need B noise values per slot, B^3 in all: ~90x slower at
    B = 128 on CPU even one anchor at a time.) Jit-compatible.

    Args:
      key: a jax PRNG key (may be traced).
      embeddings: [B, D] real array (any float dtype; used as float32),
        rows of unit length.
      labels: int[B] class labels (arbitrary integers; re-indexed on the host when concrete).
      cutoff: lower clip of d in the weights, a scalar > 0 (reference: 0.5); may be traced.
      nonzero_loss_cutoff: only negatives closer than this are eligible, a scalar > cutoff
        (reference: 1.4; ``inf`` allowed); may be traced.
      mask: optional bool[B]; False marks padded rows, which never serve as anchor, positive or
        negative (None: every row is real).
      kappa: optional κ >= 0, a scalar (may be traced): Smart Mining's exclusion boundary inside
        the batch. A negative n of anchor a with d²(a, n) < κ · d²(a, p⁺), p⁺ the anchor's nearest
        positive in the batch, is skipped (Eq. 6 with the batch as the neighbour list). None or 0:
        no negative is skipped. Skipped negatives are never drawn (they count as no
        negative at all).

    Returns:
      ``BatchTriplets`` of S slots: anchor, positive, negative i32[S] row indices in [0, B) (an
      invalid slot holds the anchor's own index in positive and negative) and valid bool[S].
      S = B * B.

    Raises:
      ValueError: naming the argument: ``embeddings`` not 2-D real (or, when concrete, holding
        NaN/inf); ``labels`` not integer of shape [B]; ``mask`` not bool[B]; ``kappa`` not a
        scalar or (concrete) negative or not finite;
        a concrete ``cutoff`` not > 0, or ``nonzero_loss_cutoff`` not > ``cutoff``.
    """
    _check_scalar(cutoff, "cutoff", lower=0.0, strict=True)
    _check_kappa(kappa)
    _check_scalar(nonzero_loss_cutoff, "nonzero_loss_cutoff", lower=0.0, strict=True,
                  allow_inf=True)
    if validation.is_concrete(cutoff) and validation.is_concrete(nonzero_loss_cutoff):
        if not float(nonzero_loss_cutoff) > float(cutoff):
            raise ValueError(
                f"nonzero_loss_cutoff={float(nonzero_loss_cutoff)} must exceed "
                f"cutoff={float(cutoff)}: otherwise no negative is ever eligible")
    embeddings, labels, mask = _prepare(embeddings, labels, mask)
    return _distance_weighted(key, embeddings, labels, mask, cutoff, nonzero_loss_cutoff, kappa)


def all_triplets(embeddings, labels, *, positives_per_anchor: int, mask=None,
                 kappa=None) -> BatchTriplets:
    """Every valid triplet of the batch: each anchor with each of its positives and negatives.

    Slot ``(a * P + j) * B + n`` pairs anchor a with its j-th positive (its same-class rows other
    than itself in ascending index order; P = ``positives_per_anchor``) and row n as the
    negative; it is valid when a and n are real rows of different classes, the j-th positive
    exists and n is not skipped by ``kappa``. With m-per-class batches P = m - 1 covers every
    positive; an anchor with more positives uses its first P. O(B² P) slots and memory, never
    B³: feed them to ``losses.indexed_triplet_objective``, which gathers two scalars per slot.
    Jit-compatible.

    Args:
      embeddings: [B, D] real array (any float dtype; used as float32);
        used only for the ``kappa`` boundary.
      labels: int[B] class labels (arbitrary integers; re-indexed on the host when concrete).
      positives_per_anchor: P >= 1 positives per anchor (static Python int).
      mask: optional bool[B]; False marks padded rows, which never serve as anchor, positive or
        negative (None: every row is real).
      kappa: optional κ >= 0, a scalar (may be traced): Smart Mining's exclusion boundary inside
        the batch. A negative n of anchor a with d²(a, n) < κ · d²(a, p⁺), p⁺ the anchor's nearest
        positive in the batch, is skipped (Eq. 6 with the batch as the neighbour list). None or 0:
        no negative is skipped.

    Returns:
      ``BatchTriplets`` of S slots: anchor, positive, negative i32[S] row indices in [0, B) (an
      invalid slot holds the anchor's own index in positive and negative) and valid bool[S].
      S = B * P * B.

    Raises:
      ValueError: naming the argument: ``embeddings`` not 2-D real (or, when concrete, holding
        NaN/inf); ``labels`` not integer of shape [B]; ``mask`` not bool[B]; ``kappa`` not a
        scalar or (concrete) negative or not finite;
        ``positives_per_anchor`` not a positive integer.
    """
    positives_per_anchor = validation.positive_int(positives_per_anchor, "positives_per_anchor",
                                                   whole_floats=True)
    _check_kappa(kappa)
    embeddings, labels, mask = _prepare(embeddings, labels, mask)
    return _all(embeddings, labels, mask, kappa, num_positives=int(positives_per_anchor))


# --------------------------------------------------------------------------- jitted cores


@functools.partial(jax.jit, static_argnames=("fallback",))
def _semihard(embeddings, labels, mask, margin, kappa, *, fallback):
    """Per anchor: sort the negatives' distances once, then searchsorted every d(a, p)."""
    num_rows = embeddings.shape[0]
    sq_dists = distances.pairwise_sq_dists(embeddings, mask)
    positive_pairs, negative_pairs = _pair_masks(labels, mask, sq_dists, kappa)
    negative_sq = jnp.where(negative_pairs, sq_dists, jnp.inf)
    # Stable sort: equal distances keep ascending index order, so the first one is the lowest.
    order = jnp.argsort(negative_sq, axis=1, stable=True)
    sorted_sq = jnp.take_along_axis(negative_sq, order, axis=1)
    # First sorted negative strictly farther than the positive ("scan" keeps memory O(B^2)).
    first_farther = jax.vmap(
        lambda row, queries: jnp.searchsorted(row, queries, side="right", method="scan")
    )(sorted_sq, sq_dists)
    num_negatives = jnp.sum(negative_pairs, axis=1)
    has_semihard = first_farther < num_negatives[:, None]
    semihard = jnp.take_along_axis(order, jnp.minimum(first_farther, num_rows - 1), axis=1)
    if fallback == "largest":
        # TF-Addons: no negative beyond d(a, p) -> the negative with the largest d(a, n).
        largest = jnp.argmax(jnp.where(negative_pairs, sq_dists, -jnp.inf), axis=1)
        negative = jnp.where(has_semihard, semihard, largest[:, None])
        valid = positive_pairs & (num_negatives > 0)[:, None]
    else:
        negative = semihard
        semihard_sq = jnp.take_along_axis(sq_dists, semihard, axis=1)
        in_band = semihard_sq < sq_dists + jnp.asarray(margin, jnp.float32)
        valid = positive_pairs & has_semihard & in_band
    return _pair_slots(negative, valid)


@jax.jit
def _batch_hard(embeddings, labels, mask, kappa):
    """Per anchor: argmax distance over its positives, argmin over its negatives."""
    sq_dists = distances.pairwise_sq_dists(embeddings, mask)
    positive_pairs, negative_pairs = _pair_masks(labels, mask, sq_dists, kappa)
    positive = jnp.argmax(jnp.where(positive_pairs, sq_dists, -jnp.inf), axis=1)
    negative = jnp.argmin(jnp.where(negative_pairs, sq_dists, jnp.inf), axis=1)
    valid = jnp.any(positive_pairs, axis=1) & jnp.any(negative_pairs, axis=1)
    anchor = jnp.arange(embeddings.shape[0], dtype=jnp.int32)
    return _batch_triplets(anchor, positive, negative, valid)


@jax.jit
def _distance_weighted(key, embeddings, labels, mask, cutoff, nonzero_loss_cutoff, kappa):
    """Masked log-weights log q(d)^-1 per anchor, then one inverse-CDF draw per (a, p) slot."""
    num_rows, dim = embeddings.shape
    sq_dists = distances.pairwise_sq_dists(embeddings, mask)
    positive_pairs, negative_pairs = _pair_masks(labels, mask, sq_dists, kappa)
    dists = distances.safe_sqrt(sq_dists)
    dists = jnp.maximum(dists, jnp.asarray(cutoff, jnp.float32))
    # log q(d)^-1 = (2 - n) log d - ((n - 3) / 2) log(1 - d^2 / 4); the floor keeps d >= 2
    # (rounding, or non-unit rows) finite instead of NaN.
    one_minus = jnp.maximum(1.0 - 0.25 * dists * dists, jnp.finfo(jnp.float32).tiny)
    log_weights = (2.0 - dim) * jnp.log(dists) - (0.5 * (dim - 3.0)) * jnp.log(one_minus)
    eligible = negative_pairs & (dists < jnp.asarray(nonzero_loss_cutoff, jnp.float32))
    has_eligible = jnp.any(eligible, axis=1, keepdims=True)
    # No eligible negative: uniform over the anchor's negatives (log-weight 0 each).
    log_weights = jnp.where(has_eligible, log_weights, 0.0)
    allowed = jnp.where(has_eligible, eligible, negative_pairs)
    log_weights = jnp.where(allowed, log_weights, -jnp.inf)
    # Normalise by the anchor's largest log-weight (as the reference does): weights in (0, 1].
    row_max = jnp.max(log_weights, axis=1, keepdims=True)
    weights = jnp.exp(log_weights - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    # Inverse-CDF draw, one uniform per (a, p) slot: first n with cdf[a, n] >= total * (1 - u).
    cdf = jnp.cumsum(weights, axis=1)
    thresholds = cdf[:, -1:] * (1.0 - jax.random.uniform(key, (num_rows, num_rows)))
    drawn = jax.vmap(lambda row, queries: jnp.searchsorted(row, queries, method="scan"))(
        cdf, thresholds)
    drawn = jnp.minimum(drawn, num_rows - 1)
    # Zero-weight entries add nothing to the prefix sums, so they are never drawn; guard anyway
    # against a rounding-level slip: a non-allowed draw becomes the anchor's likeliest negative.
    most_likely = jnp.argmax(log_weights, axis=1, keepdims=True)
    negative = jnp.where(jnp.take_along_axis(allowed, drawn, axis=1), drawn, most_likely)
    valid = positive_pairs & jnp.any(negative_pairs, axis=1, keepdims=True)
    return _pair_slots(negative, valid)


@functools.partial(jax.jit, static_argnames=("num_positives",))
def _all(embeddings, labels, mask, kappa, *, num_positives):
    """The j-th positive of each anchor by top-k over descending index keys, then [B, P, B]."""
    num_rows = embeddings.shape[0]
    sq_dists = distances.pairwise_sq_dists(embeddings, mask) if kappa is not None else None
    positive_pairs, negative_pairs = _pair_masks(labels, mask, sq_dists, kappa)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    # Positives first, lower index first: key B - p for a positive p, -1 for the rest.
    order_keys = jnp.where(positive_pairs, num_rows - rows[None, :], -1)
    keys, positive = jax.lax.top_k(order_keys, min(num_positives, num_rows))
    if num_positives > num_rows:  # more slots than rows: the extra ones are never valid
        extra = num_positives - num_rows
        keys = jnp.pad(keys, ((0, 0), (0, extra)), constant_values=-1)
        positive = jnp.pad(positive, ((0, 0), (0, extra)))
    has_positive = keys > 0  # [B, P]
    valid = has_positive[:, :, None] & negative_pairs[:, None, :]  # [B, P, B]
    shape = (num_rows, num_positives, num_rows)
    return _batch_triplets(jnp.broadcast_to(rows[:, None, None], shape).reshape(-1),
                           jnp.broadcast_to(positive[:, :, None], shape).reshape(-1),
                           jnp.broadcast_to(rows[None, None, :], shape).reshape(-1),
                           valid.reshape(-1))


# --------------------------------------------------------------------------- masks


def _pair_masks(labels, mask, sq_dists=None, kappa=None):
    """[B, B] bool: (a, p) same class with p != a; (a, n) different class and, with ``kappa``,
    d²(a, n) >= κ · d²(a, nearest positive of a) (Eq. 6 inside the batch). Padded rows: False."""
    both_real = mask[:, None] & mask[None, :]
    same_class = labels[:, None] == labels[None, :]
    not_self = ~jnp.eye(labels.shape[0], dtype=bool)
    positive_pairs, negative_pairs = both_real & same_class & not_self, both_real & ~same_class
    if kappa is not None:
        nearest = jnp.min(jnp.where(positive_pairs, sq_dists, jnp.inf), axis=1, keepdims=True)
        # An anchor without a positive has no triplet anyway; its boundary stays 0 (no NaN).
        boundary = jnp.where(jnp.isfinite(nearest), jnp.asarray(kappa, jnp.float32) * nearest,
                             0.0)
        negative_pairs = negative_pairs & (sq_dists >= boundary)
    return positive_pairs, negative_pairs


def _pair_slots(negative, valid):
    """Flattens [B, B] per-(anchor, positive) choices into B * B slots, index a * B + p."""
    num_rows = negative.shape[0]
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    anchor = jnp.repeat(rows, num_rows)
    positive = jnp.tile(rows, num_rows)
    return _batch_triplets(anchor, positive, negative.reshape(-1), valid.reshape(-1))


def _batch_triplets(anchor, positive, negative, valid):
    """int32/bool ``BatchTriplets``; invalid slots point positive and negative at the anchor."""
    anchor = anchor.astype(jnp.int32)
    return BatchTriplets(
        anchor=anchor,
        positive=jnp.where(valid, positive.astype(jnp.int32), anchor),
        negative=jnp.where(valid, negative.astype(jnp.int32), anchor),
        valid=valid.astype(bool),
    )


# --------------------------------------------------------------------------- argument checks


def _prepare(embeddings, labels, mask):
    """Checks (host-side when concrete) and converts the shared arguments.

    Returns float32 embeddings [B, D], labels [B] (dense int32 ids when concrete) and a bool
    mask [B] (all True when None).
    """
    if validation.is_concrete(embeddings):
        embeddings = validation.as_embeddings(embeddings)
    elif embeddings.ndim != 2:
        raise ValueError(f"embeddings: expected a 2-D array [B, D], got shape {embeddings.shape}")
    num_rows = embeddings.shape[0]
    if validation.is_concrete(labels):
        labels = validation.as_labels(labels, num_rows)
        # Dense ids: int64 labels stay distinct even where jax works in int32.
        labels = np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int32)
    elif labels.shape != (num_rows,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels: expected an integer array of shape ({num_rows},), "
            f"got {labels.dtype} {labels.shape}")
    if mask is None:
        mask = np.ones(num_rows, dtype=bool)
    else:
        if validation.is_concrete(mask):
            mask = np.asarray(mask)
        shape, dtype = tuple(mask.shape), mask.dtype
        if shape != (num_rows,) or dtype != np.dtype(bool):
            raise ValueError(
                f"mask: expected a bool array of shape ({num_rows},) (True for real rows), "
                f"got {dtype} {shape}")
    return jnp.asarray(embeddings), jnp.asarray(labels), jnp.asarray(mask)


def _check_kappa(kappa) -> None:
    if kappa is None:
        return
    if np.ndim(kappa) != 0:
        raise ValueError(f"kappa: expected a scalar, got shape {np.shape(kappa)}")
    _check_scalar(kappa, "kappa", lower=0.0)


def _check_scalar(value, name: str, *, lower: float, strict: bool = False,
                  allow_inf: bool = False) -> None:
    """Concrete scalars only: a real number above `lower` (or at it unless strict)."""
    if not validation.is_concrete(value):
        return
    if np.ndim(value) != 0 or isinstance(value, bool):
        raise ValueError(f"{name}: expected a real scalar, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a real scalar, got {value!r}") from None
    bound_ok = number > lower if strict else number >= lower
    finite_ok = math.isfinite(number) or (allow_inf and number == math.inf)
    if not (bound_ok and finite_ok):
        relation = ">" if strict else ">="
        raise ValueError(
            f"{name}: expected a {'' if allow_inf else 'finite '}number {relation} {lower}, "
            f"got {value!r}")
