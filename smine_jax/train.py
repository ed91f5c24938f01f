"""Training: the train state, the jitted steps, the config check and the epoch loop.

One epoch of Smart Mining (method.md §2–3; Harwood et al. 2017, Algorithm 1 and Eqs. 6–8), each
stage in its module:

    plan the epoch (`epoch_plan.plan_epoch`, a function of the state at the epoch's start):
      embed the training set (eval mode, jitted, sharded, padded batches: every image once;
         `embedding.Embedder`) -> this process's shard under workdir/embeddings/epoch_XXXX
      -> read all shards -> index.neighbours (k nearest other samples of the epoch's anchors;
         each process searches for its own block, the lists are shared)
      -> mining.mine_triplets with κ from the controller (the first mining epoch of
         controller.kappa_init="auto" calibrates κ₀ from the lists first) on every anchor, or
         on a random 1/T of them with T = train.triplets_per_anchor slots each
      -> mining.epoch_triplets (mined share `mining.mined_fraction`; epochs <=
         controller.random_epochs: random triplets only): N triplets an epoch, whatever T
      -> the epoch's triplets to workdir/triplets/epoch_XXXX.npz (`train.save_triplets`)
    -> jitted train steps on batches of `train.batch_size` triplets (augmentation inside the
       step, images gathered by id from the uint8 cache), losses.triplet_objective (`_run_steps`)
    -> training error (mean of the per-batch error) and that of the mined triplets
       -> controller.update (its `error_on` picks the signal)
    -> evaluation on the validation classes (`data.val_classes`) and the test classes every
       `train.eval_every` epochs and at the end (`embedding.evaluate`); the best epoch by
       validation R@1 is kept in workdir/checkpoints_best (`checkpoints.BestByValidation`)
    -> metrics.jsonl, metric writers, checkpoint (`checkpoints.Checkpoints`).

The baselines of the paper's comparison table are variants of the same loop (config fields, see
smine_jax/configs/common.py): in-batch miners (semi-hard, batch-hard, distance-weighted) and
the lifted-structure and N-pairs losses train on m-per-class image batches and skip the
embed / index / mine stages (their time split records 0).

Determinism: every random choice is a function of (seed, epoch, step) through `fold_in` of the
state's base key (`epoch_plan.stream_key`), so a run resumed from a checkpoint replays exactly
what an uninterrupted run does (on the same device topology). Checkpoints (orbax,
`workdir/checkpoints`) are written at the end of every epoch. On SIGTERM the current step
finishes and a mid-epoch checkpoint records the state, the position in the epoch and the
epoch's plan; on resume training goes on from that position with the saved plan (no second
embedding, search or mining). SIGKILL resumes from the last completed epoch.

Data parallelism (`runtime`): `jax.jit` over a `Mesh` of all devices, batches sharded on the
`data` axis, parameters replicated (no pmap). Several processes (jax.distributed): each process
embeds its contiguous slice of the training set, writes its own shard and reads all shards; it
searches the neighbours of the anchors in its slice and the lists are gathered, so every process
builds the same global plan (mining is cheap next to the search) and feeds its slice of every
global batch: a run of P processes trains exactly what one process with P devices trains. The
workdir must be on a filesystem shared by all processes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from smine_jax import (
    controller,
    data,
    embedding,
    epoch_plan,
    index,
    logs,
    models,
    objectives,
    runtime,
)
from smine_jax.checkpoints import (
    STEP_METRICS,
    BestByValidation,
    CheckpointError,
    Checkpoints,
    EpochTrainTime,
)
from smine_jax.embedding import SharedWorkdirError
from smine_jax.epoch_plan import EpochPlan, inbatch_images, stream_key
from smine_jax.runtime import PreemptionGuard, replicated_state

# The public API; CheckpointError, SharedWorkdirError, replicated_state and inbatch_images are
# defined by the stage that raises or uses them and are re-exported here.
__all__ = [
    "BATCH_SOURCES", "PATH_FIELDS", "RESUMABLE_FIELDS", "TRIPLET_LOSSES", "CheckpointError",
    "DiskFull", "Diverged", "Preempted", "SharedWorkdirError", "TrainState", "check_config",
    "create_train_state", "inbatch_images", "learning_rate_schedule", "make_embed_fn",
    "make_objective", "make_optimizer", "make_train_step", "replicated_state", "subset_dataset",
    "train_and_evaluate",
]

logger = logging.getLogger(__name__)

# How the image batches of the in-batch kinds are built: m-per-class at random, or from the
# epoch's neighbour index (`mining.index_batches`: seeds and their smart negatives' classes).
BATCH_SOURCES = ("random", "index")
TRIPLET_LOSSES = ("ratio", "margin")

# Config fields that may change between a run and its resumption (they change nothing that is
# already in the checkpoint): more epochs, evaluation frequency, the terminal, I/O settings.
RESUMABLE_FIELDS = (
    "train.epochs", "train.eval_every", "train.progress", "train.checkpoints_to_keep",
    "train.save_triplets", "train.shard_timeout",
    "train.prefetch", "data.num_workers", "data.cache_dir", "data.download_url",
)

# Config fields that name a file or folder: a resumed run may spell them differently.
PATH_FIELDS = ("data.dir", "model.init_from")

# The random streams of the model's initialisation and of the train steps (fold_in(base key,
# stream, ...)); the plan's streams (1, 2, 3, 5, 6) are in `epoch_plan`. Their values are part of
# every run's results.
_INIT_STREAM, _STEP_STREAM = 0, 4


class Diverged(RuntimeError):
    """Training stopped at a non-finite loss, gradient or update; the message names the epoch,
    the step and the last checkpoint (nothing non-finite is ever saved)."""


class DiskFull(RuntimeError):
    """A write into the workdir found no space left; what is on disk is consistent."""


class Preempted(RuntimeError):
    """Training stopped on SIGTERM or SIGINT (Ctrl-C) after saving a checkpoint; rerun the
    same command. `signum` is the signal (the command line exits with 128 + signum)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)


