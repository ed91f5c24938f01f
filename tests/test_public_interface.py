"""The public interface of DESIGN.md is a contract: names, argument order and defaults.

Other code and checks import these functions by name, so a rename or a reordered argument
breaks them silently. This test pins each documented signature: the positional arguments in
their order, and the keyword-only arguments with their defaults. Extra arguments after the
documented ones are allowed (the contract says "extend freely").
"""

import importlib
import inspect

import pytest

_EMPTY = inspect.Parameter.empty

# name -> (positional arguments in order, {keyword-only argument: default})
# A default of _EMPTY means "required keyword-only".
CONTRACT = {
    "smine_jax.losses.triplet_ratio_loss": (
        ["anchor", "positive", "negative"], {"margin": 0.2}),
    "smine_jax.losses.triplet_margin_loss": (
        ["anchor", "positive", "negative"], {"margin": 0.2}),
    "smine_jax.losses.global_loss": (
        ["anchor", "positive", "negative"], {"margin": 0.01, "weight": 0.8, "mask": None}),
    "smine_jax.metrics.recall_at_k": (["embeddings", "labels", "ks"], {}),
    "smine_jax.metrics.nmi_from_assignments": (["assignments", "labels"], {}),
    "smine_jax.metrics.kmeans": (["embeddings", "num_clusters"], {"seed": 0}),
    "smine_jax.metrics.nmi": (["embeddings", "labels"], {"num_clusters": None, "seed": 0}),
    "smine_jax.metrics.map_at_r": (["embeddings", "labels"], {}),
    "smine_jax.metrics.r_precision": (["embeddings", "labels"], {}),
    "smine_jax.metrics.evaluate": (["embeddings", "labels"], {}),
    "smine_jax.index.write_shard": (
        ["directory", "embeddings", "labels", "ids"], {"shard": _EMPTY, "num_shards": _EMPTY}),
    "smine_jax.index.read_shards": (["directory"], {}),
    "smine_jax.index.neighbours": (["embeddings", "k"], {"backend": "exact"}),
    "smine_jax.mining.sample_triplets": (
        ["key", "neighbour_ids", "neighbour_sq_dists", "labels", "kappa"],
        {"triplets_per_anchor": 1}),
    "smine_jax.mining.random_triplets": (["key", "labels", "num_triplets"], {}),
    "smine_jax.mining.index_batches": (
        ["key", "neighbour_ids", "neighbour_sq_dists", "labels", "kappa"],
        {"classes_per_batch": _EMPTY, "samples_per_class": _EMPTY}),
    # DESIGN's "config_or_kwargs": a config positionally, or keyword overrides (checked below).
    "smine_jax.controller.init": (["config"], {}),
    "smine_jax.controller.update": (["state", "training_error"], {}),
    "smine_jax.controller.calibrate_kappa": (
        ["neighbour_ids", "neighbour_sq_dists", "labels"], {"share": 0.5}),
    "smine_jax.train.train_and_evaluate": (["config", "workdir"], {}),
}

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _resolve(dotted):
    module_name, attribute = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), attribute)


@pytest.mark.parametrize("dotted", sorted(CONTRACT))
def test_documented_signature(dotted):
    positional, keyword_only = CONTRACT[dotted]
    parameters = inspect.signature(_resolve(dotted)).parameters.values()

    leading = [p.name for p in parameters if p.kind in _POSITIONAL][: len(positional)]
    assert leading == positional, f"{dotted}: positional arguments {leading} != {positional}"

    by_name = {p.name: p for p in parameters}
    for name, default in keyword_only.items():
        assert name in by_name, f"{dotted}: no argument {name!r}"
        parameter = by_name[name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, (
            f"{dotted}: {name!r} should be keyword-only, is {parameter.kind.description}")
        assert parameter.default == default, (
            f"{dotted}: {name!r} defaults to {parameter.default!r}, DESIGN.md says {default!r}")


def test_recall_default_ks():
    default = inspect.signature(_resolve("smine_jax.metrics.recall_at_k")).parameters["ks"].default
    assert tuple(default) == (1, 2, 4, 8)


def test_controller_init_takes_keyword_overrides():
    parameters = inspect.signature(_resolve("smine_jax.controller.init")).parameters.values()
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def test_triplets_fields():
    from smine_jax.mining import Triplets

    assert Triplets._fields[:4] == ("anchor", "positive", "negative", "mined")
