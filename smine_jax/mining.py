"""Smart mining of triplets from nearest-neighbour lists (Harwood et al. 2017, Algorithm 1).

Once per epoch every training sample i (the anchor) gets its k nearest other samples S_i,
ascending by squared distance (``smine_jax.index.neighbours``). ``sample_triplets`` walks each
list exactly as method.md §2 reads:

* the first same-class entry is the nearest positive p⁺ᴺᴺ; it sets the exclusion boundary
  b = κ · ‖f(a) − f(p⁺ᴺᴺ)‖² (Eq. 6) and is never a positive itself;
* after it, entries with squared distance < b are skipped; the remaining other-class entries
  are the valid negatives, the remaining same-class entries the valid positives;
* slot s of the anchor takes the (s+1)-th valid negative n (each negative once per anchor per
  epoch) and the closest valid positive strictly farther than n, so that every mined triplet
  violates the ratio margin in the embedding it was mined from;
* no valid positive farther than n: a positive drawn uniformly from the anchor's class outside
  S_i; every class member in S_i: any class member except the anchor and p⁺ᴺᴺ (p⁺ᴺᴺ only when
  the class is exactly {anchor, p⁺ᴺᴺ});
* no valid negative for a slot: a random triplet that keeps the anchor (``mined=False``); an
  anchor alone in its class: a fully random triplet.

Everything is a pure function of arrays and a PRNG key, jit-compatible (static shapes, no host
callbacks, no Python loop over anchors). The work is O(A·k) with no sorting: masked first-True
reductions over cache-sized chunks of rows, and an exactly uniform out-of-list draw (a
bijection through a bitmap, ``_nth_not_excluded``) for the rows that need one, compacted. The
random draws of anchor ``i`` are a function of (key, i) only, so mining a subset of anchors
(one process of a multi-host run) gives exactly the matching rows of mining all of them.
"""

from __future__ import annotations

import collections
import functools
import hashlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smine_jax import validation

# Draws per triplet slot: positive, negative, replacement anchor; 64 random bits each.
_DRAWS_PER_SLOT = 3
_POSITIVE, _NEGATIVE, _ANCHOR = range(_DRAWS_PER_SLOT)


class Triplets(NamedTuple):
    """M triplets as sample ids into the training set; unpack ``anchor, positive, negative, mined``.

    Every triplet is valid: ``positive`` is of the anchor's class and not the anchor,
    ``negative`` of another class. Train steps gather the three images by these ids.

    Attributes:
      anchor: i32[M] anchor sample ids in [0, N).
      positive: i32[M] positive sample ids in [0, N).
      negative: i32[M] negative sample ids in [0, N).
      mined: bool[M]; False where a slot fell back to a random triplet (no valid negative
        left, or the triplet came from ``random_triplets``).
    """

    anchor: jax.Array  # i32[M]
    positive: jax.Array  # i32[M]
    negative: jax.Array  # i32[M]
    mined: jax.Array  # bool[M]


class MiningInfo(NamedTuple):
    """Per-slot fallback flags (same order as the triplets) and per-anchor counts, for logging.

    A = anchor rows, T = ``triplets_per_anchor``; slot s of row r is entry r·T + s.

    Attributes:
      positive_fallback: bool[A·T]; a mined slot whose positive was drawn from the anchor's
        class outside S_i (no valid positive farther than the negative).
      pair_fallback: bool[A·T]; a mined slot whose class is exactly {anchor, p⁺ᴺᴺ}, so p⁺ᴺᴺ is
        the positive.
      anchor_replaced: bool[A·T]; a random slot whose anchor is alone in its class, so the
        anchor was redrawn too.
      num_valid_negatives: i32[A] valid negatives in S_i (0 without a p⁺ᴺᴺ in S_i).
      nearest_positive: i32[A] id of p⁺ᴺᴺ, -1 where S_i holds no same-class sample.
      list_inside_boundary: bool[A]; S_i ends before the boundary κ · d²(a, p⁺ᴺᴺ): a longer
        list (larger k) could hold valid negatives.
    """

    positive_fallback: jax.Array  # bool[A*T]: mined; positive drawn outside S_i (none farther)
    pair_fallback: jax.Array  # bool[A*T]: mined; class is {anchor, p_nn}, so p_nn is the positive
    anchor_replaced: jax.Array  # bool[A*T]: random slot; anchor alone in its class, anchor redrawn
    num_valid_negatives: jax.Array  # i32[A]: valid negatives in S_i (0 without a p_nn in S_i)
    nearest_positive: jax.Array  # i32[A]: id of p_nn, -1 where S_i holds no same-class sample
    list_inside_boundary: jax.Array  # bool[A]: S_i ends before the boundary κ·d²(p_nn): a
    #                                  longer list (larger k) could hold valid negatives


class EpochStats(NamedTuple):
    """What ``epoch_triplets`` actually assembled (the mined share can fall short of the target).

    Attributes:
      num_triplets: i32[] total triplets M.
      num_mined: i32[] mined triplets used, min(round(mined_fraction · M), mined available).
      mined_fraction: f32[] num_mined / M (0 for M = 0).
    """

    num_triplets: jax.Array  # i32[]: total triplets M
    num_mined: jax.Array  # i32[]: mined triplets used
    mined_fraction: jax.Array  # f32[]: num_mined / M


class _ClassIndex(NamedTuple):
    """Class structure of the labels, built with jnp ops so it works on traced labels.

    ``order`` lists the sample ids grouped by class (classes in ascending label order, ids
    ascending inside a class); a class is the block order[start : start + size], and a sample's
    rank is its offset position − start inside its block. Per-sample arrays are indexed by id.
    """

    order: jax.Array  # i32[N]
    start: jax.Array  # i32[N]: start of the sample's class block in `order`
    size: jax.Array  # i32[N]: size of the sample's class
    position: jax.Array  # i32[N]: the sample's position in `order`
    eligible_cumsum: jax.Array  # i32[N]: running count of samples whose class has >= 2 members


def _class_index(labels: jax.Array) -> _ClassIndex:
    num = labels.shape[0]
    order = jnp.argsort(labels, stable=True).astype(jnp.int32)
    sorted_labels = labels[order]
    is_first = jnp.concatenate([jnp.ones((1,), bool), sorted_labels[1:] != sorted_labels[:-1]])
    class_sorted = jnp.cumsum(is_first, dtype=jnp.int32) - 1
    sizes = jnp.bincount(class_sorted, length=num).astype(jnp.int32)
    starts = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
    position = jnp.zeros((num,), jnp.int32).at[order].set(jnp.arange(num, dtype=jnp.int32))
    class_of = class_sorted[position]
    start = starts[class_of]
    size = sizes[class_of]
    eligible_cumsum = jnp.cumsum(size >= 2, dtype=jnp.int32)
    return _ClassIndex(order, start, size, position, eligible_cumsum)


def _class_ranks(index: _ClassIndex, samples, anchors):
    """(same class as the anchor, rank in the anchor's class) of [R, k] samples, [R] anchors.

    One gather (the samples' positions) serves both: a sample is in the anchor's class iff its
    position falls in the anchor's class block.
    """
    rank = index.position[samples] - index.start[anchors][:, None]
    return (rank >= 0) & (rank < index.size[anchors][:, None]), rank


def _wide_product(a: jax.Array, b: jax.Array):
    """(high, low) uint32 halves of the 64-bit product of uint32 arrays (16-bit limbs)."""
    mask = jnp.uint32(0xFFFF)
    a0, a1, b0, b1 = a & mask, a >> 16, b & mask, b >> 16
    low_low, low_high, high_low = a0 * b0, a0 * b1, a1 * b0
    middle = (low_low >> 16) + (low_high & mask) + (high_low & mask)
    low = (middle << 16) | (low_low & mask)
    high = a1 * b1 + (low_high >> 16) + (high_low >> 16) + (middle >> 16)
    return high, low


def _uniform_below(words: jax.Array, bound: jax.Array) -> jax.Array:
    """Uniform int32 in [0, bound) from two uint32 words: floor(X · bound / 2**64), X the
    64-bit draw (multiply-high), so every value has probability 1/bound within bound/2**64.

    ``bound`` < 1 (a degenerate case the callers mask out) gives 0.
    """
    span = jnp.maximum(bound, 1).astype(jnp.uint32)
    high_high, high_low = _wide_product(words[..., 0], span)
    low_high, _ = _wide_product(words[..., 1], span)
    carry = (high_low + low_high) < high_low
    return (high_high + carry.astype(jnp.uint32)).astype(jnp.int32)


def _count(mask: jax.Array, axis: int = -1) -> jax.Array:
    """Number of True along ``axis`` (int32): a float sum, which XLA:CPU vectorises and an
    integer sum it does not; exact below 2**24."""
    return jnp.sum(jnp.where(mask, 1.0, 0.0), axis=axis).astype(jnp.int32)


