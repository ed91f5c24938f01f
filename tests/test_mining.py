"""smine_jax.mining against a plain-Python walk of method.md §2 Algorithm 1, plus invariants.

The reference (``reference_walk``) loops over each neighbour list exactly as method.md §2 reads.
The deterministic parts (mined flags, negatives, in-list positives, p_nn, valid-negative counts)
must match it exactly; the random parts (out-of-list positives, random triplets) are checked by
the invariants of method.md §2 and by frequency tests. Problems are random points on a small
integer grid (exact float32 distances, many ties and duplicates), several independent problems
stacked into one with disjoint labels so that a handful of shapes (jit compilations) covers many
cases. """

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from smine_jax import mining

KEY = jax.random.key(0)


# --------------------------------------------------------------------------- problem makers


def exact_lists(points, k):
    """Neighbour lists: the k nearest OTHER rows, ascending, ties by lower index (exact)."""
    diff = points[:, None, :] - points[None, :, :]
    sq = np.sum(diff * diff, axis=-1).astype(np.float32)  # small integers: exact in float32
    np.fill_diagonal(sq, np.inf)
    ids = np.argsort(sq, axis=1, kind="stable")[:, :k]
    return ids.astype(np.int32), np.take_along_axis(sq, ids, axis=1), sq


def make_problem(seed, total, k):
    """Independent sub-problems (each >= k + 1 samples, class sizes 1..6, integer points),
    stacked to exactly ``total`` samples with disjoint labels and block-local neighbour lists."""
    rng = np.random.default_rng(seed)
    labels, ids, sq_dists, full = [], [], [], np.full((total, total), np.inf, np.float32)
    start, next_label = 0, 0
    while start < total:
        size = int(rng.integers(k + 1, k + 9))
        if total - start - size < k + 1:
            size = total - start
        sizes = []
        while sum(sizes) < size:
            sizes.append(int(rng.integers(1, 7)))
        sizes[-1] -= sum(sizes) - size
        sub_labels = np.repeat(np.arange(len(sizes)) + next_label, sizes)
        labels.append(rng.permutation(sub_labels))
        next_label += len(sizes)
        points = rng.integers(0, 3, size=(size, 2)).astype(np.float32)
        sub_ids, sub_sq, sub_full = exact_lists(points, k)
        ids.append(sub_ids + start)
        sq_dists.append(sub_sq)
        full[start:start + size, start:start + size] = sub_full
        start += size
    return (np.concatenate(ids), np.concatenate(sq_dists), np.concatenate(labels), full)


# --------------------------------------------------------------------------- the reference


def reference_walk(ids, sq_dists, labels, kappa, num_slots, anchors=None):
    """method.md §2 Algorithm 1, one anchor at a time, one list entry at a time.

    Returns per row (p_nn id or -1, number of valid negatives, slots, whether the list ends
    inside the boundary), each slot either ("mined", negative, positive or None when no valid
    positive is farther) or ("random",).
    """
    anchors = np.arange(len(labels)) if anchors is None else anchors
    kappa = np.float32(kappa)
    rows = []
    for row, anchor in enumerate(anchors):
        nearest, boundary, negatives, positives = None, None, [], []
        for j, neighbour in enumerate(ids[row]):
            same = labels[neighbour] == labels[anchor]
            if nearest is None:
                if same:  # the nearest positive sets the boundary, never a positive itself
                    nearest, boundary = j, kappa * np.float32(sq_dists[row, j])
                continue
            if sq_dists[row, j] < boundary:
                continue
            (positives if same else negatives).append(j)
        slots = []
        for slot in range(num_slots):
            if slot >= len(negatives):
                slots.append(("random",))
                continue
            n = negatives[slot]
            p = next((j for j in positives if sq_dists[row, j] > sq_dists[row, n]), None)
            slots.append(("mined", ids[row, n], None if p is None else ids[row, p]))
        inside = nearest is not None and sq_dists[row, -1] < boundary
        rows.append((-1 if nearest is None else ids[row, nearest], len(negatives), slots,
                     inside))
    return rows


