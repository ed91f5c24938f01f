"""smine_jax.mining.index_batches: invariants of the batches, the smart pairs against a
plain-Python walk of Algorithm 1 (slot 0), fallbacks, uniformity of the random parts.

Few static shapes (each a jit compilation of a few seconds on a loaded CPU): most problems have
N = 80 samples, k = 8 neighbours, C = 4 classes of m = 3 samples per batch.
"""

from __future__ import annotations

import itertools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from smine_jax import mining

KEY = jax.random.key(0)
N, K, C, M, B = 80, 8, 4, 3, 16  # the common shape


# --------------------------------------------------------------------------- problem makers


def make_problem(seed, n=N, k=K, grid=True, max_size=7):
    """Random labels (class sizes 1..max_size, singletons included) and exact k-NN lists of
    random points: a small integer grid (exact float32 distances, ties, duplicates) or normal
    floats (no duplicates)."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, max_size + 1)))
    sizes[-1] -= sum(sizes) - n
    labels = rng.permutation(np.repeat(np.arange(len(sizes)) * 3 + 7, sizes))  # arbitrary ints
    if grid:
        points = rng.integers(0, 4, size=(n, 2)).astype(np.float32)
    else:
        points = rng.normal(size=(n, 2)).astype(np.float32)
    diff = points[:, None, :] - points[None, :, :]
    sq = np.sum(diff * diff, axis=-1).astype(np.float32)
    np.fill_diagonal(sq, np.inf)
    ids = np.argsort(sq, axis=1, kind="stable")[:, :k].astype(np.int32)
    return ids, np.take_along_axis(sq, ids, axis=1), labels


def reference_smart_negatives(ids, sq_dists, labels, kappa, anchors=None):
    """{anchor: smart negative} for the usable seeds: Algorithm 1's first valid negative (after
    the nearest positive p_nn, squared distance >= κ·d²(p_nn)) whose class has >= 2 members."""
    anchors = np.arange(len(labels)) if anchors is None else anchors
    sizes = Counter(labels.tolist())
    kappa = np.float32(kappa)
    seeds = {}
    for row, anchor in enumerate(anchors):
        boundary = None
        for j, neighbour in enumerate(ids[row]):
            same = labels[neighbour] == labels[anchor]
            if boundary is None:
                if same:
                    boundary = kappa * np.float32(sq_dists[row, j])
                continue
            if sq_dists[row, j] >= boundary and not same:
                if sizes[labels[neighbour]] >= 2:
                    seeds[int(anchor)] = int(neighbour)
                break
    return seeds


def run(key=KEY, problem=None, kappa=1.0, **kwargs):
    ids, sq, labels = make_problem(0) if problem is None else problem
    settings_ = dict(classes_per_batch=C, samples_per_class=M, num_batches=B)
    settings_.update(kwargs)
    out = mining.index_batches(key, ids, sq, labels, kappa, **settings_)
    return jax.tree.map(np.asarray, out)


def check_batches(ids, mask, info, labels, classes, members, num_smart, seeds):
    """The invariants every batch satisfies; ``seeds`` is the reference {anchor: negative}."""
    num_batches = ids.shape[0]
    assert ids.shape == mask.shape == (num_batches, classes * members)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ((ids >= 0) & (ids < len(labels))).all()
    sizes = Counter(labels.tolist())
    blocks, block_mask = ids.reshape(num_batches, classes, members), mask.reshape(
        num_batches, classes, members)
    block_labels = labels[blocks]
    # One class per block (masked slots repeat a member of it), C distinct classes per batch.
    assert (block_labels == block_labels[:, :, :1]).all()
    for b in range(num_batches):
        assert len(set(block_labels[b, :, 0].tolist())) == classes, b
        real = ids[b][mask[b]]
        assert len(set(real.tolist())) == len(real), b  # each image at most once
        counted = 0
        for a in set(real.tolist()) & seeds.keys():
            counted += seeds[a] in set(real.tolist())
        assert info.smart_pairs[b] <= min(num_smart, counted), b
    # Every class has min(m, size) >= 2 real members, masked slots at the end of its block.
    class_sizes = np.vectorize(sizes.get)(block_labels[:, :, 0])
    assert (class_sizes >= 2).all()
    expected = np.arange(members) < np.minimum(class_sizes, members)[..., None]
    np.testing.assert_array_equal(block_mask, expected)
    assert info.seeds_available == len(seeds) or len(seeds) == 0
    assert ((info.random_classes >= classes - 2 * num_smart)
            & (info.random_classes <= classes)).all()
    assert ((info.smart_pairs >= 0) & (info.smart_pairs <= num_smart)).all()
    if seeds and num_smart:
        # The first smart slot always survives: its seed opens block 0, its negative block 1.
        first = ids[:, 0]
        assert all(int(a) in seeds for a in first)
        np.testing.assert_array_equal(ids[:, members], [seeds[int(a)] for a in first])
        assert (info.smart_pairs >= 1).all()
    else:
        assert (info.smart_pairs == 0).all() and (info.random_classes == classes).all()


# --------------------------------------------------------------------------- invariants


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), kappa=st.sampled_from([1.0, 1.3, 2.0, 4.0, 1e30]),
       grid=st.booleans())
def test_invariants_on_random_problems(seed, kappa, grid):
    problem = make_problem(seed, grid=grid)
    ids, mask, info = run(jax.random.key(seed), problem, kappa)
    seeds = reference_smart_negatives(*problem, kappa)
    assert int(info.seeds_available) == len(seeds)
    check_batches(ids, mask, info, problem[2], C, M, C // 2, seeds)


def test_smart_pairs_are_real_pairs_and_seeds_cycle_without_replacement():
    """One smart slot (C = 3): block 0 opens with the seed, block 1 with its smart negative,
    and the seeds of consecutive batches run through the usable ones without repeats, then
    cycle in the same order."""
    problem = make_problem(3)
    seeds = reference_smart_negatives(*problem, 1.0)
    num_batches = len(seeds) + 5
    ids, mask, info = run(problem=problem, classes_per_batch=3, samples_per_class=2,
                          num_batches=num_batches)
    check_batches(ids, mask, info, problem[2], 3, 2, 1, seeds)
    labels = problem[2]
    first = ids[:, 0]
    assert sorted(first[:len(seeds)].tolist()) == sorted(seeds)  # each usable seed once
    np.testing.assert_array_equal(first[len(seeds):], first[:5])  # then the same order again
    for b, seed in enumerate(first):
        assert labels[ids[b, 2]] != labels[seed]
    assert (info.smart_pairs == 1).all() and (info.random_classes == 1).all()


def test_no_valid_negative_falls_back_to_random():
    problem = make_problem(5, grid=False)  # no duplicate points: d²(p_nn) > 0
    ids, mask, info = run(problem=problem, kappa=1e30)
    assert int(info.seeds_available) == 0
    assert (info.smart_pairs == 0).all() and (info.random_classes == C).all()
    check_batches(ids, mask, info, problem[2], C, M, C // 2, {})


def test_smart_fraction_zero_is_all_random():
    problem = make_problem(6)
    ids, mask, info = run(problem=problem, smart_fraction=0.0)
    assert int(info.seeds_available) > 0
    assert (info.smart_pairs == 0).all() and (info.random_classes == C).all()
    check_batches(ids, mask, info, problem[2], C, M, 0, {})


def test_singletons_never_drawn_and_small_classes_masked():
    """Classes of sizes 1 (many) and 2 (smaller than m = 3): singletons never appear, pairs
    give both members and one masked slot."""
    problem = make_problem(7, max_size=2)
    labels = problem[2]
    assert (np.bincount(labels) == 1).any() and (np.bincount(labels) == 2).any()
    ids, mask, info = run(problem=problem)
    seeds = reference_smart_negatives(*problem, 1.0)
    check_batches(ids, mask, info, labels, C, M, C // 2, seeds)
    assert (~mask).any()
    assert (np.bincount(labels)[labels[ids]] >= 2).all()


def test_repeated_classes_and_seeds_keep_classes_distinct():
    """Exactly C eligible classes: the seed pairs' classes collide often. One anchor row: both
    smart slots take the same seed, counted once."""
    rng = np.random.default_rng(8)
    labels = rng.permutation(np.repeat([0, 1, 2, 3, 4, 5, 6], [30, 20, 15, 10, 1, 1, 3]))
    points = rng.normal(size=(N, 2)).astype(np.float32)
    sq = np.sum((points[:, None] - points[None]) ** 2, axis=-1)
    np.fill_diagonal(sq, np.inf)
    ids = np.argsort(sq, axis=1)[:, :K].astype(np.int32)
    sq = np.take_along_axis(sq, ids, axis=1)
    problem = (ids, sq, labels)
    seeds = reference_smart_negatives(*problem, 1.0)
    out_ids, mask, info = run(problem=problem, classes_per_batch=5)
    check_batches(out_ids, mask, info, labels, 5, M, 2, seeds)
    assert (info.random_classes > 1).any()  # a seed pair repeated a class

    anchor = next(iter(seeds))
    out_ids, mask, info = run(problem=(ids[[anchor]], sq[[anchor]], labels),
                              anchor_ids=[anchor], classes_per_batch=5)
    assert int(info.seeds_available) == 1
    check_batches(out_ids, mask, info, labels, 5, M, 2, {anchor: seeds[anchor]})
    assert (info.smart_pairs == 1).all() and (info.random_classes == 3).all()


# --------------------------------------------------------------------------- uniformity


def test_distinct_draws_are_uniform_ordered_samples():
    """All 5·4·3 ordered samples of 3 out of 5 equally likely; with draw 0 forced, all 4·3
    orders of the rest."""
    draws = 6000
    words = mining._random_words(KEY, (draws, 3))
    bound = jnp.full((draws,), 5, jnp.int32)
    free = np.asarray(mining._distinct_draws(words, bound))
    forced = np.asarray(mining._distinct_draws(words, bound, first=jnp.full((draws,), 2)))
    for sample, outcomes in ((free, list(itertools.permutations(range(5), 3))),
                             (forced, [(2, *p) for p in itertools.permutations([0, 1, 3, 4], 2)])):
        counts = Counter(map(tuple, sample.tolist()))
        assert set(counts) == set(outcomes)
        assert stats.chisquare([counts[o] for o in outcomes]).pvalue > 1e-4


def test_random_classes_and_members_are_uniform():
    problem = make_problem(9, max_size=9)
    labels = problem[2]
    num_batches = 1500
    ids, mask, info = run(problem=problem, smart_fraction=0.0, num_batches=num_batches)
    sizes = Counter(labels.tolist())
    eligible = sorted(c for c, s in sizes.items() if s >= 2)
    block_classes = labels[ids.reshape(num_batches, C, M)[:, :, 0]]
    # Every eligible class equally often, in every block position.
    for counts in (Counter(block_classes.reshape(-1).tolist()),
                   Counter(block_classes[:, 0].tolist())):
        assert set(counts) == set(eligible)
        assert stats.chisquare([counts[c] for c in eligible]).pvalue > 1e-4
    # Members of a large class: each equally often.
    large = max(eligible, key=sizes.get)
    assert sizes[large] > M
    real = ids[mask]
    counts = Counter(real[labels[real] == large].tolist())
    members = np.flatnonzero(labels == large)
    assert set(counts) == set(members.tolist())
    assert stats.chisquare([counts[i] for i in members]).pvalue > 1e-4


# --------------------------------------------------------------------------- determinism, jit


def test_deterministic_for_a_key_and_changes_with_it():
    first, again, other = run(), run(), run(jax.random.key(1))
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[0], other[0])


def test_jit_with_traced_kappa_equals_eager():
    ids, sq, labels = make_problem(0)
    jitted = jax.jit(lambda kappa: mining.index_batches(
        KEY, ids, sq, labels, kappa, classes_per_batch=C, samples_per_class=M,
        num_batches=B))
    for kappa in (1.0, 2.0):
        for x, y in zip(jax.tree.leaves(jitted(jnp.float32(kappa))),
                        jax.tree.leaves(run(kappa=kappa)), strict=True):
            np.testing.assert_array_equal(x, y)


def test_anchor_subset_seeds_from_its_rows():
    ids, sq, labels = make_problem(10)
    anchors = np.arange(1, N, 3)
    seeds = reference_smart_negatives(ids[anchors], sq[anchors], labels, 1.0, anchors)
    out_ids, mask, info = run(problem=(ids[anchors], sq[anchors], labels), anchor_ids=anchors)
    assert int(info.seeds_available) == len(seeds) > 0
    check_batches(out_ids, mask, info, labels, C, M, C // 2, seeds)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    ids, sq, labels = make_problem(0)
    num_eligible = sum(s >= 2 for s in Counter(labels.tolist()).values())
    cases = [
        (dict(classes_per_batch=1), "classes_per_batch"),
        (dict(classes_per_batch=2.5), "classes_per_batch"),
        (dict(classes_per_batch=True), "classes_per_batch"),
        (dict(classes_per_batch=num_eligible + 1), "classes_per_batch"),  # too few
        (dict(samples_per_class=1), "samples_per_class"),
        (dict(num_batches=0), "num_batches"),
        (dict(smart_fraction=-0.1), "smart_fraction"),
        (dict(smart_fraction=1.5), "smart_fraction"),
        (dict(smart_fraction=np.ones(2)), "smart_fraction"),
        (dict(kappa=-1.0), "kappa"),
        (dict(neighbour_ids=ids + N), "neighbour_ids"),
        (dict(neighbour_sq_dists=sq[:, ::-1]), "neighbour_sq_dists"),
        (dict(anchor_ids=np.arange(3)), "anchor_ids"),
        (dict(labels=np.arange(N)), "labels"),
    ]
    for override, name in cases:
        kwargs = dict(neighbour_ids=ids, neighbour_sq_dists=sq, labels=labels, kappa=1.0,
                      classes_per_batch=C, samples_per_class=M, num_batches=B)
        kwargs.update(override)
        with pytest.raises(ValueError, match=name):
            mining.index_batches(KEY, **kwargs)