def _select_zero_bit(words: jax.Array, nth: jax.Array) -> jax.Array:
    """Position of the nth (0-based) zero bit of a little-endian bitmap u32[..., W]."""
    num_words = words.shape[-1]
    free = ~words
    counts = jax.lax.population_count(free).astype(jnp.int32)
    before = jnp.cumsum(counts, axis=-1) - counts  # zero bits in the words before word w
    word = jnp.sum(before <= nth[..., None], axis=-1, dtype=jnp.int32) - 1
    word = jnp.clip(word, 0, num_words - 1)
    nth = nth - jnp.take_along_axis(before, word[..., None], axis=-1)[..., 0]
    bits = jnp.take_along_axis(free, word[..., None], axis=-1)[..., 0]
    position = jnp.zeros_like(nth)
    for width in (16, 8, 4, 2, 1):  # binary search with popcounts of the low halves
        low = jax.lax.population_count(
            (bits >> position.astype(jnp.uint32)) & jnp.uint32((1 << width) - 1))
        skip = low.astype(jnp.int32) <= nth
        nth = jnp.where(skip, nth - low.astype(jnp.int32), nth)
        position = jnp.where(skip, position + width, position)
    return 32 * word + position


def _nth_not_excluded(draw, num_allowed, anchor_rank, list_ranks, list_excluded):
    """Maps a draw in [0, L) bijectively onto the ranks [0, S) outside E, L = num_allowed.

    E = {anchor_rank} ∪ {list_ranks[j] : list_excluded[j]}: distinct ranks in any order, L =
    S − |E|, so a uniform draw gives a uniform rank outside E, without sorting E: a draw
    outside E is its own answer; the t-th rank of E below L (a "hole") maps to the t-th rank of
    [L, S) outside E, read from a bitmap of E over [L, L + |E|), a block of at most k + 1 ranks.
    O(k) per row.

    Shapes: draw i32[R, T]; num_allowed, anchor_rank i32[R]; list_ranks, list_excluded [R, k].
    """
    num_words = (list_ranks.shape[-1] + 1 + 31) // 32
    listed = list_excluded[:, None, :]
    hit = (anchor_rank[:, None] == draw) | jnp.any(
        listed & (list_ranks[:, None, :] == draw[:, :, None]), axis=-1)
    holes_below = (anchor_rank[:, None] < draw).astype(jnp.int32) + _count(
        listed & (list_ranks[:, None, :] < draw[:, :, None]))

    def bits(rank):  # (bitmap word, bit) of a rank's offset in the block [L, L + |E|)
        offset = rank - (num_allowed if rank.ndim == 1 else num_allowed[:, None])
        word = jnp.where(offset >= 0, offset >> 5, -1)
        return word, jnp.left_shift(jnp.uint32(1), (offset & 31).astype(jnp.uint32))

    list_word, list_bit = bits(list_ranks)
    list_word = jnp.where(list_excluded, list_word, -1)
    anchor_word, anchor_bit = bits(anchor_rank)
    word_ids = jnp.arange(num_words)
    # One reduction over [R, W, k] (twice as fast as W separate ones); distinct bits: sum = or.
    words = jnp.sum(jnp.where(list_word[:, None, :] == word_ids[None, :, None],
                              list_bit[:, None, :], jnp.uint32(0)), axis=-1, dtype=jnp.uint32)
    words = words | jnp.where(anchor_word[:, None] == word_ids, anchor_bit[:, None],
                              jnp.uint32(0))
    filler = num_allowed[:, None] + _select_zero_bit(words[:, None, :], holes_below)
    return jnp.where(hit, filler, draw)


def _class_member(index: _ClassIndex, sample, rank) -> jax.Array:
    """The member of ``sample``'s class with the given rank."""
    return index.order[index.start[sample] + rank]


def _random_positive(index: _ClassIndex, anchor, words) -> jax.Array:
    """Uniform member of ``anchor``'s class other than the anchor (rank r ↦ r + [r >= own])."""
    own = index.position[anchor] - index.start[anchor]
    rank = _uniform_below(words, index.size[anchor] - 1)
    return _class_member(index, anchor, rank + (rank >= own))


def _other_class_sample(index: _ClassIndex, sample, words):
    """Uniform sample of another class than ``sample``: skip its class block in ``order``."""
    start, size = index.start[sample], index.size[sample]
    position = _uniform_below(words, index.order.shape[0] - size)
    position = jnp.where(position >= start, position + size, position)
    return index.order[position]


def _random_anchor(index: _ClassIndex, words) -> jax.Array:
    """Uniform anchor among the samples whose class has at least two members."""
    eligible = index.eligible_cumsum
    draw = _uniform_below(words, eligible[-1])
    return jnp.searchsorted(eligible, draw, side="right").astype(jnp.int32)


def _random_positive_negative(index: _ClassIndex, anchor, words):
    """Uniform same-class positive != anchor and uniform other-class negative (method.md §2)."""
    positive = _random_positive(index, anchor, words[..., _POSITIVE, :])
    negative = _other_class_sample(index, anchor, words[..., _NEGATIVE, :])
    return positive, negative


class _RowMining(NamedTuple):
    """Deterministic part of Algorithm 1 for each anchor row; slots along the last axis."""

    nearest_position: jax.Array  # i32[A]: position of p_nn in S_i (0 if none)
    nearest: jax.Array  # i32[A]: id of p_nn, -1 if S_i holds no same-class sample
    negative: jax.Array  # i32[A, T]: id of the slot's valid negative
    has_negative: jax.Array  # bool[A, T]
    positive: jax.Array  # i32[A, T]: id of the closest valid positive farther than the negative
    has_positive: jax.Array  # bool[A, T]: such a positive exists (and so does the negative)
    num_valid_negatives: jax.Array  # i32[A]
    num_in_list: jax.Array  # i32[A]: same-class samples in S_i (p_nn included)
    inside_boundary: jax.Array  # bool[A]: the last entry of S_i lies inside the boundary


def _first_true(mask: jax.Array):
    """(position of the first True along the last axis clipped to k-1, whether there is one).

    A float min over masked positions: XLA:CPU vectorises it, unlike a variadic argmax.
    """
    k = mask.shape[-1]
    steps = jnp.arange(k, dtype=jnp.float32)
    position = jnp.min(jnp.where(mask, steps, float(k)), axis=-1).astype(jnp.int32)
    return jnp.minimum(position, k - 1), position < k


def _take(rows: jax.Array, position: jax.Array) -> jax.Array:
    """rows[r, position[r, ...]] for [R, k] rows and [R, ...] positions."""
    flat = position.reshape(position.shape[0], -1)
    return jnp.take_along_axis(rows, flat, axis=1).reshape(position.shape)


def _mine_rows(neighbour_ids, sq_dists, anchors, index, kappa, num_slots: int) -> _RowMining:
    """Algorithm 1 on [R, k] rows: masked first-True reductions, O(k) per slot, no sorting.

    p_nn = first same-class entry; valid = after p_nn and sq_dist >= κ·sq_dist(p_nn); slot s
    takes the (s+1)-th valid negative and the first valid positive strictly farther than it.
    """
    same, _ = _class_ranks(index, neighbour_ids, anchors)
    k = same.shape[1]
    steps = jnp.arange(k, dtype=jnp.int32)
    nearest, has_nearest = _first_true(same)
    boundary = kappa * _take(sq_dists, nearest)
    valid = (steps > nearest[:, None]) & (sq_dists >= boundary[:, None]) & has_nearest[:, None]
    valid_negatives = valid & ~same
    valid_positives = valid & same
    previous = jnp.full(nearest.shape, -1, jnp.int32)
    slots = []
    for _ in range(num_slots):
        negative, has_negative = _first_true(valid_negatives & (steps > previous[:, None]))
        negative_sq = _take(sq_dists, negative)
        positive, has_positive = _first_true(valid_positives & (sq_dists > negative_sq[:, None]))
        slots.append((negative, has_negative, positive, has_positive & has_negative))
        previous = jnp.where(has_negative, negative, k)
    negative, has_negative, positive, has_positive = (
        jnp.stack(x, axis=1) for x in zip(*slots, strict=True))
    return _RowMining(
        nearest_position=nearest,
        nearest=jnp.where(has_nearest, _take(neighbour_ids, nearest), -1),
        negative=_take(neighbour_ids, negative),
        has_negative=has_negative,
        positive=_take(neighbour_ids, positive),
        has_positive=has_positive,
        num_valid_negatives=_count(valid_negatives),
        num_in_list=_count(same),
        inside_boundary=has_nearest & (sq_dists[:, -1] < boundary))