def check_against_reference(ids, sq_dists, labels, kappa, num_slots, triplets, info,
                            full_sq=None, anchors=None):
    """Exact match of the deterministic parts; the method's invariants for the random parts."""
    anchors = np.arange(len(labels)) if anchors is None else np.asarray(anchors)
    t = jax.tree.map(np.asarray, triplets)
    info = jax.tree.map(np.asarray, info)
    class_size = np.bincount(np.unique(labels, return_inverse=True)[1])[
        np.unique(labels, return_inverse=True)[1]]
    reference = reference_walk(ids, sq_dists, labels, kappa, num_slots, anchors)
    for row, (nearest, num_negatives, slots, inside) in enumerate(reference):
        anchor = anchors[row]
        assert info.nearest_positive[row] == nearest, row
        assert info.num_valid_negatives[row] == num_negatives, row
        assert info.list_inside_boundary[row] == inside, row
        in_list = set(ids[row].tolist())
        class_members = set(np.flatnonzero(labels == labels[anchor]).tolist()) - {anchor}
        mined_negatives = []
        for slot, expected in enumerate(slots):
            i = row * num_slots + slot
            a, p, n = t.anchor[i], t.positive[i], t.negative[i]
            # Every triplet is valid.
            assert labels[p] == labels[a] and p != a and labels[n] != labels[a], (row, slot)
            assert t.mined[i] == (expected[0] == "mined"), (row, slot)
            if expected[0] == "random":
                assert not info.positive_fallback[i] and not info.pair_fallback[i]
                if class_size[anchor] >= 2:
                    assert a == anchor and not info.anchor_replaced[i]
                else:
                    assert info.anchor_replaced[i] and class_size[a] >= 2
                continue
            _, negative, positive = expected
            assert a == anchor and n == negative and not info.anchor_replaced[i], (row, slot)
            mined_negatives.append(n)
            if positive is not None:  # the closest valid positive farther than n
                assert p == positive and not info.positive_fallback[i], (row, slot)
                continue
            assert info.positive_fallback[i], (row, slot)
            outside = class_members - in_list
            if outside:  # uniform over the class outside S_i: never in the list
                assert p in outside and not info.pair_fallback[i], (row, slot)
                if full_sq is not None:  # outside the exact k-NN list: at least as far as n
                    assert full_sq[a, p] >= full_sq[a, n], (row, slot)
            elif len(class_members) >= 2:  # whole class listed: anything but anchor and p_nn
                assert p != nearest and not info.pair_fallback[i], (row, slot)
            else:  # the class is {anchor, p_nn}
                assert p == nearest and info.pair_fallback[i], (row, slot)
        assert len(set(mined_negatives)) == len(mined_negatives), row  # each negative once


# --------------------------------------------------------------------------- Algorithm 1


CONFIGS = [  # (total samples, k, triplets per anchor); few shapes, each compiled once
    (60, 1, 1),
    (60, 4, 2),
    (60, 9, 3),
]
KAPPAS = [1.0, 1.7, 4.0, 1e30]


@pytest.mark.parametrize("total,k,num_slots", CONFIGS)
def test_matches_reference_on_random_problems(total, k, num_slots):
    for seed in range(6):
        ids, sq_dists, labels, full_sq = make_problem(seed, total, k)
        kappa = KAPPAS[seed % len(KAPPAS)]
        key = jax.random.fold_in(KEY, seed)
        triplets, info = mining.mine_triplets(
            key, ids, sq_dists, labels, kappa, triplets_per_anchor=num_slots, chunk_size=8)
        check_against_reference(ids, sq_dists, labels, kappa, num_slots, triplets, info,
                                full_sq)


def test_matches_reference_with_k_equal_n_minus_1():
    """Every other sample listed: no out-of-list positive exists, so the fallback is 'any class
    member but the anchor and p_nn', or p_nn itself for a two-member class."""
    rng = np.random.default_rng(1)
    for seed in range(4):
        labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 3])[rng.permutation(10)]
        points = rng.integers(0, 3, size=(10, 2)).astype(np.float32)
        ids, sq_dists, full_sq = exact_lists(points, 9)
        for kappa in (1.0, 2.5):
            triplets, info = mining.mine_triplets(
                jax.random.fold_in(KEY, seed), ids, sq_dists, labels, kappa,
                triplets_per_anchor=2)
            check_against_reference(ids, sq_dists, labels, kappa, 2, triplets, info, full_sq)


