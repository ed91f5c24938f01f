"""smine_jax.objectives: one miner contract (indices into the batch) and one triplet loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from smine_jax import batch_miners, losses, objectives, train
from smine_jax.configs import omniglot

B, D = 24, 8


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(B, D)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.repeat(np.arange(B // 4), 4).astype(np.int32)
    mask = np.ones(B, bool)
    mask[-3:] = False
    embeddings[-3:] = np.nan  # padded rows: must reach neither the loss nor its gradient
    return jnp.asarray(embeddings), jnp.asarray(labels), jnp.asarray(mask)


def _config(variant: str, **mining) -> ml_collections.ConfigDict:
    config = omniglot.get_config(variant)
    config.mining.update(mining)
    return config


@pytest.mark.parametrize("variant", ["semihard", "batch_hard", "distance_weighted",
                                     "inbatch_all"])
@pytest.mark.parametrize("kappa", [0.0, 2.0])
def test_in_batch_objective_is_the_triplet_loss_on_the_miners_rows(variant, kappa):
    # The reference: the miner's triplets gathered as rows, scored by triplet_objective.
    config = _config(variant, inbatch_kappa=kappa > 0)
    embeddings, labels, mask = _batch()
    key = jax.random.key(1)
    # Under jit, as in the train step (eagerly the miners refuse NaN rows, padded or not).
    objective = jax.jit(objectives.make_objective(config))
    loss, aux = objective(key, embeddings, labels, mask, jnp.zeros(B, bool), kappa)
    miner = jax.jit(objectives.IN_BATCH_MINERS[str(config.mining.kind)](config),
                    static_argnums=4)
    triplets = miner(key, embeddings, labels, mask, kappa if kappa > 0 else None)
    safe = jnp.where(mask[:, None], embeddings, 0.0)
    expected, expected_aux = losses.triplet_objective(
        safe[triplets.anchor], safe[triplets.positive], safe[triplets.negative],
        mask=triplets.valid, **objectives.loss_settings(config))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(aux["training_error"]),
                               float(expected_aux["training_error"]), rtol=1e-6)
    gradient = jax.grad(lambda e: objective(key, e, labels, mask, jnp.zeros(B, bool),
                                            kappa)[0])(embeddings)
    assert np.all(np.isfinite(np.asarray(gradient)))


def test_a_new_in_batch_miner_is_one_registry_entry(monkeypatch):
    # A miner that takes, for every anchor, its first positive and the first other-class row.
    def first_of_each(config):
        def miner(key, embeddings, labels, mask, kappa):
            same = labels[:, None] == labels[None, :]
            rows = jnp.arange(labels.shape[0])
            positive = jnp.argmax(same & (rows[None, :] != rows[:, None]), axis=1)
            negative = jnp.argmax(~same, axis=1)
            return batch_miners.BatchTriplets(rows.astype(jnp.int32), positive.astype(jnp.int32),
                                              negative.astype(jnp.int32), mask)
        return miner

    monkeypatch.setitem(objectives.IN_BATCH_MINERS, "first", first_of_each)
    config = _config("semihard", kind="first")
    train.check_config(config)  # the trainer's config check reads the same table
    embeddings, labels, mask = _batch()
    loss, aux = jax.jit(objectives.make_objective(config))(jax.random.key(0), embeddings, labels,
                                                           mask, jnp.zeros(B, bool))
    assert np.isfinite(float(loss)) and float(aux["num_valid"]) == float(mask.sum())


def test_pair_losses_log_the_batch_hard_error_without_its_gradient():
    config = omniglot.get_config("lifted")
    embeddings, labels, mask = _batch()
    objective = jax.jit(objectives.make_objective(config))
    loss, aux = objective(jax.random.key(0), embeddings, labels, mask, jnp.zeros(B, bool))
    expected = losses.lifted_structure_loss(embeddings, labels, margin=1.0, mask=mask)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    assert 0.0 <= float(aux["training_error"]) <= 1.0
    gradient = jax.grad(lambda e: objective(jax.random.key(0), e, labels, mask,
                                            jnp.zeros(B, bool))[0])(embeddings)
    expected_gradient = jax.grad(lambda e: losses.lifted_structure_loss(
        e, labels, margin=1.0, mask=mask))(embeddings)
    np.testing.assert_allclose(np.asarray(gradient), np.asarray(expected_gradient), rtol=1e-5,
                               atol=1e-7)