def _map_row_chunks(fn, arrays, chunk_size: int):
    """fn over consecutive chunks of rows of ``arrays`` (leading axis A), results concatenated.

    The chunks keep a chunk's several passes over its [chunk, k] rows in cache (several times
    faster than whole-array passes at N = 1M). The last chunk is shifted back to end at row A
    (its overlap is recomputed identically), so nothing is padded or copied.
    """
    num_rows = arrays[0].shape[0]
    chunk_size = max(1, min(chunk_size, num_rows))
    num_chunks = -(-num_rows // chunk_size)
    if num_chunks == 1:
        return fn(*arrays)
    chunk_shapes = [jax.ShapeDtypeStruct((chunk_size, *x.shape[1:]), x.dtype) for x in arrays]
    outputs = jax.tree.map(lambda x: jnp.zeros((num_rows, *x.shape[1:]), x.dtype),
                           jax.eval_shape(fn, *chunk_shapes))

    def body(chunk, outputs):
        start = jnp.minimum(chunk * chunk_size, num_rows - chunk_size)
        values = fn(*(jax.lax.dynamic_slice_in_dim(x, start, chunk_size) for x in arrays))
        return jax.tree.map(
            lambda out, value: jax.lax.dynamic_update_slice_in_dim(out, value, start, 0),
            outputs, values)

    return jax.lax.fori_loop(0, num_chunks, body, outputs)


def _out_of_list_positives(index, neighbour_ids, anchors, nearest_position, num_in_list, words):
    """Fallback positives for rows whose mined negative has no valid positive farther away.

    Excluded ranks: the anchor and every class member in S_i (uniform over the rest of the
    class); when the whole class is in S_i, only the anchor and p_nn; when the class is exactly
    {anchor, p_nn}, p_nn itself (``pair``). Rows [R, k]; words u32[R, T, 2]. Returns
    (positive i32[R, T], pair bool[R]).
    """
    same, ranks = _class_ranks(index, neighbour_ids, anchors)
    class_size = index.size[anchors]
    num_outside = class_size - 1 - num_in_list
    steps = jnp.arange(same.shape[1], dtype=jnp.int32)
    excluded = same & ((num_outside[:, None] > 0) | (steps == nearest_position[:, None]))
    num_allowed = jnp.where(num_outside > 0, num_outside, class_size - 2)
    draw = _uniform_below(words, num_allowed[:, None])
    own = index.position[anchors] - index.start[anchors]
    rank = _nth_not_excluded(draw, num_allowed, own, ranks, excluded)
    positive = _class_member(index, anchors[:, None], rank)
    pair = num_allowed < 1
    nearest = _take(neighbour_ids, nearest_position)
    return jnp.where(pair[:, None], nearest[:, None], positive), pair


def _fill_out_of_list(needs, fill, chunk_size: int, initial):
    """Runs ``fill(rows)`` on the rows where ``needs`` holds, ``chunk_size`` rows at a time.

    Static shapes: the needing rows are compacted into a padded list (pad id = A, dropped on
    write) and a while_loop visits only as many chunks as there are needing rows.
    """
    num_rows = needs.shape[0]
    chunk_size = max(1, min(chunk_size, num_rows))
    num_chunks = -(-num_rows // chunk_size)
    rows = jnp.nonzero(needs, size=num_chunks * chunk_size, fill_value=num_rows)[0]
    count = jnp.sum(needs, dtype=jnp.int32)

    def body(state):
        chunk, outputs = state
        chunk_rows = jax.lax.dynamic_slice(rows, (chunk * chunk_size,), (chunk_size,))
        values = fill(jnp.minimum(chunk_rows, num_rows - 1))
        outputs = tuple(out.at[chunk_rows].set(value, mode="drop")
                        for out, value in zip(outputs, values, strict=True))
        return chunk + 1, outputs

    _, outputs = jax.lax.while_loop(
        lambda state: state[0] * chunk_size < count, body, (jnp.int32(0), initial))
    return outputs


def _random_words(key, shape) -> jax.Array:
    """u32[*shape, 2]: the two words of each 64-bit draw (drawn word-major: 4x faster on CPU)."""
    return jnp.moveaxis(jax.random.bits(key, (2, *shape), jnp.uint32), 0, -1)


def _slot_words(key, num_samples: int, anchors, num_slots: int):
    """Draws for each anchor id, bits over all N ids, so that a subset sees the same bits."""
    words = _random_words(key, (num_samples, num_slots, _DRAWS_PER_SLOT))
    return words if anchors is None else words[anchors]


@functools.partial(jax.jit, static_argnames=("num_slots", "chunk_size"))
def _mine(key, neighbour_ids, sq_dists, index, kappa, anchor_ids, *, num_slots, chunk_size):
    num_samples = index.order.shape[0]
    num_anchors = neighbour_ids.shape[0]
    if num_anchors == 0:  # e.g. a process without anchors
        empty = lambda dtype: jnp.zeros((0,), dtype)
        return (Triplets(empty(jnp.int32), empty(jnp.int32), empty(jnp.int32), empty(bool)),
                MiningInfo(empty(bool), empty(bool), empty(bool), empty(jnp.int32),
                           empty(jnp.int32), empty(bool)))
    anchors = (jnp.arange(num_samples, dtype=jnp.int32) if anchor_ids is None else anchor_ids)
    words = _slot_words(key, num_samples, anchor_ids, num_slots)
    rows = _map_row_chunks(
        lambda ids, sq, anchor: _mine_rows(ids, sq, anchor, index, kappa, num_slots),
        (neighbour_ids, sq_dists, anchors), chunk_size)

    # Mined slots whose negative has no valid positive farther away: out-of-list positive.
    positive_fallback = rows.has_negative & ~rows.has_positive

    def fill(chunk_rows):
        return _out_of_list_positives(
            index, neighbour_ids[chunk_rows], anchors[chunk_rows],
            rows.nearest_position[chunk_rows], rows.num_in_list[chunk_rows],
            words[chunk_rows][:, :, _POSITIVE, :])

    fallback_positive, pair = _fill_out_of_list(
        jnp.any(positive_fallback, axis=1), fill, chunk_size,
        (jnp.zeros((num_anchors, num_slots), jnp.int32), jnp.zeros((num_anchors,), bool)))
    positive = jnp.where(rows.has_positive, rows.positive, fallback_positive)

    # Slots without a valid negative: a random triplet that keeps the anchor, or a fully random
    # one when the anchor is alone in its class.
    slot_anchors = jnp.broadcast_to(anchors[:, None], (num_anchors, num_slots))
    replaced = index.size[slot_anchors] < 2
    random_anchor = jnp.where(replaced, _random_anchor(index, words[..., _ANCHOR, :]),
                              slot_anchors)
    random_positive, random_negative = _random_positive_negative(index, random_anchor, words)
    mined = rows.has_negative
    triplets = Triplets(
        anchor=jnp.where(mined, slot_anchors, random_anchor).reshape(-1),
        positive=jnp.where(mined, positive, random_positive).reshape(-1),
        negative=jnp.where(mined, rows.negative, random_negative).reshape(-1),
        mined=mined.reshape(-1))
    info = MiningInfo(
        positive_fallback=positive_fallback.reshape(-1),
        pair_fallback=(positive_fallback & pair[:, None]).reshape(-1),
        anchor_replaced=(~mined & replaced).reshape(-1),
        num_valid_negatives=rows.num_valid_negatives,
        nearest_positive=rows.nearest,
        list_inside_boundary=rows.inside_boundary)
    return triplets, info


@jax.jit
def _checked_class_index(labels):
    index = _class_index(labels)
    return index, index.size[index.order[0]], index.eligible_cumsum[-1]


# Class structure of recently used label arrays, keyed by content: labels are the same every
# epoch, and the argsort behind the structure is a large share of a mining pass at N = 1M.
_INDEX_CACHE: collections.OrderedDict = collections.OrderedDict()
_INDEX_CACHE_SIZE = 4


def _index_of_labels(labels) -> _ClassIndex:
    """The class structure of ``labels``.

    Concrete labels are checked (ValueError naming ``labels``: at least two classes and a class
    with two members), mapped to int32 (arbitrary integers allowed) and their structure is
    cached by content. Traced labels are used as int32, unchecked.
    """
    if not validation.is_concrete(labels):
        return _class_index(jnp.asarray(labels).astype(jnp.int32))
    array = validation.as_labels(labels)
    int32 = np.iinfo(np.int32)
    if array.size and (array.min() < int32.min or array.max() > int32.max):
        array = np.unique(array, return_inverse=True)[1].reshape(-1)
    array = np.ascontiguousarray(array, dtype=np.int32)
    fingerprint = (array.shape[0], hashlib.blake2b(array.tobytes(), digest_size=16).digest())
    cached = _INDEX_CACHE.get(fingerprint)
    if cached is not None:
        _INDEX_CACHE.move_to_end(fingerprint)
        return cached
    if array.shape[0] < 3:
        raise ValueError(
            f"labels: triplets need at least 3 samples (two classes, one with two members), "
            f"got {array.shape[0]}")
    index, first_class_size, num_eligible = _checked_class_index(jnp.asarray(array))
    if int(first_class_size) == array.shape[0]:
        raise ValueError(
            f"labels: triplets need at least two classes; all {array.shape[0]} samples have "
            f"label {int(array[0])}")
    if int(num_eligible) == 0:
        raise ValueError(
            "labels: triplets need a class with at least two samples; every class has one")
    _INDEX_CACHE[fingerprint] = index
    while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
        _INDEX_CACHE.popitem(last=False)
    return index


def _as_ids(values, name: str) -> jax.Array:
    """int32 jax array of ids; int64 input is range-checked first so that nothing wraps."""
    if not jnp.issubdtype(jnp.result_type(values), jnp.integer):
        raise ValueError(f"{name}: expected integer ids, got {jnp.result_type(values)}")
    if validation.is_concrete(values) and jnp.result_type(values).itemsize > 4 and np.size(values):
        host = np.asarray(values)
        if host.min() < 0 or host.max() > np.iinfo(np.int32).max:
            raise ValueError(f"{name}: ids must lie in [0, 2**31 - 1], got [{host.min()}, "
                             f"{host.max()}]")
    return jnp.asarray(values).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_samples", "chunk_size"))
def _first_bad_rows(neighbour_ids, sq_dists, anchors, *, num_samples, chunk_size):
    """First row with an id out of [0, N) or equal to its anchor, and first row whose distances
    are not finite or descend (-1: none). Float and boolean reductions in cache-sized chunks,
    which XLA:CPU vectorises (unlike integer min/max): ~10 ms at N = 100k, k = 128."""

    def rows(ids, sq, anchor):
        bad_ids = jnp.any((ids < 0) | (ids >= num_samples) | (ids == anchor[:, None]), axis=1)
        steps = jnp.min(sq[:, 1:] - sq[:, :-1], axis=1, initial=0.0)  # NaN for a NaN inside
        # Ascending with finite ends: every entry is finite.
        return bad_ids, ~((steps >= 0) & jnp.isfinite(sq[:, 0]) & jnp.isfinite(sq[:, -1]))

    flags = _map_row_chunks(rows, (neighbour_ids, sq_dists, anchors), chunk_size)
    return tuple(jnp.where(jnp.any(bad), jnp.argmax(bad), -1) for bad in flags)


def _check_shapes(neighbour_ids, sq_dists, num_samples, anchor_ids):
    """ValueErrors naming the argument for malformed shapes and types (concrete or traced)."""
    ids_shape, sq_shape = np.shape(neighbour_ids), np.shape(sq_dists)
    if len(ids_shape) != 2 or ids_shape[1] < 1:
        raise ValueError(f"neighbour_ids: expected a 2-D array [A, k], k >= 1, got {ids_shape}")
    if tuple(sq_shape) != tuple(ids_shape):
        raise ValueError(
            f"neighbour_sq_dists: shape {sq_shape} must equal neighbour_ids' shape {ids_shape}")
    if not jnp.issubdtype(jnp.result_type(sq_dists), jnp.floating):
        raise ValueError(
            f"neighbour_sq_dists: expected a float array, got {jnp.result_type(sq_dists)}")
    if anchor_ids is None and ids_shape[0] != num_samples:
        raise ValueError(
            f"neighbour_ids: has {ids_shape[0]} rows but labels has {num_samples} entries; "
            "without anchor_ids there is one row per sample")
    if anchor_ids is not None and np.shape(anchor_ids) != (ids_shape[0],):
        raise ValueError(
            f"anchor_ids: expected shape ({ids_shape[0]},) (one id per neighbour row), "
            f"got {np.shape(anchor_ids)}")


def _check_mining_settings(kappa, num_slots) -> None:
    """ValueErrors naming ``kappa`` (a scalar >= 0) or ``triplets_per_anchor`` (>= 1)."""
    if isinstance(num_slots, bool) or int(num_slots) != num_slots or num_slots < 1:
        raise ValueError(f"triplets_per_anchor: expected a positive integer, got {num_slots!r}")
    if np.ndim(kappa) != 0:
        raise ValueError(f"kappa: expected a scalar, got shape {np.shape(kappa)}")
    if validation.is_concrete(kappa):
        kappa_value = float(kappa)
        if not (np.isfinite(kappa_value) and kappa_value >= 0):
            raise ValueError(f"kappa: expected a finite scalar >= 0, got {kappa_value}")


def _check_values(neighbour_ids, sq_dists, anchors, num_samples: int, chunk_size: int):
    """ValueErrors naming the argument for concrete lists: ids in range and not the anchor,
    distances finite and ascending along each row."""
    if neighbour_ids.shape[0] == 0:
        return
    if anchors is None:
        anchors = jnp.arange(num_samples, dtype=jnp.int32)
    else:
        low, high = int(jnp.min(anchors)), int(jnp.max(anchors))
        if low < 0 or high >= num_samples:
            raise ValueError(
                f"anchor_ids: every id must lie in [0, {num_samples - 1}], got [{low}, {high}]")
    bad_ids, bad_sq = (int(x) for x in _first_bad_rows(
        neighbour_ids, sq_dists, anchors, num_samples=num_samples, chunk_size=chunk_size))
    if bad_ids >= 0:
        row = np.asarray(neighbour_ids[bad_ids])
        if row.min() < 0 or row.max() >= num_samples:
            raise ValueError(
                f"neighbour_ids: every id must lie in [0, {num_samples - 1}] (labels has "
                f"{num_samples} entries); row {bad_ids} holds ids in [{row.min()}, {row.max()}]")
        raise ValueError(f"neighbour_ids: row {bad_ids} lists its own anchor "
                         f"{int(anchors[bad_ids])}; neighbours are the OTHER samples")
    if bad_sq >= 0:
        if not np.isfinite(np.asarray(sq_dists[bad_sq])).all():
            raise ValueError(f"neighbour_sq_dists: row {bad_sq} contains NaN or inf")
        raise ValueError(f"neighbour_sq_dists: row {bad_sq} is not sorted ascending")


def mine_triplets(key, neighbour_ids, neighbour_sq_dists, labels, kappa, *,
                  triplets_per_anchor: int = 1, anchor_ids=None,
                  chunk_size: int = 2048) -> tuple[Triplets, MiningInfo]:
    """Smart-mines A·T triplets (method.md §2, Algorithm 1) with per-slot flags for logging.

    ``sample_triplets`` with the ``MiningInfo`` that the trainer logs once per epoch
    (``mining_summary``). Each anchor's list S_i is walked in ascending distance: the first
    same-class entry is the nearest positive p⁺ᴺᴺ and sets the boundary b = κ · d²(a, p⁺ᴺᴺ)
    (Eq. 6); after it, entries with d² >= b are valid. Slot s takes the (s+1)-th valid negative
    and the closest valid positive farther than it (else a positive of the anchor's class drawn
    outside S_i); a slot without a valid negative becomes a random triplet that keeps the anchor
    (``mined=False``). Pure and jit-compatible (static shapes, no host callbacks).

    Args:
      key: PRNG key (``jax.random.key(seed)`` or a legacy uint32[2] ``jax.random.PRNGKey``); may
        be traced. The random draws of anchor i depend on (key, i) only.
      neighbour_ids: int[A, k], k >= 1 (any integer dtype, used as int32; int64 ids must fit in
        int32). Row r lists the k nearest OTHER samples of anchor ``anchor_ids[r]`` (of sample r
        when ``anchor_ids`` is None, then A = N), ascending by distance: the ``ids`` of
        ``index.neighbours``. Every id in [0, N), never the row's own anchor. May be traced.
      neighbour_sq_dists: float[A, k] (any float dtype, used as float32), the squared Euclidean
        distances of those entries: same shape as ``neighbour_ids``, finite, each row ascending
        (the ``sq_dists`` of ``index.neighbours``). May be traced.
      labels: int[N] class labels of all N training samples (arbitrary integers, any integer
        dtype). Concrete labels need N >= 3, two classes and a class of >= 2 samples; traced
        labels are used as int32 unchecked.
      kappa: κ >= 0, a finite scalar (Python float or f32[]); may be traced (no recompilation per
        κ). Entries of a list closer than the exclusion boundary κ · d²(a, p⁺ᴺᴺ) (Eq. 6) are
        skipped: a larger κ gives easier triplets.
      triplets_per_anchor: T >= 1 triplet slots per anchor row (static Python int).
      anchor_ids: optional int[A] sample ids in [0, N) of the rows (default None: row r is sample
        r, A = N). Lets each process of a multi-host run mine its own anchors: the result equals
        the matching rows of the full run under the same key. May be traced.
      chunk_size: anchor rows processed together, >= 1 (static Python int); a memory and speed
        knob with no effect on the result.

    Returns:
      (triplets, info): ``Triplets`` of A·T entries, slot s of row r at index r·T + s:
        anchor: i32[A·T] the row's anchor (a random anchor where the row's anchor is alone in
          its class);
        positive: i32[A·T] a sample of the anchor's class, never the anchor;
        negative: i32[A·T] a sample of another class;
        mined: bool[A·T], False where the slot fell back to a random triplet (no valid negative
          left for it).
      and ``MiningInfo``: positive_fallback, pair_fallback, anchor_replaced bool[A·T];
      num_valid_negatives i32[A], nearest_positive i32[A] (-1: no same-class entry in S_i),
      list_inside_boundary bool[A].

    Raises:
      ValueError: naming the argument: ``neighbour_ids`` not a 2-D integer array [A, k] with
        k >= 1, an id outside [0, N), a row listing its own anchor, or A != N without
        ``anchor_ids``; ``neighbour_sq_dists`` of another shape, not float, not finite or a row
        not ascending; ``labels`` not 1-D integer, fewer than 3 samples, one class only, or no
        class with two samples; ``anchor_ids`` not of shape [A] or outside [0, N);
        ``kappa`` not a scalar, or a concrete κ negative or not finite; ``triplets_per_anchor``
        not an integer >= 1.
        Value checks run on concrete inputs only; under jit only shapes and dtypes are checked.

    Example:
      >>> import jax, numpy as np
      >>> from smine_jax import index, mining
      >>> embeddings = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
      >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
      >>> ids, sq_dists = index.neighbours(embeddings, k=7)
      >>> triplets, info = mining.mine_triplets(jax.random.key(0), ids, sq_dists, labels, 1.0)
      >>> triplets.anchor.shape, info.nearest_positive.shape
      ((8,), (8,))
    """
    _check_mining_settings(kappa, triplets_per_anchor)
    index, neighbour_ids, sq_dists, anchors = _checked_lists(
        neighbour_ids, neighbour_sq_dists, labels, anchor_ids, chunk_size)
    return _mine(key, neighbour_ids, sq_dists, index, jnp.asarray(kappa, jnp.float32),
                 anchors, num_slots=int(triplets_per_anchor), chunk_size=int(chunk_size))


def _checked_lists(neighbour_ids, neighbour_sq_dists, labels, anchor_ids, chunk_size):
    """(class index, ids i32, sq_dists f32, anchors i32 or None) after the input checks of
    ``mine_triplets`` (ValueError naming the argument; values only when concrete)."""
    neighbour_ids, neighbour_sq_dists, anchor_ids = (
        x if x is None or isinstance(x, jax.Array) else np.asarray(x)
        for x in (neighbour_ids, neighbour_sq_dists, anchor_ids))
    _check_shapes(neighbour_ids, neighbour_sq_dists, np.shape(labels)[0] if np.ndim(labels)
                  else -1, anchor_ids)
    index = _index_of_labels(labels)
    num_samples = index.order.shape[0]
    neighbour_ids = _as_ids(neighbour_ids, "neighbour_ids")
    sq_dists = jnp.asarray(neighbour_sq_dists).astype(jnp.float32)
    anchors = None if anchor_ids is None else _as_ids(anchor_ids, "anchor_ids")
    if validation.is_concrete(neighbour_ids, sq_dists, anchors):
        _check_values(neighbour_ids, sq_dists, anchors, num_samples, chunk_size)
    return index, neighbour_ids, sq_dists, anchors


def boundary_ratios(neighbour_ids, neighbour_sq_dists, labels, *, anchor_ids=None,
                    chunk_size: int = 2048) -> jax.Array:
    """f32[A]: per anchor, the largest κ at which its list still holds a valid negative.

    The per-anchor input of ``controller.calibrate_kappa`` (κ₀ of ``kappa_init="auto"``,
    method.md §3). r = d²(farthest other-class entry after p⁺ᴺᴺ) / d²(p⁺ᴺᴺ): at κ <= r that entry
    lies on or beyond the boundary κ · d²(p⁺ᴺᴺ) (Algorithm 1 keeps d² >= boundary), at κ > r no
    entry does. Pure and jit-compatible.

    Args:
      neighbour_ids: int[A, k], k >= 1 (any integer dtype, used as int32; int64 ids must fit in
        int32). Row r lists the k nearest OTHER samples of anchor ``anchor_ids[r]`` (of sample r
        when ``anchor_ids`` is None, then A = N), ascending by distance: the ``ids`` of
        ``index.neighbours``. Every id in [0, N), never the row's own anchor. May be traced.
      neighbour_sq_dists: float[A, k] (any float dtype, used as float32), the squared Euclidean
        distances of those entries: same shape as ``neighbour_ids``, finite, each row ascending
        (the ``sq_dists`` of ``index.neighbours``). May be traced.
      labels: int[N] class labels of all N training samples (arbitrary integers, any integer
        dtype). Concrete labels need N >= 3, two classes and a class of >= 2 samples; traced
        labels are used as int32 unchecked.
      anchor_ids: optional int[A] sample ids in [0, N) of the rows (default None: row r is sample
        r, A = N). Lets each process of a multi-host run mine its own anchors: the result equals
        the matching rows of the full run under the same key. May be traced.
      chunk_size: anchor rows processed together, >= 1 (static Python int); a memory and speed
        knob with no effect on the result.

    Returns:
      f32[A] ratios r >= 0, one per row: 0 where the list has no same-class entry or no
      other-class entry after it; +inf where d²(p⁺ᴺᴺ) = 0 (a duplicate: every later negative stays
      valid).

    Raises:
      ValueError: naming the argument: ``neighbour_ids`` not a 2-D integer array [A, k] with
        k >= 1, an id outside [0, N), a row listing its own anchor, or A != N without
        ``anchor_ids``; ``neighbour_sq_dists`` of another shape, not float, not finite or a row
        not ascending; ``labels`` not 1-D integer, fewer than 3 samples, one class only, or no
        class with two samples; ``anchor_ids`` not of shape [A] or outside [0, N).
        Value checks run on concrete inputs only; under jit only shapes and dtypes are checked.
    """
    index, neighbour_ids, sq_dists, anchors = _checked_lists(
        neighbour_ids, neighbour_sq_dists, labels, anchor_ids, chunk_size)
    return _boundary_ratios(neighbour_ids, sq_dists, index, anchors, chunk_size=int(chunk_size))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _boundary_ratios(neighbour_ids, sq_dists, index, anchor_ids, *, chunk_size):
    if neighbour_ids.shape[0] == 0:
        return jnp.zeros((0,), jnp.float32)
    anchors = (jnp.arange(index.order.shape[0], dtype=jnp.int32) if anchor_ids is None
               else anchor_ids)

    def rows(ids, sq, anchor):
        same, _ = _class_ranks(index, ids, anchor)
        k = same.shape[1]
        nearest, has_nearest = _first_true(same)
        after = jnp.arange(k, dtype=jnp.int32) > nearest[:, None]
        negatives = ~same & after & has_nearest[:, None]
        # The farthest such entry: the first True of the reversed row.
        reversed_position, has_negative = _first_true(negatives[:, ::-1])
        farthest = _take(sq, k - 1 - reversed_position)
        nearest_sq = _take(sq, nearest)
        ratio = jnp.where(nearest_sq > 0, farthest / jnp.where(nearest_sq > 0, nearest_sq, 1.0),
                          jnp.inf)
        return jnp.where(has_negative, ratio, 0.0)

    return _map_row_chunks(rows, (neighbour_ids, sq_dists, anchors), chunk_size)


def sample_triplets(key, neighbour_ids, neighbour_sq_dists, labels, kappa, *,
                    triplets_per_anchor: int = 1, anchor_ids=None,
                    chunk_size: int = 2048) -> Triplets:
    """Smart-mines A·T triplets from the anchors' neighbour lists (method.md §2, Algorithm 1).

    The epoch's hard-but-not-too-hard triplets for the train steps (``mine_triplets`` without the
    logging info). Each anchor's list S_i is walked in ascending distance: the first same-class
    entry is the nearest positive p⁺ᴺᴺ and sets the exclusion boundary b = κ · d²(a, p⁺ᴺᴺ)
    (Eq. 6) and is never a positive itself; after it, entries with d² >= b are valid. Slot s takes
    the (s+1)-th valid negative and the closest valid positive farther than it, so every mined
    triplet violates the ratio margin when mined; without such a positive, one of the anchor's
    class drawn uniformly outside S_i. A slot without a valid negative becomes a random triplet
    that keeps the anchor (``mined=False``); an anchor alone in its class, a fully random one.
    Pure and jit-compatible: static shapes, no host callbacks, O(A·k) work.

    Args:
      key: PRNG key (``jax.random.key(seed)`` or a legacy uint32[2] ``jax.random.PRNGKey``); may
        be traced. The random draws of anchor i depend on (key, i) only.
      neighbour_ids: int[A, k], k >= 1 (any integer dtype, used as int32; int64 ids must fit in
        int32). Row r lists the k nearest OTHER samples of anchor ``anchor_ids[r]`` (of sample r
        when ``anchor_ids`` is None, then A = N), ascending by distance: the ``ids`` of
        ``index.neighbours``. Every id in [0, N), never the row's own anchor. May be traced.
      neighbour_sq_dists: float[A, k] (any float dtype, used as float32), the squared Euclidean
        distances of those entries: same shape as ``neighbour_ids``, finite, each row ascending
        (the ``sq_dists`` of ``index.neighbours``). May be traced.
      labels: int[N] class labels of all N training samples (arbitrary integers, any integer
        dtype). Concrete labels need N >= 3, two classes and a class of >= 2 samples; traced
        labels are used as int32 unchecked.
      kappa: κ >= 0, a finite scalar (Python float or f32[]); may be traced (no recompilation per
        κ). Entries of a list closer than the exclusion boundary κ · d²(a, p⁺ᴺᴺ) (Eq. 6) are
        skipped: a larger κ gives easier triplets.
      triplets_per_anchor: T >= 1 triplet slots per anchor row (static Python int).
      anchor_ids: optional int[A] sample ids in [0, N) of the rows (default None: row r is sample
        r, A = N). Lets each process of a multi-host run mine its own anchors: the result equals
        the matching rows of the full run under the same key. May be traced.
      chunk_size: anchor rows processed together, >= 1 (static Python int); a memory and speed
        knob with no effect on the result.

    Returns:
      ``Triplets`` NamedTuple of A·T entries, slot s of row r at index r·T + s:
        anchor: i32[A·T] the row's anchor (a random anchor where the row's anchor is alone in
          its class);
        positive: i32[A·T] a sample of the anchor's class, never the anchor;
        negative: i32[A·T] a sample of another class;
        mined: bool[A·T], False where the slot fell back to a random triplet (no valid negative
          left for it).

    Raises:
      ValueError: naming the argument: ``neighbour_ids`` not a 2-D integer array [A, k] with
        k >= 1, an id outside [0, N), a row listing its own anchor, or A != N without
        ``anchor_ids``; ``neighbour_sq_dists`` of another shape, not float, not finite or a row
        not ascending; ``labels`` not 1-D integer, fewer than 3 samples, one class only, or no
        class with two samples; ``anchor_ids`` not of shape [A] or outside [0, N);
        ``kappa`` not a scalar, or a concrete κ negative or not finite; ``triplets_per_anchor``
        not an integer >= 1.
        Value checks run on concrete inputs only; under jit only shapes and dtypes are checked.

    Example:
      >>> import jax, numpy as np
      >>> from smine_jax import index, mining
      >>> embeddings = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
      >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
      >>> ids, sq_dists = index.neighbours(embeddings, k=7)
      >>> triplets = mining.sample_triplets(jax.random.key(0), ids, sq_dists, labels, kappa=1.0)
      >>> triplets.anchor.shape, triplets.anchor.dtype, triplets.mined.dtype
      ((8,), dtype('int32'), dtype('bool'))
    """
    return mine_triplets(key, neighbour_ids, neighbour_sq_dists, labels, kappa,
                         triplets_per_anchor=triplets_per_anchor, anchor_ids=anchor_ids,
                         chunk_size=chunk_size)[0]


@functools.partial(jax.jit, static_argnames=("num_triplets",))
def _random(key, index: _ClassIndex, num_triplets: int) -> Triplets:
    words = _random_words(key, (num_triplets, _DRAWS_PER_SLOT))
    anchor = _random_anchor(index, words[:, _ANCHOR, :])
    positive, negative = _random_positive_negative(index, anchor, words)
    return Triplets(anchor, positive, negative, jnp.zeros((num_triplets,), bool))


def random_triplets(key, labels, num_triplets: int) -> Triplets:
    """``num_triplets`` uniformly random triplets (method.md §2): the baseline of the random epochs.

    The triplets of epochs 1-2 and the random share of every later epoch (``epoch_triplets``):
    an anchor uniform among the samples of classes with at least two members, a positive uniform
    in the anchor's class other than the anchor, a negative uniform among the other classes.
    Pure and jit-compatible.

    Args:
      key: PRNG key (``jax.random.key(seed)`` or a legacy uint32[2] ``jax.random.PRNGKey``); may
        be traced.
      labels: int[N] class labels of all N training samples (arbitrary integers, any integer
        dtype). Concrete labels need N >= 3, two classes and a class of >= 2 samples; traced
        labels are used as int32 unchecked.
      num_triplets: M >= 0 triplets to draw (static Python int; a whole float such as 4.0 is
        accepted).

    Returns:
      ``Triplets`` of M entries: anchor, positive, negative i32[M] sample ids in [0, N) and
      mined bool[M], all False.

    Raises:
      ValueError: ``num_triplets`` not a non-negative integer; concrete ``labels`` not 1-D
        integer, fewer than 3 samples, one class only, or no class with two samples.

    Example:
      >>> import jax, numpy as np
      >>> from smine_jax import mining
      >>> labels = np.array([0, 0, 1, 1, 2])
      >>> triplets = mining.random_triplets(jax.random.key(0), labels, 4)
      >>> triplets.anchor.shape, bool(triplets.mined.any())
      ((4,), False)
    """
    num_triplets = validation.integer(num_triplets, "num_triplets", minimum=0, whole_floats=True)
    return _random(key, _index_of_labels(labels), num_triplets)


@functools.partial(jax.jit, static_argnames=("num_triplets",))
def _assemble(key, mined: Triplets, index: _ClassIndex, mined_fraction, *, num_triplets: int):
    num_candidates = mined.mined.shape[0]
    pick_key, random_key, shuffle_key = jax.random.split(key, 3)
    fresh = _random(random_key, index, num_triplets)
    if num_candidates == 0:
        mined = fresh
    available = jnp.sum(mined.mined, dtype=jnp.int32)
    target = jnp.round(mined_fraction * num_triplets).astype(jnp.int32)
    num_mined = jnp.minimum(target, available)
    # The mined triplets in uniformly random order first, then the rest.
    shuffled = jax.random.permutation(pick_key, mined.mined.shape[0])
    order = shuffled[jnp.argsort(~mined.mined[shuffled], stable=True)]
    slot = jnp.arange(num_triplets, dtype=jnp.int32)
    chosen = order[jnp.minimum(slot, max(mined.mined.shape[0] - 1, 0))]
    use_mined = slot < num_mined
    take = lambda mined_part, random_part: jnp.where(use_mined, mined_part[chosen], random_part)
    combined = Triplets(take(mined.anchor, fresh.anchor), take(mined.positive, fresh.positive),
                        take(mined.negative, fresh.negative), use_mined)
    permutation = jax.random.permutation(shuffle_key, num_triplets)
    combined = Triplets(*(x[permutation] for x in combined))
    stats = EpochStats(jnp.int32(num_triplets), num_mined,
                       num_mined.astype(jnp.float32) / max(num_triplets, 1))
    return combined, stats


def epoch_triplets(key, mined: Triplets, labels, *, mined_fraction: float,
                   num_triplets: int | None = None) -> tuple[Triplets, EpochStats]:
    """An epoch's triplet list: a share of mined triplets, the rest random, shuffled (method.md §2).

    Step 5 of method.md §2. Takes round(mined_fraction · M) triplets with ``mined=True`` from
    ``mined`` (a uniformly random subset when more are available; all of them when fewer are:
    ``EpochStats.mined_fraction`` reports the share actually used), fills up to M with fresh
    ``random_triplets`` and shuffles. Slots of ``mined`` with ``mined=False`` (random fallbacks)
    are never reused. Multi-host: each process assembles its own list from its own anchors'
    triplets; fold the process index into ``key``. Pure and jit-compatible.

    Args:
      key: PRNG key (``jax.random.key(seed)`` or a legacy uint32[2] ``jax.random.PRNGKey``); may
        be traced.
      mined: ``Triplets`` of M' candidates, e.g. from ``sample_triplets``: anchor, positive,
        negative int[M'] sample ids in [0, N) and mined bool[M'], every field of shape (M',).
        M' = 0 is allowed (then every triplet is random).
      labels: int[N] class labels of all N training samples (arbitrary integers, any integer
        dtype), the ones ``mined`` was mined with. Concrete labels need N >= 3, two classes and a
        class of >= 2 samples; traced labels are used as int32 unchecked.
      mined_fraction: target share of mined triplets, a float in [0, 1] (may be traced; checked
        when concrete). 0 gives random triplets only (the random epochs).
      num_triplets: M >= 0, the length of the list (static Python int; default None: M = M').

    Returns:
      (triplets, stats): ``Triplets`` of M entries in random order (anchor, positive, negative
      i32[M]; mined bool[M], True for the triplets taken from ``mined``) and ``EpochStats``
      (num_triplets i32[], num_mined i32[], mined_fraction f32[]).

    Raises:
      ValueError: ``mined_fraction`` outside [0, 1] (concrete only); ``num_triplets`` not a
        non-negative integer; a field ``mined.<name>`` not of shape (M',); concrete ``labels``
        not 1-D integer, fewer than 3 samples, one class only, or no class with two samples.

    Example:
      >>> import jax, numpy as np
      >>> from smine_jax import mining
      >>> labels = np.array([0, 0, 0, 1, 1, 1])
      >>> mined = mining.Triplets(np.array([0, 3]), np.array([1, 4]), np.array([3, 0]),
      ...                         np.array([True, True]))
      >>> triplets, stats = mining.epoch_triplets(jax.random.key(0), mined, labels,
      ...                                         mined_fraction=0.5, num_triplets=4)
      >>> triplets.anchor.shape, int(stats.num_mined)
      ((4,), 2)
    """
    num_candidates = int(np.shape(mined.anchor)[0])
    num_triplets = num_candidates if num_triplets is None else validation.integer(
        num_triplets, "num_triplets", minimum=0, whole_floats=True)
    if validation.is_concrete(mined_fraction):
        fraction = float(mined_fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"mined_fraction: expected a value in [0, 1], got {fraction}")
    for name, array in zip(Triplets._fields, mined, strict=True):
        if np.shape(array) != (num_candidates,):
            raise ValueError(f"mined.{name}: expected shape ({num_candidates},), "
                             f"got {np.shape(array)}")
    mined = Triplets(*(jnp.asarray(x, jnp.int32) for x in mined[:3]),
                     jnp.asarray(mined.mined, bool))
    return _assemble(key, mined, _index_of_labels(labels),
                     jnp.asarray(mined_fraction, jnp.float32), num_triplets=num_triplets)


def mining_summary(triplets: Triplets, info: MiningInfo) -> dict[str, jax.Array]:
    """Counts of an epoch's mining outcome, one scalar per name, to log once per epoch.

    Args:
      triplets: the ``Triplets`` of ``mine_triplets`` (A·T entries).
      info: the ``MiningInfo`` of the same call.

    Returns:
      dict of i32[] scalars: ``triplets`` (A·T), ``mined`` (slots with a valid negative),
      ``random_fallback`` (the others), ``anchor_replaced``, ``positive_fallback``,
      ``pair_fallback`` (sums of the ``MiningInfo`` flags), ``anchors_without_positive`` (no
      same-class entry in the list), ``anchors_mined`` (at least one valid negative) and
      ``lists_inside_boundary``.
    """
    return {
        "triplets": jnp.int32(triplets.mined.shape[0]),
        "mined": jnp.sum(triplets.mined, dtype=jnp.int32),
        "random_fallback": jnp.sum(~triplets.mined, dtype=jnp.int32),
        "anchor_replaced": jnp.sum(info.anchor_replaced, dtype=jnp.int32),
        "positive_fallback": jnp.sum(info.positive_fallback, dtype=jnp.int32),
        "pair_fallback": jnp.sum(info.pair_fallback, dtype=jnp.int32),
        "anchors_without_positive": jnp.sum(info.nearest_positive < 0, dtype=jnp.int32),
        "anchors_mined": jnp.sum(info.num_valid_negatives > 0, dtype=jnp.int32),
        "lists_inside_boundary": jnp.sum(info.list_inside_boundary, dtype=jnp.int32),
    }


# --------------------------------------------------------------------------- batches of pairs


class BatchPlanInfo(NamedTuple):
    """What ``index_batches`` assembled, per batch and for the epoch, for logging.

    Attributes:
      smart_pairs: i32[num_batches] distinct seed anchors of the batch's smart slots whose own
        image and smart negative's image are both in the batch.
      random_classes: i32[num_batches] classes of the batch that came from the random fill,
        not from a seed pair.
      seeds_available: i32[] rows with a usable smart negative at this κ.
    """

    smart_pairs: jax.Array  # i32[num_batches]: distinct seed anchors of the batch's smart
    #                         slots whose own image and smart negative's image are both in it
    random_classes: jax.Array  # i32[num_batches]: classes from the random fill, not from a seed
    #                            pair
    seeds_available: jax.Array  # i32[]: rows with a usable smart negative at this κ


def _distinct_draws(words: jax.Array, bound: jax.Array, first=None) -> jax.Array:
    """i32[..., T]: an ordered sample without replacement of T values in [0, bound), uniform.

    Draw i is uniform over the values not drawn before: its t-th free value, t + #{j : e_(j) −
    j <= t} for the earlier draws sorted (e_(j) − j free values lie below e_(j)). Exact, and
    O(T² log T) whatever ``bound`` (a class or the class count) is. ``first`` (i32[...], -1 for
    none) forces draw 0, so the rest is uniform over the other values. Draws at i >= bound are
    arbitrary (callers mask them out). Shapes: words u32[..., T, 2]; bound, first i32[...].
    """
    num = words.shape[-2]
    steps = jnp.arange(num, dtype=jnp.int32)

    def body(i, drawn):
        free = _uniform_below(jnp.take(words, i, axis=-2), bound - i)
        earlier = jnp.sort(drawn, axis=-1) - steps  # not yet drawn: int32 max − j > free
        value = free + _count(earlier <= free[..., None])
        if first is not None:
            value = jnp.where((i == 0) & (first >= 0), first, value)
        return jnp.where(steps == i, value[..., None], drawn)

    initial = jnp.full(words.shape[:-1], jnp.iinfo(jnp.int32).max, jnp.int32)
    return jax.lax.fori_loop(0, num, body, initial)


def _first_occurrences(values: jax.Array, valid: jax.Array) -> jax.Array:
    """bool[B, L]: valid entries whose value no earlier valid entry of the row holds.

    A stable sort per row (O(L log L), no [L, L] comparison): the first entry of each run of
    equal values is the earliest.
    """
    keys = jnp.where(valid, values, jnp.iinfo(jnp.int32).max)  # invalid entries last
    order = jnp.argsort(keys, axis=1, stable=True)
    ordered = jnp.take_along_axis(keys, order, axis=1)
    first = jnp.concatenate(
        [jnp.ones_like(ordered[:, :1], bool), ordered[:, 1:] != ordered[:, :-1]], axis=1)
    rows = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros(values.shape, bool).at[rows, order].set(first) & valid


@jax.jit
def _eligible_classes(index: _ClassIndex):
    """(start of each class with >= 2 members in ``order``, padded i32[N]; their count)."""
    positions = jnp.arange(index.order.shape[0], dtype=jnp.int32)
    eligible = (index.start[index.order] == positions) & (index.size[index.order] >= 2)
    starts = jnp.nonzero(eligible, size=positions.shape[0], fill_value=0)[0].astype(jnp.int32)
    return starts, jnp.sum(eligible, dtype=jnp.int32)


def _smart_negatives(neighbour_ids, sq_dists, anchors, index, kappa, chunk_size: int):
    """(negative i32[A], usable bool[A]): each row's slot-0 negative of Algorithm 1, usable
    when it exists and its class has >= 2 members (so it can anchor a pair of its own)."""

    def rows(ids, sq, anchor):
        mined = _mine_rows(ids, sq, anchor, index, kappa, num_slots=1)
        return mined.negative[:, 0], mined.has_negative[:, 0]

    negative, has_negative = _map_row_chunks(rows, (neighbour_ids, sq_dists, anchors), chunk_size)
    return negative, has_negative & (index.size[negative] >= 2)


@functools.partial(jax.jit, static_argnames=(
    "classes_per_batch", "samples_per_class", "num_batches", "num_smart", "chunk_size"))
def _index_batches(key, neighbour_ids, sq_dists, index, kappa, anchor_ids, *, classes_per_batch,
                   samples_per_class, num_batches, num_smart, chunk_size):
    num_classes, num_members = classes_per_batch, samples_per_class
    num_anchors = neighbour_ids.shape[0]
    batch = jnp.arange(num_batches)[:, None]
    # One draw of random bits for everything (the generator dominates the compile time).
    num_draws = num_batches * num_classes
    words = _random_words(key, (num_anchors + num_draws * (1 + num_members),))
    seed_words, class_words, member_words = jnp.split(
        words, [num_anchors, num_anchors + num_draws])

    # Seeds of the smart pair slots: the usable rows in random order, cycled.
    shape = (num_batches, num_smart)
    if num_anchors:
        anchors = (jnp.arange(index.order.shape[0], dtype=jnp.int32) if anchor_ids is None
                   else anchor_ids)
        negative, usable = _smart_negatives(neighbour_ids, sq_dists, anchors, index, kappa,
                                            chunk_size)
        num_usable = jnp.sum(usable, dtype=jnp.int32)
        # Usable rows first, in the order of their 64-bit draws: uniformly random.
        order = jnp.lexsort((seed_words[:, 1], seed_words[:, 0], ~usable))
        slot = jnp.arange(num_batches * num_smart, dtype=jnp.int32).reshape(shape)
        seed_rows = order[slot % jnp.maximum(num_usable, 1)]
        seed, seed_negative = anchors[seed_rows], negative[seed_rows]
        has_seed = jnp.broadcast_to(num_usable > 0, shape)
    else:  # e.g. a process without anchors: every batch is random
        num_usable = jnp.int32(0)
        seed = seed_negative = jnp.zeros(shape, jnp.int32)
        has_seed = jnp.zeros(shape, bool)

    # Candidates [seed class, negative class] per smart slot, then C random distinct eligible
    # classes; a class is its start in `order`. The first C distinct candidates are the batch's.
    starts, num_eligible = _eligible_classes(index)
    random_classes = starts[_distinct_draws(
        class_words.reshape(num_batches, num_classes, 2), num_eligible)]
    pair_members = jnp.stack([seed, seed_negative], axis=-1).reshape(num_batches, 2 * num_smart)
    candidates = jnp.concatenate([index.start[pair_members], random_classes], axis=1)
    required = jnp.concatenate(
        [pair_members, jnp.full((num_batches, num_classes), -1, jnp.int32)], axis=1)
    valid = jnp.concatenate([jnp.repeat(has_seed, 2, axis=1),
                             jnp.ones((num_batches, num_classes), bool)], axis=1)
    keep = _first_occurrences(candidates, valid)
    block = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1
    block = jnp.where(keep & (block < num_classes), block, num_classes)  # out of range: dropped
    place = lambda initial, values: initial.at[batch, block].set(values, mode="drop")
    chosen = place(jnp.zeros((num_batches, num_classes), jnp.int32), candidates)
    chosen_required = place(jnp.full((num_batches, num_classes), -1, jnp.int32), required)
    from_random = place(jnp.zeros((num_batches, num_classes), bool),
                        jnp.broadcast_to(jnp.arange(candidates.shape[1]) >= 2 * num_smart,
                                         candidates.shape))

    # Members: the required one first, then uniform distinct others; short classes masked.
    size = index.size[index.order[chosen]]
    required_rank = jnp.where(chosen_required >= 0,
                              index.position[chosen_required] - chosen, -1)
    ranks = _distinct_draws(member_words.reshape(num_batches, num_classes, num_members, 2),
                            size, first=required_rank)
    mask = jnp.arange(num_members) < size[..., None]
    ids = index.order[chosen[..., None] + jnp.where(mask, ranks, 0)]
    ids = ids.reshape(num_batches, num_classes * num_members)
    mask = mask.reshape(ids.shape)

    # Distinct seeds of the batch whose image and negative's image are both in it.
    present_ids = jnp.sort(jnp.where(mask, ids, -1), axis=1)

    def present(values):
        found = jax.vmap(jnp.searchsorted)(present_ids, values)
        found = jnp.minimum(found, present_ids.shape[1] - 1)
        return jnp.take_along_axis(present_ids, found, axis=1) == values

    counted = _first_occurrences(seed, has_seed) & present(seed) & present(seed_negative)
    info = BatchPlanInfo(smart_pairs=_count(counted), random_classes=_count(from_random),
                         seeds_available=num_usable)
    return ids, mask, info


def index_batches(key, neighbour_ids, neighbour_sq_dists, labels, kappa, *,
                  classes_per_batch: int, samples_per_class: int, num_batches: int,
                  smart_fraction: float = 1.0, anchor_ids=None,
                  chunk_size: int = 2048) -> tuple[jax.Array, jax.Array, BatchPlanInfo]:
    """An epoch of class-balanced batches seeded with smart pairs (method.md §6).

    Puts each seed anchor and its smart negative (slot 0 of Algorithm 1 at κ) into one
    m-per-class batch, so that in-batch miners and losses see the negatives the index found. A
    batch is C = ``classes_per_batch`` classes of m = ``samples_per_class`` images: block j (slots
    j·m … j·m + m − 1, as ``data.m_per_class_batches``) holds the j-th class. Of its P = C // 2
    pair slots, the first S = round(smart_fraction · P) (half up) are smart: each proposes a seed
    anchor's class and its smart negative's class, with the seed and the negative as required
    members. A row is a usable seed when its smart negative exists and that negative's class has
    >= 2 members; the epoch's smart slots take the usable seeds in uniformly random order without
    replacement, cycling when there are fewer; without any, the slots fall back to random. The
    batch's classes are the first C distinct ones of [seed 1, negative 1, …, seed S, negative S,
    then C distinct random classes with >= 2 members in random order]. A class gives its required
    member, then uniform distinct others up to m; a class with fewer than m members gives all of
    them and the rest of its block is masked out (id: its first member). So every image appears
    at most once per batch and every class has at least two real members. Pure and
    jit-compatible.

    Args:
      key: PRNG key (``jax.random.key(seed)`` or a legacy uint32[2] ``jax.random.PRNGKey``); may
        be traced. The result is a pure function of the key and the inputs.
      neighbour_ids: int[A, k], k >= 1 (any integer dtype, used as int32; int64 ids must fit in
        int32). Row r lists the k nearest OTHER samples of anchor ``anchor_ids[r]`` (of sample r
        when ``anchor_ids`` is None, then A = N), ascending by distance: the ``ids`` of
        ``index.neighbours``. Every id in [0, N), never the row's own anchor. May be traced.
      neighbour_sq_dists: float[A, k] (any float dtype, used as float32), the squared Euclidean
        distances of those entries: same shape as ``neighbour_ids``, finite, each row ascending
        (the ``sq_dists`` of ``index.neighbours``). May be traced.
      labels: int[N] class labels of all N training samples (arbitrary integers, any integer
        dtype). Concrete labels need N >= 3, two classes and a class of >= 2 samples; traced
        labels are used as int32 unchecked.
        At least C = ``classes_per_batch`` classes need >= 2 members.
      kappa: κ >= 0, a finite scalar (Python float or f32[]); may be traced (no recompilation per
        κ). Entries of a list closer than the exclusion boundary κ · d²(a, p⁺ᴺᴺ) (Eq. 6) are
        skipped: a larger κ gives easier triplets.
      classes_per_batch: C >= 2 classes per batch (static Python int).
      samples_per_class: m >= 2 images per class (static Python int).
      num_batches: batches in the epoch, >= 1 (static Python int).
      smart_fraction: share of the pair slots seeded by smart pairs, a concrete float in [0, 1]
        (static: it sets the number of smart slots).
      anchor_ids: optional int[A] sample ids in [0, N) of the rows (default None: row r is sample
        r, A = N). Lets each process of a multi-host run mine its own anchors: the result equals
        the matching rows of the full run under the same key. May be traced.
      chunk_size: anchor rows processed together, >= 1 (static Python int); a memory and speed
        knob with no effect on the result.

    Returns:
      (ids, mask, info): ids i32[num_batches, C·m] sample ids in [0, N); mask bool[num_batches,
      C·m], False on the padded slots of classes with fewer than m members; info
      ``BatchPlanInfo`` (smart_pairs i32[num_batches], random_classes i32[num_batches],
      seeds_available i32[]).

    Raises:
      ValueError: naming the argument: ``neighbour_ids`` not a 2-D integer array [A, k] with
        k >= 1, an id outside [0, N), a row listing its own anchor, or A != N without
        ``anchor_ids``; ``neighbour_sq_dists`` of another shape, not float, not finite or a row
        not ascending; ``labels`` not 1-D integer, fewer than 3 samples, one class only, or no
        class with two samples; ``anchor_ids`` not of shape [A] or outside [0, N);
        ``kappa`` not a scalar, or a concrete κ negative or not finite; ``classes_per_batch`` < 2,
        ``samples_per_class`` < 2 or ``num_batches`` < 1 (or not integers); ``smart_fraction``
        traced or outside [0, 1]; ``classes_per_batch`` larger than the number of classes with
        >= 2 samples.
        Value checks run on concrete inputs only; under jit only shapes and dtypes are checked.

    Example:
      >>> import jax, numpy as np
      >>> from smine_jax import index, mining
      >>> embeddings = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
      >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
      >>> ids, sq_dists = index.neighbours(embeddings, k=7)
      >>> batch_ids, mask, info = mining.index_batches(
      ...     jax.random.key(0), ids, sq_dists, labels, 1.0, classes_per_batch=2,
      ...     samples_per_class=2, num_batches=3)
      >>> batch_ids.shape, mask.dtype
      ((3, 4), dtype('bool'))
    """
    num_classes, num_members, num_batches = (
        validation.integer(value, name, minimum=low, whole_floats=True) for value, name, low in (
            (classes_per_batch, "classes_per_batch", 2),
            (samples_per_class, "samples_per_class", 2), (num_batches, "num_batches", 1)))
    if not validation.is_concrete(smart_fraction) or np.ndim(smart_fraction) != 0:
        raise ValueError(f"smart_fraction: expected a concrete float in [0, 1] (it sets static "
                         f"shapes), got {smart_fraction!r}")
    fraction = float(smart_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"smart_fraction: expected a value in [0, 1], got {fraction}")
    num_smart = int(np.floor(fraction * (num_classes // 2) + 0.5))
    _check_mining_settings(kappa, 1)
    index, neighbour_ids, sq_dists, anchors = _checked_lists(
        neighbour_ids, neighbour_sq_dists, labels, anchor_ids, chunk_size)
    if validation.is_concrete(index.order):
        with jax.ensure_compile_time_eval():  # also inside a caller's jit (cached index)
            num_eligible = int(_eligible_classes(index)[1])
        if num_eligible < num_classes:
            raise ValueError(
                f"classes_per_batch: {num_classes} distinct classes per batch need as many "
                f"classes with at least 2 samples; labels has {num_eligible}")
    return _index_batches(key, neighbour_ids, sq_dists, index, jnp.asarray(kappa, jnp.float32),
                          anchors, classes_per_batch=num_classes, samples_per_class=num_members,
                          num_batches=num_batches, num_smart=num_smart,
                          chunk_size=int(chunk_size))