def reference_ratios(ids, sq_dists, labels, anchors=None):
    """Per row, the largest κ at which the list still holds a valid negative: found by trying
    Algorithm 1's walk (``reference_walk``) at every candidate κ = d²(entry) / d²(p_nn)."""
    anchors = np.arange(len(labels)) if anchors is None else anchors
    ratios = []
    for row, anchor in enumerate(anchors):
        same = labels[ids[row]] == labels[anchor]
        if not same.any():
            ratios.append(0.0)
            continue
        nearest = int(np.argmax(same))
        if sq_dists[row, nearest] == 0:  # boundary 0 at every κ
            has_negative = (~same[nearest + 1:]).any()
            ratios.append(np.inf if has_negative else 0.0)
            continue
        candidates = sq_dists[row] / sq_dists[row, nearest]
        valid = [c for c in candidates if reference_walk(
            ids[row:row + 1], sq_dists[row:row + 1], labels, c, 1, [anchor])[0][1] > 0]
        ratios.append(max(valid, default=0.0))
    return np.asarray(ratios, np.float32)


@pytest.mark.parametrize("total,k,num_slots", CONFIGS)
def test_boundary_ratios_match_the_walk_at_every_kappa(total, k, num_slots):
    del num_slots
    for seed in range(4):
        ids, sq_dists, labels, _ = make_problem(seed, total, k)
        ratios = np.asarray(mining.boundary_ratios(ids, sq_dists, labels, chunk_size=8))
        np.testing.assert_allclose(ratios, reference_ratios(ids, sq_dists, labels), rtol=1e-6)
        # At κ = r the anchor still mines, just above r it does not.
        finite = np.isfinite(ratios) & (ratios > 0)
        for factor, mined in ((1.0, True), (1.0 + 1e-3, False)):
            for row in np.flatnonzero(finite)[:10]:
                _, one = mining.mine_triplets(KEY, ids[row:row + 1], sq_dists[row:row + 1],
                                              labels, ratios[row] * factor,
                                              anchor_ids=[row])
                assert (int(one.num_valid_negatives[0]) > 0) == mined, (seed, row, factor)


def test_boundary_ratios_edges_and_anchor_subsets():
    labels = np.array([0, 0, 1, 1, 2])
    ids = np.array([[1, 2, 3, 4], [0, 2, 4, 3], [4, 0, 1, 3], [2, 1, 0, 4], [0, 1, 2, 3]])
    sq = np.array([[0.0, 1, 2, 3], [2.0, 3, 4, 5], [1.0, 2, 3, 4], [1.0, 2, 3, 8],
                   [1.0, 2, 3, 4]], np.float32)
    ratios = np.asarray(mining.boundary_ratios(ids, sq, labels))
    # row 0: duplicate p_nn -> inf; row 1: p_nn first, farthest negative 5/2; row 2: p_nn is
    # the last entry -> 0; row 3: p_nn at 1.0, farthest negative 8; row 4: alone in its class.
    np.testing.assert_array_equal(ratios, [np.inf, 2.5, 0.0, 8.0, 0.0])
    subset = mining.boundary_ratios(ids[[3, 1]], sq[[3, 1]], labels, anchor_ids=[3, 1])
    np.testing.assert_array_equal(subset, [8.0, 2.5])
    jitted = jax.jit(lambda i, d: mining.boundary_ratios(i, d, jnp.asarray(labels)))(ids, sq)
    np.testing.assert_array_equal(jitted, ratios)
    assert mining.boundary_ratios(ids[:0], sq[:0], labels, anchor_ids=np.zeros(0, int)
                                  ).shape == (0,)
    with pytest.raises(ValueError, match="neighbour_sq_dists"):
        mining.boundary_ratios(ids, sq[:, ::-1], labels)
    with pytest.raises(ValueError, match="neighbour_ids"):
        mining.boundary_ratios(ids + 10, sq, labels)


