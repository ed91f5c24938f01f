"""Defaults shared by every experiment config, and the paper's comparison rows as variants.

Every choice of the method where the paper is silent is a field here (method: docs/method.md
§1–3; protocol: §5). A dataset config (`cub.py`, `cars196.py`, `omniglot.py`) starts from
`base_config()`, sets its data and model, and applies the variants named after the colon of
`--config=FILE:VARIANT[,VARIANT...]` with `apply_variants` (e.g. `omniglot.py:smoke,semihard`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from smine_jax import controller, data, models


def base_config() -> ml_collections.ConfigDict:
    """The Smart Mining defaults (variant `smart`): method.md §1–4 on GoogLeNet, 64-d."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.variant = "smart"
    config.data = data.default_config()
    # Smoke-test subsets: the first max_classes classes of each split, the first max_per_class
    # images of each class (0 = all).
    config.subset = ml_collections.ConfigDict({"max_classes": 0, "max_per_class": 0})

    # Every architecture's fields, so that --config.model.name=... can switch architecture.
    model = models.default_config("googlenet")
    for name in ("small_conv",):
        for field, value in models.default_config(name).items():
            if field not in model:
                model[field] = value
    config.model = model

    config.optimizer = ml_collections.ConfigDict({
        "learning_rate": 0.1,       # method.md §5
        "lr_halve_every": 3,        # epochs (method.md §5: halved every 3 epochs)
        "momentum": 0.9,            # method.md §5 (choice)
        "nesterov": False,
        "weight_decay": 5e-4,       # method.md §5; coupled L2 (Caffe), on every parameter
        "head_lr_multiplier": 10.0,  # method.md §5: new 64-d head, learning rate ×10
    })
    config.train = ml_collections.ConfigDict({
        "epochs": 20,               # method.md §5: <= 20 epochs
        "batch_size": 128,          # triplets per batch (method.md §5 choice)
        "triplets_per_anchor": 1,   # slots T per anchor (method.md §2 choice); T > 1 mines a
                                    # random 1/T of the anchors each epoch (N triplets always)
        "inbatch_images": 0,        # images per m-per-class batch; 0 = 3 × batch_size (an
                                    # epoch shows every variant 3 × N images)
        "samples_per_class": 4,     # m of the m-per-class batches (in-batch baselines)
        "embed_batch_size": 256,    # images per batch of the embedding / evaluation pass
        "eval_every": 5,            # epochs between test evaluations (and at the end)
        "prefetch": 2,              # batches gathered ahead of the train step
        "shard_timeout": 120.0,     # seconds a process waits for the others' embedding shards
                                    # (several processes: the workdir must be shared)
        "checkpoints_to_keep": 3,
        "progress": True,           # tqdm bar per epoch
        "save_triplets": True,      # each epoch's triplet ids to workdir/triplets (analysis)
    })
    config.loss = ml_collections.ConfigDict({
        "kind": "triplet",          # "triplet" | "lifted" | "npairs"
        "triplet_loss": "ratio",    # Eq. 2 (plain distances) | "margin" (FaceNet, squared)
        "margin": 0.2,              # m of Eq. 2 (and FaceNet's alpha for "margin")
        "use_global": True,         # add the global loss (Eq. 3)
        "global_margin": 0.01,      # t of Eq. 3
        "global_weight": 0.8,       # lambda of Eq. 3 (a choice: the paper is silent)
        "lifted_margin": 1.0,       # alpha of the lifted structured loss (Song et al.)
        "npairs_l2_reg": 0.002,     # embedding penalty of the N-pair loss (TF convention)
    })
    config.mining = ml_collections.ConfigDict({
        "kind": "smart",            # "smart" | "semihard" | "batch_hard" | "distance_weighted"
                                    # | "all" (every in-batch triplet) | "none" (lifted / npairs)
        "mined_fraction": 0.5,      # share of mined triplets from epoch 3 on (method.md §2 choice);
                                    # index batches: share of a batch's class pairs seeded by an
                                    # anchor and its smart negative
        "batches": "random",        # image batches of the in-batch kinds: "random" m-per-class
                                    # | "index" (built from the neighbour index, index_batches)
        "inbatch_kappa": False,     # in-batch miners skip negatives inside κ · d²(a, p_nn)
        "k": 0,                     # neighbours per anchor; 0 = 2 × largest class (a choice:
                                    # the paper is silent)
        "backend": "exact",         # "exact" (device) | "scann" (host)
        "scann_mode": "brute_force",  # | "tree_ah" (large sets)
        "chunk_size": 2048,         # anchor rows per mining chunk (speed only)
        "semihard_fallback": "largest",  # TF-Addons rule when no semi-hard negative | "invalid"
        "distance_cutoff": 0.5,     # distance-weighted sampling (Wu et al.)
        "nonzero_loss_cutoff": 1.4,
    })
    # method.md §3: the controller's fields (policy, target, signal, window 3, κ₀, clip [1, 64],
    # ...).
    # κ₀ is a number or "auto", κ_random a number or None: untyped fields, so that
    # --config.controller.kappa_init=auto / =16 and --config.controller.kappa_random=None parse.
    fields = dataclasses.asdict(controller.ControllerConfig())
    for name in ("kappa_init", "kappa_random"):
        fields[name] = ml_collections.FieldReference(fields[name], field_type=object)
    config.controller = ml_collections.ConfigDict(fields)
    config.controller.max_step_factor = ml_collections.config_dict.placeholder(float)
    return config