class _NonFiniteStep(Exception):
    def __init__(self, position: int, step: int):
        super().__init__(position, step)
        self.position, self.step = position, step


# ----------------------------------------------------------------------------------------------
# Train state and optimiser.


@struct.dataclass
class TrainState:
    """Everything a resumed run needs (a pytree; `tx` is static).

    Attributes:
      step: i32[], train steps done (global across epochs; the key of step s is a function of s).
      epoch: i32[], epochs completed.
      params, batch_stats: the model variables.
      opt_state: optimiser state of `tx`.
      controller: the κ controller state (method.md §3); `controller.kappa` is the next epoch's κ.
      rng: u32[2] base PRNG key of the run (never split: derived keys come from `fold_in`).
      tx: the optax transformation (static).
    """

    step: jax.Array
    epoch: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    controller: controller.ControllerState
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def learning_rate_schedule(config_optimizer, steps_per_epoch: int) -> optax.Schedule:
    """lr halved every `lr_halve_every` epochs, a staircase schedule on the step (method.md §5)."""
    halve_every = int(config_optimizer.lr_halve_every)
    return optax.exponential_decay(
        float(config_optimizer.learning_rate), transition_steps=halve_every * steps_per_epoch,
        decay_rate=0.5, staircase=True)


def make_optimizer(config_optimizer, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum, L2 weight decay and a learning-rate multiplier on the head.

    Weight decay is coupled (L2 added to the gradient before momentum and learning rate), the
    Caffe convention of the paper's setup (`weight_decay: 0.0005`), applied to every parameter
    (Caffe's default decay_mult 1). The head (`models.param_labels`) trains with the learning
    rate × `head_lr_multiplier` (method.md §5: ×10), its decay term included, as Caffe's lr_mult.
    """
    schedule = learning_rate_schedule(config_optimizer, steps_per_epoch)

    def sgd(multiplier: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(float(config_optimizer.weight_decay)),
            optax.sgd(lambda step: multiplier * schedule(step),
                      momentum=float(config_optimizer.momentum) or None,
                      nesterov=bool(config_optimizer.nesterov)))

    return optax.multi_transform(
        {"backbone": sgd(1.0), "head": sgd(float(config_optimizer.head_lr_multiplier))},
        models.param_labels)


def create_train_state(config, model, image_shape, steps_per_epoch: int) -> TrainState:
    """The state before the first epoch: model initialised from `config.seed` (and the backbone
    from `config.model.init_from` when given), optimiser and controller at their start."""
    rng = jax.random.PRNGKey(int(config.seed))
    variables = models.init_variables(model, stream_key(rng, _INIT_STREAM),
                                      (1, *image_shape), config.model)
    tx = make_optimizer(config.optimizer, steps_per_epoch)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
        controller=controller.init(config.controller), rng=rng, tx=tx)


# ----------------------------------------------------------------------------------------------
# The jitted steps (the objective of each variant: `objectives.make_objective`).

make_objective = objectives.make_objective


def make_train_step(model, objective: Callable, augment: Callable) -> Callable:
    """train_step(state, images u8[B, (3,) S, S, C], labels i32[B], mask bool[B], mined bool[B],
    kappa f32[] = 0) -> (state, m); `kappa` is the in-batch boundary of the epoch (0: none).

    Pure: the augmentation and objective keys are fold_in(rng, step), the images are augmented
    inside the step (random crop, flip, normalisation), the forward pass runs in train mode on
    all the batch's images at once (one set of batch-norm statistics), and m holds the step's
    scalar `loss`, `training_error`, the counts `num_mined` and `mined_violations` of the
    mined triplets (`mined`) and of those with J_t > 0, and `finite`: whether the loss, the
    gradients and the updated variables are all finite. A non-finite step leaves the state as
    it was (only `step` advances), so a diverging run never holds, nor saves, NaN or inf; the
    loop stops at the next check of `finite` (`_run_steps`).
    """

    def train_step(state: TrainState, images, labels, mask, mined, kappa=0.0):
        step_key = stream_key(state.rng, _STEP_STREAM, state.step)
        augment_key, objective_key = jax.random.split(step_key)
        flat = images.reshape((-1, *images.shape[-3:]))

        def loss_fn(params):
            inputs = augment(augment_key, flat)
            embeddings, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
                mutable=["batch_stats"])
            loss, aux = objective(objective_key, embeddings.astype(jnp.float32), labels, mask,
                                  mined, kappa)
            return loss, (aux, updates.get("batch_stats", state.batch_stats))

        (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = _all_finite((loss, grads, params, batch_stats, opt_state))
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            (params, batch_stats, opt_state),
                            (state.params, state.batch_stats, state.opt_state))
        new_state = state.replace(step=state.step + 1, params=kept[0], batch_stats=kept[1],
                                  opt_state=kept[2])
        zero = jnp.zeros((), jnp.float32)
        return new_state, {"loss": loss, "training_error": aux["training_error"],
                           "num_mined": aux.get("num_mined", zero),
                           "mined_violations": aux.get("mined_violations", zero),
                           "finite": finite}

    return train_step


def _all_finite(tree) -> jax.Array:
    """bool[]: every floating-point leaf of `tree` is finite everywhere."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.ones((), bool)


def make_embed_fn(model, preprocess: Callable) -> Callable:
    """embed(variables, images u8[B, S, S, C]) -> f32[B, D], eval mode (centre crop)."""

    def embed(variables, images):
        return model.apply(variables, preprocess(images), train=False).astype(jnp.float32)

    return embed


# ----------------------------------------------------------------------------------------------
# Configuration checks.


def _fail(field: str, expected: str, value) -> None:
    raise ValueError(f"config.{field}={value!r}: expected {expected}")


def _int_field(config, field: str, minimum: int) -> int:
    section, name = field.split(".")
    value = config[section][name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        _fail(field, f"an integer >= {minimum}", value)
    return int(value)


def check_config(config) -> None:
    """ValueError naming `config.<section>.<field>` for any value the trainer cannot use.

    (The data, controller and model sections are checked by their own packages.)
    """
    for section in ("data", "model", "optimizer", "train", "loss", "mining", "controller",
                    "subset"):
        if section not in config:
            raise ValueError(f"config.{section}: missing section")
    in_batch_miners = tuple(objectives.IN_BATCH_MINERS)
    mining_kinds = ("smart", *in_batch_miners, "none")
    loss_kinds = ("triplet", *objectives.PAIR_LOSSES)
    if str(config.mining.kind) not in mining_kinds:
        _fail("mining.kind", f"one of {mining_kinds}", config.mining.kind)
    if str(config.loss.kind) not in loss_kinds:
        _fail("loss.kind", f"one of {loss_kinds}", config.loss.kind)
    if str(config.loss.triplet_loss) not in TRIPLET_LOSSES:
        _fail("loss.triplet_loss", f"one of {TRIPLET_LOSSES}", config.loss.triplet_loss)
    if (config.loss.kind == "triplet") == (config.mining.kind == "none"):
        _fail("mining.kind", "'none' exactly when loss.kind is 'lifted' or 'npairs' (they use "
              f"whole batches; loss.kind={config.loss.kind!r})", config.mining.kind)
    for field in ("train.epochs", "train.batch_size", "train.triplets_per_anchor",
                  "train.embed_batch_size", "train.eval_every", "train.prefetch",
                  "train.checkpoints_to_keep", "optimizer.lr_halve_every"):
        _int_field(config, field, 1)
    for field in ("train.inbatch_images", "mining.k", "mining.chunk_size", "subset.max_classes",
                  "subset.max_per_class"):
        _int_field(config, field, 0)
    if _int_field(config, "train.samples_per_class", 2) != 2 and config.loss.kind == "npairs":
        _fail("train.samples_per_class", "2 for loss.kind='npairs' (pairs)",
              config.train.samples_per_class)
    if not 0.0 <= float(config.mining.mined_fraction) <= 1.0:
        _fail("mining.mined_fraction", "a value in [0, 1]", config.mining.mined_fraction)
    if str(config.mining.batches) not in BATCH_SOURCES:
        _fail("mining.batches", f"one of {BATCH_SOURCES}", config.mining.batches)
    if config.mining.batches == "index" and config.mining.kind == "smart":
        _fail("mining.batches", "'random' for mining.kind='smart' (triplet batches; 'index' "
              "builds the image batches of the in-batch kinds)", config.mining.batches)
    if config.mining.inbatch_kappa and config.mining.kind not in in_batch_miners:
        _fail("mining.inbatch_kappa", f"False unless mining.kind is one of {in_batch_miners} "
              "(the boundary skips in-batch negatives)", config.mining.inbatch_kappa)
    if (config.mining.inbatch_kappa and config.mining.batches == "random"
            and config.controller.kappa_init == controller.AUTO):
        _fail("controller.kappa_init", "a number with mining.inbatch_kappa on random batches "
              "('auto' calibrates κ₀ from the neighbour lists of mining.batches='index')",
              config.controller.kappa_init)
    if (config.mining.batches == "index" or config.mining.inbatch_kappa) and (
            config.controller.error_on == "mined"):
        _fail("controller.error_on", "'all' with image batches (mining.batches='index' or "
              "mining.inbatch_kappa): in-batch triplets carry no mined flag, so a 'mined' "
              "signal would never move κ", config.controller.error_on)
    if str(config.mining.backend) not in index.BACKENDS:
        _fail("mining.backend", f"one of {index.BACKENDS}", config.mining.backend)
    for field in ("learning_rate", "weight_decay", "head_lr_multiplier"):
        value = config.optimizer[field]
        if isinstance(value, bool) or not np.isfinite(float(value)) or float(value) < 0:
            _fail(f"optimizer.{field}", "a finite number >= 0", value)
    if not 0.0 <= float(config.optimizer.momentum) < 1.0:
        _fail("optimizer.momentum", "a value in [0, 1)", config.optimizer.momentum)
    devices = jax.device_count()
    for field in ("train.batch_size", "train.embed_batch_size"):
        if _int_field(config, field, 1) % devices:
            _fail(field, f"a multiple of the {devices} devices (the batch is split over them)",
                  config[field.split(".")[0]][field.split(".")[1]])
    data.resolve_config(config.data)  # ValueError naming data.<field>
    models.build_model(config.model)  # ValueError naming model.<field>
    try:
        controller.init(config.controller)
    except ValueError as error:
        message = str(error)
        raise ValueError(message if message.startswith("config") else
                         f"config.controller.{message}") from None
    images = inbatch_images(config)
    if config.mining.kind != "smart" and (images % devices or images % config.train.
                                           samples_per_class):
        _fail("train.inbatch_images", f"a multiple of train.samples_per_class="
              f"{config.train.samples_per_class} and of the {devices} devices (0 = 3 × "
              f"train.batch_size = {3 * config.train.batch_size})", images)


# ----------------------------------------------------------------------------------------------
# Data.


def subset_dataset(dataset: data.Dataset, *, max_classes: int = 0,
                   max_per_class: int = 0) -> data.Dataset:
    """The first `max_classes` classes of each split (label order) and the first
    `max_per_class` samples of each class (0 = all): small, deterministic smoke-test sets."""
    if not max_classes and not max_per_class:
        return dataset
    keep = []
    for in_split in (dataset.is_train, ~dataset.is_train):
        ids = np.flatnonzero(in_split)
        classes = np.unique(dataset.labels[ids])
        for label in classes[:max_classes or None]:
            members = ids[dataset.labels[ids] == label]
            keep.append(members[:max_per_class or None])
    return dataset.select(np.sort(np.concatenate(keep)))


# ----------------------------------------------------------------------------------------------
# The run: what is set up once (data, model, compiled steps, runtime).


class _Run:
    """What a run sets up once: the runtime (mesh and placements), the data splits, the model's
    compiled steps, the initial state and the inputs of every epoch's plan."""

    def __init__(self, config, workdir: Path):
        self.config = config
        self.workdir = workdir
        self.kind = str(config.mining.kind)
        self.runtime = runtime.Runtime()
        progress = bool(config.train.progress) and jax.process_index() == 0

        dataset = data.build_dataset(config.data, progress=progress)
        self.full_counts = dict(dataset.counts())
        dataset = subset_dataset(dataset, max_classes=int(config.subset.max_classes),
                                 max_per_class=int(config.subset.max_per_class))
        self.train_split = data.load(config.data, split="train", dataset=dataset,
                                     progress=progress)
        self.val_split = data.load(config.data, split="val", dataset=dataset, progress=progress)
        self.test_split = data.load(config.data, split="test", dataset=dataset,
                                    progress=progress)
        self.labels = np.asarray(self.train_split.labels, np.int32)
        self._check_data()

        model = models.build_model(config.model)
        data_config = data.resolve_config(config.data)
        spec = models.model_spec(config.model.name)
        if config.model.init_from and spec.channels not in (None, data_config["channels"]):
            _fail("data.channels", f"{spec.channels} for the pretrained {spec.name} "
                  f"(model.init_from)", data_config["channels"])
        if spec.mean is not None and not config.model.init_from:
            logger.warning("model.init_from is empty: %s trains from scratch (the paper's protocol "
                           "starts from ImageNet weights)", spec.name)
        augment, center = data.preprocessors(config.data)
        image_shape = (data_config["crop_size"],) * 2 + (data_config["channels"],)

        # The epoch's plan is global (N triplets, or 3N images, in global batches, the same on
        # every process); each process feeds its slice of every batch (`epoch_plan.local_plan`).
        num_train = len(self.labels)
        if self.kind == "smart":
            self.steps_per_epoch = math.ceil(num_train / int(config.train.batch_size))
            self.images_per_step = 3 * int(config.train.batch_size)
        else:  # as many images an epoch as the triplet variants: 3 per triplet
            self.steps_per_epoch = math.ceil(3 * num_train / inbatch_images(config))
            self.images_per_step = inbatch_images(config)

        self.initial_state = self.runtime.place_state(
            create_train_state(config, model, image_shape, self.steps_per_epoch))
        self.schedule = learning_rate_schedule(config.optimizer, self.steps_per_epoch)
        replicated = self.runtime.replicated
        self.train_step = jax.jit(make_train_step(model, make_objective(config), augment),
                                  donate_argnums=(0,), out_shardings=(replicated, replicated))
        self.embedder = embedding.Embedder(
            self.runtime, jax.jit(make_embed_fn(model, center),
                                  out_shardings=self.runtime.batch_sharding),
            local_batch=int(config.train.embed_batch_size) // jax.process_count(),
            shard_timeout=float(config.train.shard_timeout))
        self.plan_inputs = epoch_plan.PlanInputs(config, self.train_split, self.labels,
                                                 self.embedder, workdir, self.steps_per_epoch)
        self.log = logs.MetricsLog(workdir / "metrics.jsonl")
        self.step_compiled = False  # the train step has run once in this process

    def _check_data(self) -> None:
        config = self.config
        sizes = np.bincount(self.labels)
        if (sizes >= 2).sum() < 1 or (sizes > 0).sum() < 2:
            raise ValueError(f"config.data: the training split needs two classes and a class "
                             f"with two images (got class sizes {sizes.tolist()[:10]}...)")
        if self.kind != "smart":
            m = int(config.train.samples_per_class)
            needed = inbatch_images(config) // m
            if (sizes >= 2).sum() < needed:
                _fail("train.inbatch_images", f"at most {m} × the {int((sizes >= 2).sum())} "
                      f"training classes with two images or more (m-per-class batches of "
                      f"{needed} distinct classes)", inbatch_images(config))

    def dataset_counts(self) -> dict:
        """Images and classes of the whole dataset and of the splits this run uses (subset)."""
        splits = {"train": self.train_split, "val": self.val_split, "test": self.test_split}
        return {"dataset": self.full_counts, **{
            name: {"images": len(split), "classes": int(split.num_classes),
                   **({"skipped_unreadable": len(split.skipped)} if split.skipped else {})}
            for name, split in splits.items() if split is not None}}

    def evaluate(self, state: TrainState, split: str = "test") -> dict[str, float]:
        """The metrics of `state` on the test (or "val": validation) classes: Recall@K, NMI,
        MAP@R, R-precision (`embedding.evaluate`, dump in workdir/embeddings/<split>)."""
        images = {"test": self.test_split, "val": self.val_split}[split]
        return embedding.evaluate(self.embedder, state, images,
                                  self.workdir / "embeddings" / split, seed=int(self.config.seed))


# ----------------------------------------------------------------------------------------------
# The loop.


# Steps between two looks at the train step's `finite` flags (one small device read each).
FINITE_CHECK_EVERY = 10


def _check_finite(step_metrics: list, checked: int, start: int, first_step: int) -> int:
    """Raises _NonFiniteStep at the first step from `checked` on whose `finite` flag is False;
    returns how many steps are checked now."""
    flags = jax.device_get([values["finite"] for values in step_metrics[checked:]])
    for offset, finite in enumerate(flags):
        if not finite:
            position = start + checked + offset
            raise _NonFiniteStep(position, first_step + position + 1)
    return len(step_metrics)


def _run_steps(run: _Run, state: TrainState, plan: EpochPlan, start: int,
               guard: PreemptionGuard, progress) -> tuple[TrainState, list, bool]:
    """Train steps `start`.. of the epoch's plan (this process's slice of it); returns (state,
    per-step metrics, stopped).

    Raises _NonFiniteStep (position in the epoch, global step) when a step was not finite,
    found by a look at the steps' flags every FINITE_CHECK_EVERY steps and at the end.
    """
    labels, steps_per_epoch = run.labels, run.steps_per_epoch
    global_batch = run.runtime.global_batch
    step_metrics, checked = [], 0
    # The global step after each position, known on the host: no device sync per step.
    first_step = int(state.step) - start
    positions = range(start, steps_per_epoch)
    images = run.runtime.image_batches(run.train_split.images, (plan.ids[i] for i in positions),
                                       prefetch=int(run.config.train.prefetch))
    try:
        for position, batch in zip(positions, images, strict=True):
            ids = plan.ids[position]
            batch_labels = labels[ids[:, 0] if ids.ndim == 2 else ids]
            compiling = not run.step_compiled and not progress.disable
            if compiling:
                progress.set_postfix_str("compiling the train step")
            state, values = run.train_step(state, batch, global_batch(batch_labels),
                                           global_batch(plan.mask[position]),
                                           global_batch(plan.mined[position]),
                                           np.float32(plan.kappa))
            step_metrics.append(values)
            if compiling:  # the rate (and ETA) counts from here, not from the compile
                jax.block_until_ready(values["loss"])
                progress.reset()
                progress.update(position)
                progress.set_postfix_str("")
            run.step_compiled = True
            progress.update()
            if not progress.disable and (position % 10 == 0 or position + 1 == steps_per_epoch):
                latest = jax.device_get(values)
                progress.set_postfix(loss=f"{latest['loss']:.4f}",
                                     error=f"{latest['training_error']:.3f}")
            if len(step_metrics) - checked >= FINITE_CHECK_EVERY:
                checked = _check_finite(step_metrics, checked, start, first_step)
            if position + 1 < steps_per_epoch and guard.requested(first_step + position + 1):
                _check_finite(step_metrics, checked, start, first_step)
                return state, step_metrics, True
        _check_finite(step_metrics, checked, start, first_step)
    finally:
        if hasattr(images, "close"):
            images.close()
    return state, step_metrics, False


def train_and_evaluate(config, workdir) -> dict[str, float]:
    """Trains with the configured variant and returns the final test metrics (method.md §2–4).

    Resumes from workdir/checkpoints when there is a checkpoint (the config must match up to
    RESUMABLE_FIELDS; a mid-epoch checkpoint goes on with its saved epoch plan). Every process
    of a multi-process run calls it with the same config and the same (shared) workdir.

    Args:
      config: an ``ml_collections.ConfigDict`` as ``smine_jax.configs.<dataset>.get_config``
        makes it (sections data, model, optimizer, train, loss, mining, controller, subset).
      workdir: folder (str or Path) for config.json, metrics.jsonl, TensorBoard events,
        checkpoints (checkpoints/, checkpoints_best/), embedding dumps and triplet files;
        created if missing.

    Returns:
      dict str -> float: the test metrics after the last epoch (recall@1/2/4/8, nmi, map@r,
      r_precision, num_queries, num_excluded_queries; ``metrics.evaluate``).

    Raises:
      ValueError: a config value the trainer cannot use (names ``config.<section>.<field>``),
        or a workdir holding a run with another config.
      Preempted: SIGTERM or SIGINT, after saving a checkpoint (rerun the same call to resume).
      Diverged: a non-finite loss, gradient or update (nothing after the last checkpoint kept).
      DiskFull: a write found no space (the last complete checkpoint and metrics.jsonl kept).
      CheckpointError: no checkpoint in workdir/checkpoints restores.
      SharedWorkdirError: several processes that do not share one workdir.
    """
    from tqdm.auto import tqdm

    check_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = _Run(config, workdir)
    checkpoints = Checkpoints(workdir / "checkpoints", int(config.train.checkpoints_to_keep))
    best = BestByValidation(workdir / "checkpoints_best")
    writer = logs.create_metric_writer(workdir)
    closers = (checkpoints.close, best.close, writer.flush, writer.close)
    try:
        results = _train(run, checkpoints, best, writer, tqdm)
    except BaseException as error:
        for close in closers:  # a pending save's own error must not hide the first one
            with contextlib.suppress(Exception):
                close()
        if _is_disk_full(error, workdir):
            # orbax's failed writes leave asyncio tasks whose errors are logged when collected
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            raise DiskFull(_disk_full_message(workdir, checkpoints)) from None
        raise
    try:
        for close in closers:  # the last checkpoint's write finishes (or fails) here
            close()
    except Exception as error:
        if _is_disk_full(error, workdir):
            raise DiskFull(_disk_full_message(workdir, checkpoints)) from None
        raise
    return results


# Below this many free bytes, a failed write into the workdir counts as a full disk.
_NEARLY_FULL = 1 << 20


def _is_disk_full(error: BaseException, workdir: Path) -> bool:
    """ENOSPC (an OSError, or the ValueError / RuntimeError of a TensorStore write), or an
    OSError without errno (numpy's short write: "1152 requested and 992 written") while the
    workdir's device has (almost) no space left."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if isinstance(error, (ValueError, RuntimeError)) and "No space left on device" in str(error):
        return True
    if isinstance(error, OSError):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(workdir).free < _NEARLY_FULL
    return False


def _disk_full_message(workdir: Path, checkpoints: Checkpoints) -> str:
    with contextlib.suppress(Exception):
        checkpoints.manager.reload()
    last = checkpoints.latest()
    kept = (f"the last complete checkpoint (step {last}) and metrics.jsonl are kept"
            if last is not None else "no checkpoint had been written yet")
    return (f"no space left on the device of --workdir={workdir}: {kept}; free some space and "
            "rerun the same command to resume")


class _ResumePoint(NamedTuple):
    """Where the loop starts: the restored (or initial) state and its checkpoint."""

    state: TrainState
    step: int | None  # the checkpoint's step (None: a fresh run)
    meta: dict  # its meta ({} for a fresh run)
    plan: EpochPlan | None  # a mid-epoch checkpoint's plan: its epoch goes on with it


def _resume(run: _Run, checkpoints: Checkpoints, best: BestByValidation,
            writer) -> _ResumePoint:
    """The newest checkpoint that restores (the initial state without one), with the workdir's
    config, metrics.jsonl and best state brought in line with it."""
    config, workdir = run.config, run.workdir
    latest = checkpoints.latest()
    logs.prepare_workdir(workdir, config, resuming=latest is not None,
                         resumable_fields=RESUMABLE_FIELDS, dataset=run.dataset_counts(),
                         path_fields=PATH_FIELDS)
    state, meta, plan = run.initial_state, {}, None
    if latest is not None:
        latest, state, meta, plan = checkpoints.restore_newest(run.initial_state)
        logger.info("resuming from %s, step %d (epoch %s, position %s)",
                    workdir / "checkpoints", latest, meta.get("epoch"), meta.get("position"))
    run.log.truncate(int(state.epoch))
    best.resume(state, meta)
    if latest is None:
        writer.write_hparams({name: str(value) for name, value in
                              logs.flatten(logs.as_json(config.to_dict())).items()})
    return _ResumePoint(state, latest, meta, plan)


def _diverged(bad: _NonFiniteStep, epoch: int, run: _Run, checkpoints: Checkpoints) -> Diverged:
    """The error of a non-finite step: where it happened, and what is saved."""
    last = checkpoints.latest()
    return Diverged(
        f"non-finite loss, gradient or update at epoch {epoch}, step {bad.position + 1} of "
        f"{run.steps_per_epoch} (global step {bad.step}); nothing after the last checkpoint "
        "was saved: " + (f"step {last} in {run.workdir / 'checkpoints'}" if last is not None
                         else "no checkpoint yet")
        + "; lower optimizer.learning_rate or look at the data")


def _training_errors(per_step: dict) -> tuple[float, float | None]:
    """(training error: mean of the per-batch errors, that of the mined triplets: None when
    none was mined): the controller's signals (method.md §3)."""
    training_error = float(np.mean(per_step["batch_errors"]))
    num_mined = float(np.sum(per_step["batch_mined"]))
    mined_error = (float(np.sum(per_step["batch_mined_violations"])) / num_mined
                   if num_mined else None)
    return training_error, mined_error


def _epoch_record(run: _Run, state: TrainState, plan: EpochPlan, epoch: int, per_step: dict,
                  errors: tuple[float, float | None], train_time: EpochTrainTime) -> dict:
    """The epoch's metrics.jsonl record from its steps, their `_training_errors` and its plan
    (`state`: after the epoch)."""
    training_error, mined_error = errors
    kappa_next = float(state.controller.kappa)
    return {
        "epoch": epoch, "step": int(state.step),
        "loss": float(np.mean(per_step["batch_losses"])),
        "training_error": training_error, "training_error_mined": mined_error,
        "controller_error": (mined_error if plan.controller.config.error_on == "mined"
                             else training_error),
        "controller_target": plan.controller.config.target_error,
        # NaN before an "auto" κ₀ is calibrated: logged as None (JSON has no NaN).
        "kappa_next": kappa_next if math.isfinite(kappa_next) else None,
        "learning_rate": float(run.schedule(int(state.step) - 1)),
        **{name: value for name, value in plan.record.items() if name != "seconds"},
        "seconds": {**plan.record["seconds"], "train": train_time.seconds, "eval": 0.0},
        "train_images_per_second": train_time.images_per_second(run.images_per_step),
    }


def _evaluate_epoch(run: _Run, state: TrainState, record: dict,
                    best: BestByValidation) -> dict[str, float]:
    """Adds the test and validation metrics (and the best epoch so far) to the epoch's record;
    returns the test metrics."""
    started = time.perf_counter()
    test = record["test"] = run.evaluate(state)
    if run.val_split is not None:
        record["val"] = run.evaluate(state, "val")
        best.observe(record["epoch"], int(state.step), record["val"])
        record["best_val"] = best.meta().get("best_val")
    record["seconds"]["eval"] = time.perf_counter() - started
    return test


def _train(run: _Run, checkpoints: Checkpoints, best: BestByValidation, writer,
           tqdm) -> dict[str, float]:
    """The epoch loop: plan, train steps, controller update, evaluation, checkpoint."""
    config, workdir = run.config, run.workdir
    resumed = _resume(run, checkpoints, best, writer)
    state = resumed.state
    # A mid-epoch checkpoint: its epoch goes on from its position with its saved plan.
    mid_epoch_step = resumed.step if resumed.plan is not None else None

    final: dict[str, float] | None = None
    epochs = int(config.train.epochs)
    show_progress = bool(config.train.progress) and jax.process_index() == 0
    # Two bars: the run (epochs, overall ETA, what the run is doing) and the epoch's steps.
    run_bar = tqdm(total=epochs, initial=int(state.epoch), desc="run", unit="epoch",
                   disable=not show_progress, position=0)
    with PreemptionGuard() as guard, run_bar:
        for epoch in range(int(state.epoch) + 1, epochs + 1):
            epoch_started = time.perf_counter()
            resuming = mid_epoch_step is not None
            meta = resumed.meta if resuming else None

            # 1. The epoch's plan: embed -> shards -> neighbours -> mine (or draw) batches.
            if resuming:
                plan = resumed.plan
            else:
                run_bar.set_postfix_str(f"epoch {epoch}: " + (
                    "embedding, neighbours, mining" if epoch_plan.mines_in_epoch(config, state)
                    else "drawing batches"))
                plan = epoch_plan.plan_epoch(run.plan_inputs, state, epoch)

            # 2. The train steps on the plan's batches (a resumed epoch from its position).
            run_bar.set_postfix_str(f"epoch {epoch}: training")
            start = int(meta["position"]) if resuming else 0
            per_step = {name: list(meta.get(name, [])) if resuming else []
                        for name in STEP_METRICS.values()}
            time_before = EpochTrainTime.resumed_from(meta, start)
            train_started = time.perf_counter()
            with tqdm(total=run.steps_per_epoch, initial=start,
                      desc=f"epoch {epoch}/{epochs}", unit="step", disable=not show_progress,
                      leave=False, position=1) as progress:
                try:
                    state, step_metrics, stopped = _run_steps(
                        run, state, epoch_plan.local_plan(plan), start, guard, progress)
                except _NonFiniteStep as bad:
                    raise _diverged(bad, epoch, run, checkpoints) from None
            values = jax.device_get(step_metrics)
            for metric, name in STEP_METRICS.items():
                per_step[name] += [float(value[metric]) for value in values]
            train_time = time_before.plus(len(values), time.perf_counter() - train_started)
            if stopped:  # preempted: a mid-epoch checkpoint with the plan, then stop
                position = train_time.position
                checkpoints.save(state, {
                    "epoch": epoch, "position": position, **per_step,
                    **train_time.checkpoint_meta(), **best.meta()}, plan)
                if mid_epoch_step is not None:  # keep one mid-epoch checkpoint at most
                    checkpoints.delete(mid_epoch_step)
                raise Preempted(f"{guard.name}: saved step {int(state.step)} (epoch {epoch}, "
                                f"step {position} of {run.steps_per_epoch}); rerun the same "
                                "command to resume", guard.signum)

            # 3. The controller's update from the epoch's training error.
            errors = _training_errors(per_step)
            state = run.runtime.place_state(state.replace(
                epoch=state.epoch + 1, controller=controller.update(plan.controller, *errors)))
            record = _epoch_record(run, state, plan, epoch, per_step, errors, train_time)
            if resuming:  # the epoch ran in two processes; its times add both parts
                record["resumed_at_position"] = start

            # 4. Evaluation (every train.eval_every epochs and at the end).
            evaluated = epoch % int(config.train.eval_every) == 0 or epoch == epochs
            if evaluated:
                run_bar.set_postfix_str(f"epoch {epoch}: evaluating")
                final = _evaluate_epoch(run, state, record, best)
            record["seconds"]["epoch"] = time_before.seconds + time.perf_counter() - epoch_started
            run.log.append(record)
            run_bar.update()
            writer.write_scalars(epoch, {
                name: value for name, value in logs.flatten(record).items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)})
            writer.flush()

            # 5. The epoch's checkpoint (and the best state, once the meta naming it is saved).
            checkpoints.save(state, {"epoch": epoch, "position": None, **best.meta()})
            if evaluated and best.epoch == epoch:
                best.save(state, record)
                checkpoints.manager.wait_until_finished()  # the meta naming it is on disk
                best.drop_older()
            if mid_epoch_step is not None:
                checkpoints.delete(mid_epoch_step)  # superseded by the epoch's end
                mid_epoch_step = None
            if epoch < epochs and guard.requested(int(state.step)):
                raise Preempted(f"{guard.name}: saved epoch {epoch}; rerun the same command "
                                "to resume", guard.signum)
    if final is None:  # nothing left to train: evaluate the restored state
        final = run.evaluate(state)
    if best.epoch is not None:
        logger.info("best epoch by validation R@1: %d (%.4f); its state: %s", best.epoch,
                    best.value, workdir / "checkpoints_best")
    return final