def test_fallbacks_are_exercised_by_the_random_problems():
    """Guards the reference test: the random problems hit every branch of Algorithm 1."""
    counts = dict.fromkeys(["mined", "random_fallback", "positive_fallback", "pair_fallback",
                            "anchor_replaced", "anchors_without_positive"], 0)
    total, k, num_slots = CONFIGS[1]
    for seed in range(6):
        ids, sq_dists, labels, _ = make_problem(seed, total, k)
        triplets, info = mining.mine_triplets(
            KEY, ids, sq_dists, labels, KAPPAS[seed % len(KAPPAS)],
            triplets_per_anchor=num_slots, chunk_size=8)
        summary = mining.mining_summary(triplets, info)
        for name in counts:
            counts[name] += int(summary[name])
    assert all(value > 0 for value in counts.values()), counts


def test_nearest_positive_sets_the_boundary_and_is_never_a_positive():
    # Anchor 0 (class 0 = {0, 1, 2, 3}); list: p_nn 1 at 1.0, negative 4 at 1.5 (inside κ·1 =
    # 2), positive 2 at 2.0, negative 5 at 3.0, positive 3 at 4.0. Valid: 2, 5, 3.
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    ids = np.array([[1, 4, 2, 5, 3]])
    sq = np.array([[1.0, 1.5, 2.0, 3.0, 4.0]], np.float32)
    triplets, info = mining.mine_triplets(KEY, ids, sq, labels, 2.0, anchor_ids=[0],
                                          triplets_per_anchor=2)
    assert triplets.negative[0] == 5 and triplets.positive[0] == 3
    assert triplets.mined.tolist() == [True, False]
    assert info.nearest_positive.tolist() == [1] and info.num_valid_negatives.tolist() == [1]
    # κ = 1: the boundary is p_nn's own distance, so negative 4 becomes the first valid one.
    triplets, _ = mining.mine_triplets(KEY, ids, sq, labels, 1.0, anchor_ids=[0],
                                       triplets_per_anchor=2)
    assert triplets.negative.tolist() == [4, 5] and triplets.positive.tolist() == [2, 3]


def test_ties_are_not_farther():
    # The positive at the negative's distance is not "farther"; the next one is taken.
    labels = np.array([0, 0, 0, 0, 1, 1])
    ids = np.array([[1, 4, 2, 3]])
    sq = np.array([[1.0, 2.0, 2.0, 3.0]], np.float32)
    triplets, info = mining.mine_triplets(KEY, ids, sq, labels, 1.0, anchor_ids=[0])
    assert triplets.negative.tolist() == [4] and triplets.positive.tolist() == [3]
    # Boundary ties are valid: an entry at exactly κ·d(p_nn) is not skipped.
    triplets, _ = mining.mine_triplets(KEY, ids, sq, labels, 2.0, anchor_ids=[0])
    assert triplets.negative.tolist() == [4] and triplets.mined.tolist() == [True]


# --------------------------------------------------------------------------- edge cases


def edge_problem():
    """Ten samples, k = 4, hand-made lists (distances ascending; ids distinct, not the anchor).

    class 0 = {0, 1, 2}, class 1 = {3, 4, 5, 6}, class 2 = {7, 8}, class 3 = {9} (one sample).
    """
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 3]) * 5 - 7  # arbitrary integers
    ids = np.array([
        [3, 4, 5, 6],  # 0: no positive in its list
        [0, 2, 3, 4],  # 1: only positives first, then negatives: whole class listed
        [0, 1, 3, 4],  # 2: whole class listed
        [4, 5, 6, 0],  # 3: whole class listed, then one negative
        [0, 3, 1, 2],  # 4
        [6, 3, 4, 0],  # 5: no negatives after the boundary (κ huge below)
        [5, 7, 8, 9],  # 6: out-of-list positives {3, 4}
        [8, 0, 1, 2],  # 7: class {7, 8}: pair fallback
        [0, 7, 1, 2],  # 8: negative before p_nn is skipped
        [0, 1, 2, 3],  # 9: alone in its class
    ])
    sq = np.tile(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32), (10, 1))
    return ids, sq, labels