def use_model_inputs(config: ml_collections.ConfigDict) -> None:
    """Sets the data fields the architecture fixes (crop, resize, channels, mean, std)."""
    config.data.update(models.model_spec(config.model.name).data_defaults())


# ----------------------------------------------------------------------------------------------
# The paper's comparison rows (method.md §5) as variants of the same loop.


def smart(config):
    """Smart Mining: index mining + global loss + adaptive controller (the default), with the
    controller settings the validation study chose (benchmarks/SMART_STUDY.md): the mined
    triplets' error as the signal, target 0.6, κ₀ calibrated from the lists, no points for the
    random-only epochs."""


def smart_v1(config):
    """Smart Mining as the first version had it (before the validation study): error over all
    triplets, target 0.5, κ₀ = 16, random-only epochs in the fit as κ = 64 points, mined share
    0.5, one triplet per anchor, k = 2 × the largest class."""
    config.controller.update(error_on="all", target_error=0.5, kappa_init=16.0,
                             kappa_random=64.0, max_step_factor=None)
    config.mining.update(mined_fraction=0.5, k=0)
    config.train.triplets_per_anchor = 1


def smart_manual(config):
    """Smart Mining with the manual κ schedule instead of the controller (ablation)."""
    config.controller.policy = "manual"


def index_no_global(config):
    """Triplet + index mining, no global loss."""
    config.loss.use_global = False


def random_global(config):
    """Triplet + global loss on random triplets only (no mining)."""
    config.mining.mined_fraction = 0.0


def _in_batch(config, kind: str) -> None:
    # FaceNet's margin triplet loss on squared distances, no global loss (the semi-hard row of
    # the paper); batch-hard and distance-weighted use the same loss so only the miner differs.
    config.mining.kind = kind
    config.loss.triplet_loss = "margin"
    config.loss.use_global = False


def semihard(config):
    """FaceNet semi-hard in-batch mining on m-per-class batches, margin loss."""
    _in_batch(config, "semihard")


def batch_hard(config):
    """Batch-hard in-batch mining (Hermans et al. 2017), margin loss."""
    _in_batch(config, "batch_hard")


def distance_weighted(config):
    """Distance-weighted sampling (Wu et al. 2017), margin loss."""
    _in_batch(config, "distance_weighted")


def inbatch_all(config):
    """Every valid in-batch triplet on random m-per-class batches, with Smart Mining's ratio +
    global loss: the control for index-built batches (same loss, random batches)."""
    config.mining.kind = "all"


def _index_batches(config) -> None:
    # The index builds the batches (mining epochs), the κ boundary holds inside them, and the
    # controller steers κ by the in-batch triplets' error (they carry no mined flag).
    config.mining.update(batches="index", inbatch_kappa=True)
    config.controller.error_on = "all"


def smart_batches(config):
    """Index-built batches (the seeds' and their smart negatives' classes share a batch) with
    every valid in-batch triplet, the κ boundary and the ratio + global loss."""
    inbatch_all(config)
    _index_batches(config)


def smart_batches_semihard(config):
    """Index-built batches with FaceNet semi-hard in-batch mining and the κ boundary."""
    semihard(config)
    _index_batches(config)


def smart_batches_dw(config):
    """Index-built batches with distance-weighted sampling and the κ boundary."""
    distance_weighted(config)
    _index_batches(config)


def lifted(config):
    """Lifted structured loss (Song et al. 2016) on m-per-class batches, on the head's raw
    (unnormalised) embeddings as in the paper: on unit vectors every J_ij stays above
    log(#negatives) + margin - 2 > 0, and on Omniglot R@1 stayed at the raw-pixel floor (0.22
    after 20 epochs; 0.74 after 3 epochs unnormalised)."""
    config.mining.kind = "none"
    config.loss.kind = "lifted"
    config.model.l2_normalise = False


def npairs(config):
    """N-pair loss (Sohn 2016) on batches of pairs of distinct classes."""
    config.mining.kind = "none"
    config.loss.kind = "npairs"
    config.train.samples_per_class = 2


VARIANTS: dict[str, Callable] = {
    function.__name__: function for function in (
        smart, smart_v1, smart_manual, index_no_global, random_global, semihard, batch_hard,
        distance_weighted, lifted, npairs, inbatch_all, smart_batches, smart_batches_semihard,
        smart_batches_dw)
}


def apply_variants(config: ml_collections.ConfigDict, arg: str | None,
                   extra: dict[str, Callable] | None = None) -> ml_collections.ConfigDict:
    """Applies the comma-separated variants of `arg` in order; records them in config.variant.

    Raises ValueError naming --config for an unknown variant.
    """
    known = {**VARIANTS, **(extra or {})}
    names = [name.strip() for name in (arg or "").split(",") if name.strip()]
    for name in names:
        if name not in known:
            raise ValueError(f"--config: unknown variant {name!r} after the colon; known: "
                             f"{', '.join(sorted(known))}")
        known[name](config)
    config.variant = ",".join(names) or "smart"
    return config
