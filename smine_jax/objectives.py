"""The training objective of every variant: which miner picks the triplets, which loss scores them.

One contract, pytorch-metric-learning's split: a miner returns indices, a loss takes embeddings
and indices.

- In-batch miners (``IN_BATCH_MINERS``): ``miner(key, embeddings [B, D], labels [B], mask [B],
  kappa) -> batch_miners.BatchTriplets``, indices into the batch plus ``valid``. Every one of
  them is scored by the same loss, ``losses.indexed_triplet_objective`` with ``config.loss``
  (the ratio or FaceNet margin triplet loss, with or without the global loss). A new in-batch
  miner is one entry ``name -> factory(config) -> miner``.
- Pair losses (``PAIR_LOSSES``, lifted and N-pair): ``loss(embeddings, labels, mask)``, no
  miner; their logged training error is that of the batch-hard triplets.
- Smart Mining (``mining.kind = "smart"``) mines over the whole training set
  (``mining.sample_triplets`` returns ``mining.Triplets``: ids into the training set, with the
  ``mined`` flag), so its batches arrive as (a, p, n) rows: rows 3i, 3i + 1, 3i + 2 are
  triplet i, scored by ``losses.triplet_objective`` (which also counts the mined triplets).

``kappa`` is the epoch's κ: with ``mining.inbatch_kappa`` the in-batch miners skip negatives
inside Smart Mining's boundary κ · d²(a, nearest positive in the batch) (method.md §6).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from smine_jax import batch_miners, losses

Miner = Callable[..., batch_miners.BatchTriplets]


def loss_settings(config) -> dict:
    """The triplet loss's keyword arguments from ``config.loss``."""
    return dict(margin=float(config.loss.margin), global_margin=float(config.loss.global_margin),
                global_weight=float(config.loss.global_weight),
                use_global=bool(config.loss.use_global),
                triplet_loss=str(config.loss.triplet_loss))


def _semihard(config) -> Miner:
    margin, fallback = float(config.loss.margin), str(config.mining.semihard_fallback)
    return lambda key, embeddings, labels, mask, kappa: batch_miners.semihard_triplets(
        embeddings, labels, margin=margin, mask=mask, fallback=fallback, kappa=kappa)


def _batch_hard(config) -> Miner:
    return lambda key, embeddings, labels, mask, kappa: batch_miners.batch_hard_triplets(
        embeddings, labels, mask=mask, kappa=kappa)


def _distance_weighted(config) -> Miner:
    cutoff = float(config.mining.distance_cutoff)
    nonzero_loss_cutoff = float(config.mining.nonzero_loss_cutoff)
    return lambda key, embeddings, labels, mask, kappa: batch_miners.distance_weighted_triplets(
        key, embeddings, labels, cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff,
        mask=mask, kappa=kappa)


def _all(config) -> Miner:
    # m-per-class batches: m - 1 positives per anchor.
    positives = int(config.train.samples_per_class) - 1
    return lambda key, embeddings, labels, mask, kappa: batch_miners.all_triplets(
        embeddings, labels, mask=mask, kappa=kappa, positives_per_anchor=positives)


IN_BATCH_MINERS: dict[str, Callable[..., Miner]] = {
    "semihard": _semihard, "batch_hard": _batch_hard, "distance_weighted": _distance_weighted,
    "all": _all,
}


def _lifted(config):
    margin = float(config.loss.lifted_margin)
    return lambda embeddings, labels, mask: losses.lifted_structure_loss(
        embeddings, labels, margin=margin, mask=mask)


def _npairs(config):
    l2_reg = float(config.loss.npairs_l2_reg)

    def loss(embeddings, labels, mask):
        pairs = embeddings.reshape(-1, 2, embeddings.shape[-1])  # rows (2i, 2i + 1): a pair
        return losses.npairs_loss(pairs[:, 0], pairs[:, 1], l2_reg=l2_reg, labels=labels[::2],
                                  mask=mask[::2])

    return loss


PAIR_LOSSES: dict[str, Callable] = {"lifted": _lifted, "npairs": _npairs}


def make_objective(config) -> Callable:
    """objective(key, embeddings f32[R, D], labels i32[B], mask bool[B], mined bool[B],
    kappa f32[] = 0) -> (loss, aux).

    Triplet batches (``mining.kind`` "smart"): R = 3B rows (a_i, p_i, n_i), the ratio triplet +
    global loss of method.md §1. Image batches (every other kind): R = B images, m per class;
    ``mining.kind`` names the in-batch miner (``IN_BATCH_MINERS``: "semihard", "batch_hard",
    "distance_weighted", "all") scored with ``config.loss`` (the baselines' variants set the
    FaceNet margin loss, so that only the miner differs), or "none" with a pair loss
    (``config.loss.kind`` "lifted" | "npairs"). ``aux["training_error"]`` is the fraction of
    valid triplets with J_t > 0; triplet batches also count the mined triplets (``mined``) and
    those of them with J_t > 0 (``aux["num_mined"]``, ``aux["mined_violations"]``).
    """
    kind, loss_kind = str(config.mining.kind), str(config.loss.kind)
    settings = loss_settings(config)
    use_kappa = bool(config.mining.inbatch_kappa)
    miner = IN_BATCH_MINERS[kind](config) if kind in IN_BATCH_MINERS else None
    pair_loss = PAIR_LOSSES[loss_kind](config) if miner is None and kind != "smart" else None
    error_miner = _batch_hard(config)

    def objective(key, embeddings, labels, mask, mined, kappa=0.0):
        if kind == "smart":
            rows = embeddings.reshape(-1, 3, embeddings.shape[-1])
            return losses.triplet_objective(rows[:, 0], rows[:, 1], rows[:, 2], mask=mask,
                                            mined=mined, **settings)
        if miner is not None:
            triplets = miner(key, embeddings, labels, mask, kappa if use_kappa else None)
            return losses.indexed_triplet_objective(embeddings, *triplets, mask=mask,
                                                    **settings)
        fixed = jax.lax.stop_gradient(embeddings)
        _, aux = losses.indexed_triplet_objective(
            fixed, *error_miner(key, fixed, labels, mask, None), mask=mask,
            **{**settings, "use_global": False})
        loss = pair_loss(embeddings, labels, mask)
        return loss, {**aux, "loss": loss}

    return objective