@pytest.mark.parametrize("kappa", [1.0, 2.5, 1e30, 0.0])
def test_edge_cases_match_reference(kappa):
    ids, sq, labels = edge_problem()
    for seed in range(3):
        triplets, info = mining.mine_triplets(jax.random.fold_in(KEY, seed), ids, sq, labels,
                                              kappa, triplets_per_anchor=2)
        check_against_reference(ids, sq, labels, kappa, 2, triplets, info)


def test_edge_cases_named():
    ids, sq, labels = edge_problem()
    triplets, info = mining.mine_triplets(KEY, ids, sq, labels, 1.0, triplets_per_anchor=2)
    t = jax.tree.map(np.asarray, triplets)
    slots = lambda x: x.reshape(10, 2)
    # Anchor 0: no positive in its list, so no valid negative: random triplets keeping it.
    assert info.nearest_positive[0] == -1 and not slots(t.mined)[0].any()
    assert (slots(t.anchor)[0] == 0).all()
    # Anchor 9: alone in its class: random anchors from classes with two or more members.
    assert slots(info.anchor_replaced)[9].all() and (labels[slots(t.anchor)[9]] != labels[9]).all()
    # Anchor 7: class {7, 8}; 8 is p_nn and the only possible positive.
    assert slots(t.mined)[7].all() and (slots(t.positive)[7] == 8).all()
    assert slots(info.pair_fallback)[7].all()
    # Anchor 6: negatives 7, 8; out-of-list positives {3, 4} (5 is p_nn, in the list).
    assert slots(t.negative)[6].tolist() == [7, 8]
    assert set(slots(t.positive)[6].tolist()) <= {3, 4}
    # Anchor 8: 0 comes before p_nn (7) and is skipped; negatives 1 and 2.
    assert slots(t.negative)[8].tolist() == [1, 2]
    # No valid negative with a huge κ, except where p_nn is at distance 0 (boundary 0).
    sq_dup = sq.copy()
    sq_dup[5] = [0.0, 0.0, 0.0, 0.0]
    triplets, info = mining.mine_triplets(KEY, ids, sq_dup, labels, 1e30, triplets_per_anchor=2)
    triplets = jax.tree.map(lambda x: np.asarray(x)[::2], triplets)  # slot 0 of each anchor
    assert not np.asarray(triplets.mined)[[0, 1, 2, 3, 4, 6, 7, 8, 9]].any()
    # Anchor 5: p_nn 6 at distance 0 makes the boundary 0: 3, 4 and negative 0 stay valid;
    # no positive is strictly farther than 0 and the whole class is listed: 3 or 4.
    assert triplets.mined[5] and triplets.negative[5] == 0 and info.num_valid_negatives[5] == 1
    assert int(triplets.positive[5]) in (3, 4) and info.positive_fallback[2 * 5]


def test_out_of_list_fallback_is_uniform():
    # Classes {0..5}, {6..9}, {10..13}, {14, 15}. Anchor 0: p_nn 1, then 2 (a valid positive but
    # nearer than the negatives), negatives 6, 7: both slots draw uniformly from {3, 4, 5}.
    # Anchor 10 lists its whole class (p_nn 11, then 12, 13, negative 14): uniform over
    # the class minus the anchor and p_nn, {12, 13}.
    labels = np.array([0] * 6 + [1] * 4 + [2] * 4 + [3] * 2)
    ids = np.array([[1, 2, 6, 7], [11, 12, 13, 14]])
    sq = np.array([[1.0, 1.5, 2.0, 3.0], [1.0, 1.1, 1.2, 2.0]], np.float32)
    keys = jax.random.split(KEY, 3000)
    draw = np.asarray(jax.vmap(lambda key: mining.sample_triplets(
        key, ids, sq, labels, 1.0, anchor_ids=[0, 10], triplets_per_anchor=2).positive)(keys))
    for column, allowed in ((0, [3, 4, 5]), (1, [3, 4, 5]), (2, [12, 13])):
        values, counts = np.unique(draw[:, column], return_counts=True)
        assert values.tolist() == allowed
        assert stats.chisquare(counts).pvalue > 1e-4
    assert np.mean(draw[:, 0] == draw[:, 1]) < 0.45  # the slots draw independently (1/3)


def test_bijection_behind_the_out_of_list_draw():
    """_nth_not_excluded maps [0, L) one-to-one onto the ranks outside E, for random and
    contiguous (worst-case) excluded sets, with ignored list entries holding any rank."""
    rng = np.random.default_rng(0)
    k, num_rows = 40, 300
    cases, draws, allowed_counts, anchor_ranks, list_ranks, list_excluded = [], [], [], [], [], []
    for _ in range(num_rows):
        size = int(rng.integers(2, 100))
        num_excluded = int(rng.integers(1, min(size - 1, k + 1) + 1))
        shape = rng.integers(3)
        excluded = (rng.choice(size, num_excluded, replace=False) if shape == 0 else
                    np.arange(num_excluded) if shape == 1 else
                    np.arange(size - num_excluded, size))
        ranks = rng.integers(0, size, k)
        flags = np.zeros(k, bool)
        where = rng.choice(k, num_excluded - 1, replace=False)
        ranks[where], flags[where] = excluded[1:], True
        allowed = size - num_excluded
        cases.append(np.setdiff1d(np.arange(size), excluded))
        draws.append(np.minimum(np.arange(100), allowed - 1))
        allowed_counts.append(allowed)
        anchor_ranks.append(excluded[0])
        list_ranks.append(ranks)
        list_excluded.append(flags)
    out = np.asarray(mining._nth_not_excluded(
        jnp.asarray(np.array(draws), jnp.int32), jnp.asarray(allowed_counts, jnp.int32),
        jnp.asarray(anchor_ranks, jnp.int32), jnp.asarray(np.array(list_ranks), jnp.int32),
        jnp.asarray(np.array(list_excluded))))
    for row, allowed in enumerate(cases):
        np.testing.assert_array_equal(np.sort(out[row, :len(allowed)]), allowed)


def test_uniform_below_is_the_multiply_high_of_the_64_bit_draw():
    """floor(X · bound / 2**64) for the 64-bit draw X = hi·2**32 + lo, checked in Python ints:
    each value of [0, bound) then has probability 1/bound within bound / 2**64."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(3000, 2), dtype=np.uint64)
    words[:3] = [[2**32 - 1, 2**32 - 1], [0, 0], [2**31, 7]]
    bounds = np.concatenate([[1, 2**31 - 1, 3], rng.integers(1, 2**31 - 1, 2997)])
    got = np.asarray(mining._uniform_below(jnp.asarray(words.astype(np.uint32)),
                                           jnp.asarray(bounds.astype(np.int32))))
    expected = [((int(hi) << 32 | int(lo)) * int(bound)) >> 64
                for (hi, lo), bound in zip(words, bounds, strict=True)]
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- properties


def test_anchor_subset_equals_rows_of_the_full_run():
    ids, sq_dists, labels, _ = make_problem(3, *CONFIGS[1][:2])
    full, full_info = mining.mine_triplets(KEY, ids, sq_dists, labels, 1.7,
                                           triplets_per_anchor=2, chunk_size=8)
    subset = np.array([5, 0, 17, 42, 59, 3, 3, 30])
    part, part_info = mining.mine_triplets(KEY, ids[subset], sq_dists[subset], labels, 1.7,
                                           triplets_per_anchor=2, anchor_ids=subset)
    slots = (subset[:, None] * 2 + np.arange(2)).reshape(-1)
    for name in mining.Triplets._fields:
        np.testing.assert_array_equal(getattr(part, name), np.asarray(getattr(full, name))[slots])
    for name in ("positive_fallback", "pair_fallback", "anchor_replaced"):
        np.testing.assert_array_equal(getattr(part_info, name),
                                      np.asarray(getattr(full_info, name))[slots])
    np.testing.assert_array_equal(part_info.nearest_positive,
                                  np.asarray(full_info.nearest_positive)[subset])


def test_no_anchors_gives_empty_results():
    ids, sq, labels = edge_problem()
    triplets, info = mining.mine_triplets(KEY, ids[:0], sq[:0], labels, 1.0,
                                          anchor_ids=np.zeros(0, np.int32), triplets_per_anchor=2)
    assert all(x.shape == (0,) for x in (*triplets, *info))


def test_jit_with_traced_inputs_equals_eager_and_chunking_does_not_matter():
    ids, sq_dists, labels, _ = make_problem(4, *CONFIGS[1][:2])
    eager = mining.mine_triplets(KEY, ids, sq_dists, labels, 1.7, triplets_per_anchor=2,
                                 chunk_size=8)
    # Traced labels, lists and κ; one chunk of 60 rows instead of 8.
    jitted = jax.jit(lambda key, i, s, lab, kappa: mining.mine_triplets(
        key, i, s, lab, kappa, triplets_per_anchor=2))(KEY, ids, sq_dists, labels, 1.7)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_deterministic_for_a_key_and_random_parts_change_with_it():
    ids, sq_dists, labels, _ = make_problem(5, *CONFIGS[1][:2])
    run = lambda key: mining.sample_triplets(key, ids, sq_dists, labels, 1.0,
                                             triplets_per_anchor=2, chunk_size=8)
    first, again, other = run(KEY), run(KEY), run(jax.random.key(1))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    mined = np.asarray(first.mined)
    np.testing.assert_array_equal(np.asarray(first.negative)[mined],
                                  np.asarray(other.negative)[mined])
    assert (np.asarray(first.negative)[~mined] != np.asarray(other.negative)[~mined]).any()


def test_labels_are_arbitrary_integers():
    ids, sq_dists, labels, _ = make_problem(6, *CONFIGS[1][:2])
    run = lambda labels: mining.sample_triplets(KEY, ids, sq_dists, labels, 1.7,
                                                triplets_per_anchor=2, chunk_size=8)
    base = run(labels)
    for mapped in (labels * 1000 - 5, labels.astype(np.int64) * 10**12 - 3,
                   labels.astype(np.float64)):
        other = run(mapped)
        for a, b in zip(base, other, strict=True):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- random triplets


def test_random_triplets_valid_and_uniform():
    # Classes of sizes 1, 2, 3, 4 (label 9 alone: never an anchor, sometimes a negative).
    labels = np.array([9, 4, 4, 7, 7, 7, 2, 2, 2, 2])
    num = 20_000
    t = jax.tree.map(np.asarray, mining.random_triplets(KEY, labels, num))
    assert t.anchor.shape == (num,) and t.anchor.dtype == np.int32 and not t.mined.any()
    assert (labels[t.positive] == labels[t.anchor]).all() and (t.positive != t.anchor).all()
    assert (labels[t.negative] != labels[t.anchor]).all()
    anchors = np.bincount(t.anchor, minlength=10)
    assert anchors[0] == 0 and stats.chisquare(anchors[1:]).pvalue > 1e-4
    for anchor in (3, 6):  # positives uniform over the class minus the anchor
        positives = np.unique(t.positive[t.anchor == anchor], return_counts=True)[1]
        assert stats.chisquare(positives).pvalue > 1e-4
    negatives = np.bincount(t.negative[labels[t.anchor] == 2], minlength=10)
    assert (negatives[6:] == 0).all() and stats.chisquare(negatives[:6]).pvalue > 1e-4
    again = mining.random_triplets(KEY, labels, num)
    np.testing.assert_array_equal(again.negative, t.negative)


# --------------------------------------------------------------------------- epoch assembly


def mined_pool(num, num_mined, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), 5)
    mined = np.zeros(num, bool)
    mined[rng.choice(num, num_mined, replace=False)] = True
    anchor = rng.integers(0, 50, num).astype(np.int32)
    positive = (anchor // 5 * 5 + (anchor % 5 + 1) % 5).astype(np.int32)
    negative = ((anchor + 5) % 50).astype(np.int32)
    return mining.Triplets(anchor, positive, negative, mined), labels


@pytest.mark.parametrize("fraction,num_mined,expected", [
    (0.5, 150, 100), (0.5, 40, 40), (0.0, 150, 0), (1.0, 200, 200), (0.3, 150, 60)])
def test_epoch_triplets_fractions(fraction, num_mined, expected):
    pool, labels = mined_pool(200, num_mined)
    out, stats_ = mining.epoch_triplets(KEY, pool, labels, mined_fraction=fraction)
    out = jax.tree.map(np.asarray, out)
    assert out.anchor.shape == (200,)
    assert int(stats_.num_mined) == expected == out.mined.sum()
    assert float(stats_.mined_fraction) == pytest.approx(expected / 200)
    # The mined share is distinct mined triplets of the pool; the rest valid random ones.
    pool_mined = Counter((a, p, n) for a, p, n, m in zip(*pool, strict=True) if m)
    picked = Counter((a, p, n) for a, p, n, m in zip(*out, strict=True) if m)
    assert not picked - pool_mined
    assert (labels[out.positive] == labels[out.anchor]).all()
    assert (out.positive != out.anchor).all() and (labels[out.negative] != labels[out.anchor]).all()
    if 0 < expected < 200:  # shuffled, not mined-first
        assert not out.mined[:expected].all()


def test_epoch_triplets_total_and_errors():
    pool, labels = mined_pool(50, 50)
    out, stats_ = mining.epoch_triplets(KEY, pool, labels, mined_fraction=0.5, num_triplets=120)
    assert out.anchor.shape == (120,) and int(stats_.num_mined) == 50
    empty = mining.Triplets(*(np.zeros(0, np.int32),) * 3, np.zeros(0, bool))
    out, stats_ = mining.epoch_triplets(KEY, empty, labels, mined_fraction=0.5, num_triplets=120)
    assert out.anchor.shape == (120,) and int(stats_.num_mined) == 0 and not out.mined.any()
    assert (labels[out.negative] != labels[out.anchor]).all()
    with pytest.raises(ValueError, match="mined_fraction"):
        mining.epoch_triplets(KEY, pool, labels, mined_fraction=1.5)
    with pytest.raises(ValueError, match="num_triplets"):
        mining.epoch_triplets(KEY, pool, labels, mined_fraction=0.5, num_triplets=-1)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    ids, sq, labels = edge_problem()
    cases = [
        (dict(labels=np.zeros(10)), "labels"),  # one class
        (dict(labels=np.arange(10)), "labels"),  # no class with two members
        (dict(labels=np.zeros((10, 1))), "labels"),
        (dict(labels=np.arange(10) / 3), "labels"),
        (dict(neighbour_ids=ids + 10), "neighbour_ids"),
        (dict(neighbour_ids=ids - 1), "neighbour_ids"),
        (dict(neighbour_ids=ids[:, :, None]), "neighbour_ids"),
        (dict(neighbour_ids=ids.astype(np.float32)), "neighbour_ids"),
        (dict(neighbour_ids=np.roll(ids, 1, axis=0)), "neighbour_ids"),  # lists its anchor
        (dict(neighbour_ids=ids[:5], neighbour_sq_dists=sq[:5]), "neighbour_ids"),
        (dict(neighbour_sq_dists=sq[:, :3]), "neighbour_sq_dists"),
        (dict(neighbour_sq_dists=sq[:, ::-1]), "neighbour_sq_dists"),
        (dict(neighbour_sq_dists=np.where(sq > 3, np.nan, sq)), "neighbour_sq_dists"),
        (dict(neighbour_sq_dists=np.where(sq > 3, np.inf, sq)), "neighbour_sq_dists"),
        (dict(kappa=-1.0), "kappa"),
        (dict(kappa=np.nan), "kappa"),
        (dict(kappa=np.ones(2)), "kappa"),
        (dict(triplets_per_anchor=0), "triplets_per_anchor"),
        (dict(anchor_ids=np.arange(3)), "anchor_ids"),
        (dict(anchor_ids=np.arange(10) + 1), "anchor_ids"),
    ]
    for override, name in cases:
        kwargs = dict(neighbour_ids=ids, neighbour_sq_dists=sq, labels=labels, kappa=1.0)
        kwargs.update(override)
        with pytest.raises(ValueError, match=name):
            mining.sample_triplets(KEY, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        mining.random_triplets(KEY, np.zeros(5), 3)
    with pytest.raises(ValueError, match="num_triplets"):
        mining.random_triplets(KEY, labels, 2.5)
