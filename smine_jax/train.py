"""Training: the train state, the jitted steps, the smart-mining epoch loop, checkpoints, logs.

One epoch of Smart Mining (method.md §2–3; Harwood et al. 2017, Algorithm 1 and Eqs. 6–8):

    embed the training set (eval mode, jitted, sharded, padded batches: every image once)
      -> write this process's embedding shard under workdir/embeddings/epoch_XXXX
      -> read all shards -> index.neighbours (k nearest other samples of the epoch's anchors;
         each process searches for its own block, the lists are shared)
      -> mining.mine_triplets with κ from the controller (the first mining epoch of
         controller.kappa_init="auto" calibrates κ₀ from the lists first) on every anchor, or
         on a random 1/T of them with T = train.triplets_per_anchor slots each
      -> mining.epoch_triplets (mined share `mining.mined_fraction`; epochs <=
         controller.random_epochs: random triplets only): N triplets an epoch, whatever T
      -> the epoch's triplets to workdir/triplets/epoch_XXXX.npz (`train.save_triplets`)
      -> jitted train steps on batches of `train.batch_size` triplets (augmentation inside the
         step, images gathered by id from the uint8 cache), losses.triplet_objective
      -> training error (mean of the per-batch error) and that of the mined triplets
         -> controller.update (its `error_on` picks the signal)
      -> evaluation on the validation classes (`data.val_classes`) and the test classes every
         `train.eval_every` epochs and at the end; the best epoch by validation R@1 is kept in
         workdir/checkpoints_best
      -> metrics.jsonl, metric writers, checkpoint.

The baselines of the paper's comparison table are variants of the same loop (config fields, see
smine_jax/configs/common.py): in-batch miners (semi-hard, batch-hard, distance-weighted) and
the lifted-structure and N-pairs losses train on m-per-class image batches and skip the
embed / index / mine stages (their time split records 0).

Determinism: every random choice is a function of (seed, epoch, step) through `fold_in` of the
state's base key, so a run resumed from a checkpoint replays exactly what an uninterrupted run
does (on the same device topology). Checkpoints (orbax, `workdir/checkpoints`) are written at
the end of every epoch. On SIGTERM the current step finishes and a mid-epoch checkpoint records
the state and the position in the epoch; on resume the epoch's triplet list is rebuilt by
replaying the mining from the epoch's starting checkpoint (deterministic), and training goes on
from that position. SIGKILL resumes from the last completed epoch.

Data parallelism: `jax.jit` over a `Mesh` of all devices, batches sharded on the `data` axis,
parameters replicated (no pmap). Several processes (jax.distributed): each process embeds its
contiguous slice of the training set, writes its own shard and reads all shards; it searches the
neighbours of the anchors in its slice and the lists are gathered, so every process builds the
same global plan (mining is cheap next to the search) and feeds its slice of every global batch:
a run of P processes trains exactly what one process with P devices trains. The workdir must be
on a filesystem shared by all processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from smine_jax import (
    controller,
    data,
    fileio,
    index,
    logs,
    metrics,
    mining,
    models,
    objectives,
)

logger = logging.getLogger(__name__)

# The in-batch miners and the pair losses are the tables of `objectives` (an entry there is
# accepted here too: `check_config` reads them when it runs).
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

# Independent random streams of one run: fold_in(fold_in(base key, stream), ...).
_INIT, _MINE, _ASSEMBLE, _RANDOM, _STEP, _BATCHES, _ANCHORS = range(7)


class Diverged(RuntimeError):
    """Training stopped at a non-finite loss, gradient or update; the message names the epoch,
    the step and the last checkpoint (nothing non-finite is ever saved)."""


class DiskFull(RuntimeError):
    """A write into the workdir found no space left; what is on disk is consistent."""


class SharedWorkdirError(RuntimeError):
    """Another process's embedding shard never appeared: the workdir is not shared."""


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir restores; the message names the directory."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


class _NonFiniteStep(Exception):
    def __init__(self, position: int, step: int):
        super().__init__(position, step)
        self.position, self.step = position, step


class Preempted(RuntimeError):
    """Training stopped on SIGTERM or SIGINT (Ctrl-C) after saving a checkpoint; rerun the
    same command. `signum` is the signal (the command line exits with 128 + signum)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)


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
    variables = models.init_variables(model, jax.random.fold_in(rng, _INIT), (1, *image_shape),
                                      config.model)
    tx = make_optimizer(config.optimizer, steps_per_epoch)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
        controller=controller.init(config.controller), rng=rng, tx=tx)


def replicated_state(state: TrainState, sharding) -> TrainState:
    """`state` placed with `sharding` (replicated), one buffer per leaf: the train step donates
    the state, and equal leaves may share a buffer (e.g. the controller's NaN fit).

    With several processes every process holds the same state (same seed, or the same
    checkpoint) and places its own copy on its devices: jax.device_put would first check that
    the values agree across processes, which fails on NaN leaves (NaN != NaN)."""
    if jax.process_count() == 1:
        return jax.device_put(jax.tree.map(jnp.copy, state), sharding)

    def place(leaf):
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, state)


def _key(rng, *path: int) -> jax.Array:
    """fold_in(... fold_in(rng, path[0]) ..., path[-1]): one key per (stream, epoch, ...)."""
    for value in path:
        rng = jax.random.fold_in(rng, value)
    return rng


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
        step_key = _key(state.rng, _STEP, state.step)
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


def inbatch_images(config) -> int:
    """Images per batch of the in-batch variants (default: 3 × batch_size, as a triplet batch)."""
    return int(config.train.inbatch_images) or 3 * int(config.train.batch_size)


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


def _local_block(num_samples: int) -> np.ndarray:
    """This process's contiguous block of sample ids (as `data.inference_batches` shards)."""
    return np.array_split(np.arange(num_samples, dtype=np.int32),
                          jax.process_count())[jax.process_index()]


def _pad_rows(rows: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows padded to num_rows by repeating its first rows, mask True for the real rows)."""
    mask = np.zeros(num_rows, bool)
    mask[:len(rows)] = True
    if len(rows) < num_rows:
        filler = np.resize(rows, (num_rows - len(rows), *rows.shape[1:]))
        rows = np.concatenate([rows, filler])
    return rows, mask


# ----------------------------------------------------------------------------------------------
# Preemption.


class _EpochTrainTime(NamedTuple):
    """An epoch's train time so far: `seconds` cover `steps_timed` of its first `position` steps.

    A resumed epoch adds the time its mid-epoch checkpoint carries, so its images/s covers both
    processes. Checkpoints of older versions carry none; then only this process's steps are
    timed, and the time must not be stored as the whole epoch's.
    """

    seconds: float
    steps_timed: int
    position: int

    @classmethod
    def resumed_from(cls, meta: dict | None, start: int) -> _EpochTrainTime:
        """The time before this process: that of the checkpoint resumed at `start` (None: a
        fresh epoch); an older checkpoint without "train_seconds" times none of its steps."""
        if meta is not None and "train_seconds" in meta:
            return cls(float(meta["train_seconds"]), start, start)
        return cls(0.0, 0, start)

    def plus(self, steps: int, seconds: float) -> _EpochTrainTime:
        """The time after `steps` more steps that took `seconds`."""
        return type(self)(self.seconds + seconds, self.steps_timed + steps, self.position + steps)

    def checkpoint_meta(self) -> dict[str, float]:
        """{"train_seconds": ...} for a mid-epoch checkpoint, when it covers every step so far."""
        return {"train_seconds": self.seconds} if self.steps_timed == self.position else {}

    def images_per_second(self, images_per_step: int) -> float:
        return self.steps_timed * images_per_step / max(self.seconds, 1e-9)


class _PreemptionGuard:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a request to stop after the current step (main
    thread only); `name` and `signum` say which came.

    Multi-process runs ask jax's preemption sync point instead, so that every process stops
    at the same step (it needs jax.distributed.initialize, which installs its own notifier).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._requested = False
        self._previous = {}
        self.signum = signal.SIGTERM

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle)
                              for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        logger.warning("%s: stopping after the current step", self.name)
        self._requested = True

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._requested

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


def _gather_rows(rows):
    """The rows of every process, concatenated in process order (`rows` itself with one
    process); the parts may differ in length."""
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    rows = np.asarray(rows)
    counts = np.asarray(multihost_utils.process_allgather(np.int32(len(rows)))).reshape(-1)
    padded = np.zeros((int(counts.max()), *rows.shape[1:]), rows.dtype)
    padded[:len(rows)] = rows
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([part[:count] for part, count in zip(gathered, counts, strict=True)])


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _sync(name: str) -> None:
    """Barrier across processes (no-op with one process). Every process must pass the same
    `name`: no absolute paths in it (a workdir spelled differently must still meet)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------
# The trainer.


@dataclasses.dataclass
class _EpochPlan:
    """One epoch's global batches (the same on every process): ids [steps, rows(, 3)], mask,
    and which triplets were mined ([steps, rows]; all False for image batches). Each process
    feeds its slice of every batch (`_Trainer.local_plan`). A mid-epoch checkpoint saves it
    (`_Checkpoints.save`), so a resumed epoch goes on with the same batches without embedding,
    indexing and mining again."""

    ids: np.ndarray
    mask: np.ndarray
    mined: np.ndarray
    record: dict  # what the plan's construction logs (κ, mined fraction, fallbacks, seconds)
    # The epoch's controller (κ₀ calibrated if "auto"), on the host: the train steps donate the
    # state it came from.
    controller: controller.ControllerState
    # The in-batch boundary κ of the epoch's train steps (`mining.inbatch_kappa`; 0: none).
    kappa: float = 0.0


def _record_without_mining() -> tuple[dict, dict]:
    """(record, seconds) of an epoch plan that does not mine; a mining epoch fills them in."""
    return ({"mining": False, "kappa": None, "mined_fraction": 0.0, "mined_fraction_target": 0.0},
            {"embed": 0.0, "index": 0.0, "mine": 0.0})


class _NeighbourLists(NamedTuple):
    """A mining epoch's neighbour lists of all its anchors (the same on every process) and the
    controller they set."""

    labels: np.ndarray  # i32[N] of the embedded training set
    anchors: np.ndarray  # the epoch's anchor ids
    ids: jax.Array  # i32[A, k]
    sq_dists: jax.Array  # f32[A, k]
    controller: controller.ControllerState  # κ₀ calibrated from the lists where "auto"
    record: dict  # kappa, k, anchors, kappa_calibrated
    seconds: dict  # embed, index


class _Trainer:
    """The epoch loop's I/O shell around the pure pieces (one instance per run)."""

    def __init__(self, config, workdir: Path):
        self.config = config
        self.workdir = workdir
        self.kind = str(config.mining.kind)
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        progress = bool(config.train.progress) and jax.process_index() == 0

        dataset = data.build_dataset(config.data, progress=progress)
        self.full_counts = dict(dataset.counts())
        dataset = subset_dataset(dataset, max_classes=int(config.subset.max_classes),
                                 max_per_class=int(config.subset.max_per_class))
        self.train = data.load(config.data, split="train", dataset=dataset, progress=progress)
        self.val = data.load(config.data, split="val", dataset=dataset, progress=progress)
        self.test = data.load(config.data, split="test", dataset=dataset, progress=progress)
        self.labels = np.asarray(self.train.labels, np.int32)
        self.num_train = len(self.train)
        self._check_data()

        self.model = models.build_model(config.model)
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
        # every process); each process feeds its slice of every batch (`_local_part`).
        process_count = jax.process_count()
        if self.kind == "smart":
            self.steps_per_epoch = math.ceil(self.num_train / int(config.train.batch_size))
        else:  # as many images an epoch as the triplet variants: 3 per triplet
            self.steps_per_epoch = math.ceil(3 * self.num_train / inbatch_images(config))
        self.embed_local_batch = int(config.train.embed_batch_size) // process_count

        self.initial_state = self.own_buffers(
            create_train_state(config, self.model, image_shape, self.steps_per_epoch))
        self.schedule = learning_rate_schedule(config.optimizer, self.steps_per_epoch)
        step = make_train_step(self.model, make_objective(config), augment)
        self.train_step = jax.jit(step, donate_argnums=(0,),
                                  out_shardings=(self.replicated, self.replicated))
        self.embed = jax.jit(make_embed_fn(self.model, center),
                             out_shardings=self.batch_sharding)
        self.log = logs.MetricsLog(workdir / "metrics.jsonl")
        self.step_compiled = False  # the train step has run once in this process

    # -- setup helpers ---------------------------------------------------------------------

    def own_buffers(self, state: TrainState) -> TrainState:
        return replicated_state(state, self.replicated)

    def dataset_counts(self) -> dict:
        """Images and classes of the whole dataset and of the splits this run uses (subset)."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {"dataset": self.full_counts, **{
            name: {"images": len(split), "classes": int(split.num_classes),
                   **({"skipped_unreadable": len(split.skipped)} if split.skipped else {})}
            for name, split in splits.items() if split is not None}}

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

    def neighbour_count(self) -> int:
        """k of method.md §2: `mining.k`, or 2 × the largest training class; at most N − 1."""
        k = int(self.config.mining.k) or 2 * int(np.bincount(self.labels).max())
        return min(k, self.num_train - 1)

    def put(self, local: np.ndarray, sharding=None) -> jax.Array:
        """A global array from this process's part of a batch (the whole batch on one host)."""
        sharding = sharding or self.batch_sharding
        if jax.process_count() == 1:
            return jax.device_put(local, sharding)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    def batches(self, images: np.ndarray, id_batches: Iterator) -> Iterator[jax.Array]:
        if jax.process_count() == 1:
            return data.prefetch_batches(images, id_batches, size=int(self.config.train.prefetch),
                                         sharding=self.batch_sharding)
        return (self.put(data.gather(images, ids)) for ids in id_batches)

    @staticmethod
    def local_rows(array: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded global array, in order."""
        if jax.process_count() == 1:
            return np.asarray(array)
        shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        unique = {shard.index[0].start: shard for shard in shards}
        return np.concatenate([np.asarray(shard.data) for shard in unique.values()])

    # -- stages ----------------------------------------------------------------------------

    def embed_split(self, state: TrainState, split, directory: Path):
        """Embeds every image of `split` once (eval mode) into shards under `directory`;
        returns all shards read back: (embeddings f32[N, D], labels i32[N], ids i64[N])."""
        images = split.images
        batch_size = self.embed_local_batch
        num_batches = math.ceil(math.ceil(len(images) / jax.process_count()) / batch_size)
        padding = data.InferenceBatch(
            ids=np.full(batch_size, -1, np.int32),
            images=np.zeros((batch_size, *images.shape[1:]), np.uint8),
            mask=np.zeros(batch_size, bool))
        batches = itertools.chain(
            data.inference_batches(images, batch_size, shard_index=jax.process_index(),
                                   num_shards=jax.process_count()), itertools.repeat(padding))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        outputs = [(batch, self.embed(variables, self.put(batch.images)))
                   for batch in itertools.islice(batches, num_batches)]
        ids = np.concatenate([batch.ids[batch.mask] for batch, _ in outputs])
        embeddings = np.concatenate([self.local_rows(out)[batch.mask] for batch, out in outputs])
        index.write_shard(directory, embeddings, np.asarray(split.labels)[ids], ids,
                          shard=jax.process_index(), num_shards=jax.process_count())
        _sync(f"shards {directory.name}")
        if jax.process_count() > 1:
            try:
                index.wait_for_shards(directory, jax.process_count(),
                                      timeout=float(self.config.train.shard_timeout))
            except index.ShardError as error:
                raise SharedWorkdirError(str(error)) from None
        embeddings, labels, ids = index.read_shards(directory)
        if not np.array_equal(ids, np.arange(len(images))):
            raise RuntimeError(f"{directory}: the embedding dump does not cover every image once")
        return embeddings, labels, ids

    def _epoch_anchors(self, state: TrainState, epoch: int) -> np.ndarray:
        """The anchors of a mining epoch (the same on every process): every id, or with T =
        `train.triplets_per_anchor` > 1 a random ⌈N/T⌉ of them (sorted; a function of (seed,
        epoch)), so that an epoch still trains on N triplets."""
        ids = np.arange(self.num_train, dtype=np.int32)
        per_anchor = int(self.config.train.triplets_per_anchor)
        if per_anchor == 1:
            return ids
        seed = np.asarray(jax.device_get(_key(state.rng, _ANCHORS, epoch, 0)))
        chosen = np.random.default_rng(seed.tolist()).choice(
            len(ids), size=math.ceil(len(ids) / per_anchor), replace=False)
        return ids[np.sort(chosen)]

    def _local_part(self, batches: np.ndarray) -> np.ndarray:
        """This process's slice of every global batch ([steps, batch, ...] -> [steps,
        batch / processes, ...]): process p feeds rows p·b … (p + 1)·b − 1 of each."""
        if jax.process_count() == 1:
            return batches
        size = batches.shape[1] // jax.process_count()
        start = jax.process_index() * size
        return batches[:, start:start + size]

    def mines_in_epoch(self, state: TrainState) -> bool:
        """Whether the epoch that starts from `state` embeds, indexes and mines."""
        if self.kind == "smart":
            return bool(state.controller.mining) and float(self.config.mining.mined_fraction) > 0
        return bool(state.controller.mining) and self.config.mining.batches == "index"

    def _neighbour_lists(self, state: TrainState, epoch: int) -> _NeighbourLists:
        """Embed the training set -> shards -> k nearest neighbours of the epoch's anchors (each
        process searches for those in its block, then all processes share the lists);
        calibrates κ₀ from the lists at the first mining epoch of kappa_init="auto"."""
        config, ctrl = self.config, state.controller
        start = time.perf_counter()
        dump = self.workdir / "embeddings" / f"epoch_{epoch:04d}"
        embeddings, labels, _ = self.embed_split(state, self.train, dump)
        self._remove_old_dumps(keep=dump)
        embedded = time.perf_counter()
        anchors = self._epoch_anchors(state, epoch)
        own = anchors[np.isin(anchors, _local_block(self.num_train))]
        neighbour_ids, sq_dists = index.neighbours(
            embeddings, self.neighbour_count(), backend=str(config.mining.backend),
            query_ids=own, **self._index_options())
        neighbour_ids, sq_dists = _gather_rows(neighbour_ids), _gather_rows(sq_dists)
        record: dict = {}
        if controller.needs_initial_kappa(ctrl):
            ratios = mining.boundary_ratios(neighbour_ids, sq_dists, labels, anchor_ids=anchors,
                                            chunk_size=int(config.mining.chunk_size))
            ctrl = controller.set_initial_kappa(ctrl, controller.kappa_for_share(
                ratios, ctrl.config.kappa_init_share))
            record["kappa_calibrated"] = True
        record.update(kappa=float(ctrl.kappa), k=self.neighbour_count(), anchors=len(anchors))
        return _NeighbourLists(labels, anchors, neighbour_ids, sq_dists, ctrl, record,
                               {"embed": embedded - start,
                                "index": time.perf_counter() - embedded})

    def _triplet_plan(self, state: TrainState, epoch: int) -> _EpochPlan:
        config, ctrl = self.config, state.controller
        fraction = float(config.mining.mined_fraction)
        record, seconds = _record_without_mining()
        if self.mines_in_epoch(state):
            lists = self._neighbour_lists(state, epoch)
            ctrl, labels = lists.controller, lists.labels
            started = time.perf_counter()
            mined, info = mining.mine_triplets(
                _key(state.rng, _MINE, epoch), lists.ids, lists.sq_dists, labels,
                float(ctrl.kappa), triplets_per_anchor=int(config.train.triplets_per_anchor),
                anchor_ids=lists.anchors, chunk_size=int(config.mining.chunk_size))
            triplets, stats = mining.epoch_triplets(
                _key(state.rng, _ASSEMBLE, epoch, 0), mined, labels,
                mined_fraction=fraction, num_triplets=self.num_train)
            summary = jax.device_get(mining.mining_summary(mined, info))
            triplets = jax.device_get(triplets)
            seconds.update(lists.seconds, mine=time.perf_counter() - started)
            record.update(lists.record, mining=True, mined_fraction=float(stats.mined_fraction),
                          mined_fraction_target=fraction,
                          fallbacks={name: int(value) for name, value in summary.items()})
        else:
            triplets = jax.device_get(mining.random_triplets(
                _key(state.rng, _RANDOM, epoch, 0), self.labels, self.num_train))
        rows = np.stack([triplets.anchor, triplets.positive, triplets.negative], axis=1)
        mined_flags = np.asarray(triplets.mined, bool)
        if bool(config.train.save_triplets):
            self._save_triplets(epoch, rows, mined_flags)
        batch_size = int(config.train.batch_size)
        num_rows = self.steps_per_epoch * batch_size
        ids, mask = _pad_rows(rows.astype(np.int32), num_rows)
        mined_flags = np.concatenate([mined_flags, np.zeros(num_rows - len(rows), bool)])
        record["seconds"] = seconds
        shape = (self.steps_per_epoch, batch_size)
        return _EpochPlan(ids.reshape(*shape, 3), mask.reshape(shape),
                          mined_flags.reshape(shape), record, jax.device_get(ctrl))

    def _image_plan(self, state: TrainState, epoch: int) -> _EpochPlan:
        """m-per-class image batches: at random, or (`mining.batches="index"`, mining epochs)
        built from the neighbour lists by `mining.index_batches`."""
        config, ctrl = self.config, state.controller
        m = int(config.train.samples_per_class)
        record, seconds = _record_without_mining()
        key = _key(state.rng, _BATCHES, epoch, 0)
        images = inbatch_images(config)
        if self.mines_in_epoch(state):
            lists = self._neighbour_lists(state, epoch)
            ctrl = lists.controller
            started = time.perf_counter()
            fraction = float(config.mining.mined_fraction)
            ids, mask, info = mining.index_batches(
                key, lists.ids, lists.sq_dists, lists.labels, float(ctrl.kappa),
                classes_per_batch=images // m, samples_per_class=m,
                num_batches=self.steps_per_epoch, smart_fraction=fraction,
                anchor_ids=lists.anchors, chunk_size=int(config.mining.chunk_size))
            ids, mask, info = jax.device_get((ids, mask, info))
            seconds.update(lists.seconds, mine=time.perf_counter() - started)
            pair_slots = self.steps_per_epoch * (images // m // 2)
            record.update(lists.record, mining=True, mined_fraction_target=fraction,
                          mined_fraction=float(np.sum(info.smart_pairs)) / max(pair_slots, 1),
                          index_batches={
                              "smart_pairs_per_batch": float(np.mean(info.smart_pairs)),
                              "random_classes_per_batch": float(np.mean(info.random_classes)),
                              "seeds_available": int(info.seeds_available)})
        else:
            seed = np.asarray(jax.device_get(key))
            ids = data.m_per_class_batches(
                self.labels, images, m, seed=np.random.default_rng(seed.tolist()),
                num_batches=self.steps_per_epoch)
            mask = np.ones(ids.shape, bool)
        record["seconds"] = seconds
        kappa = float(ctrl.kappa) if (config.mining.inbatch_kappa
                                      and bool(ctrl.mining)) else 0.0
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
        return _EpochPlan(ids, mask, np.zeros(ids.shape, bool), record, jax.device_get(ctrl),
                          kappa=kappa if np.isfinite(kappa) else 0.0)

    def plan_epoch(self, state: TrainState, epoch: int) -> _EpochPlan:
        """The epoch's batches, a pure function of (state at the epoch's start, epoch)."""
        if self.kind == "smart":
            return self._triplet_plan(state, epoch)
        return self._image_plan(state, epoch)

    def local_plan(self, plan: _EpochPlan) -> _EpochPlan:
        """`plan` with this process's slice of every batch."""
        return dataclasses.replace(plan, **{name: self._local_part(getattr(plan, name))
                                            for name in ("ids", "mask", "mined")})

    def _save_triplets(self, epoch: int, rows: np.ndarray, mined: np.ndarray) -> None:
        """workdir/triplets/epoch_EEEE.npz: the epoch's triplets (train-split ids, columns
        anchor / positive / negative, in training order) and which were mined; process 0
        writes it (the plan is the same on every process)."""
        if jax.process_index():
            return
        path = self.workdir / "triplets" / f"epoch_{epoch:04d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(handle):
            np.savez(handle, anchor=rows[:, 0], positive=rows[:, 1], negative=rows[:, 2],
                     mined=mined, labels=self.labels[rows])

        fileio.write_atomically(path, write)

    def _index_options(self) -> dict:
        if self.config.mining.backend == "scann":
            return {"mode": str(self.config.mining.scann_mode)}
        return {}

    def _remove_old_dumps(self, keep: Path) -> None:
        """Keeps only the latest epoch's embedding dump."""
        _sync(f"dumps read {keep.name}")
        if jax.process_index():
            return
        for path in keep.parent.glob("epoch_*"):
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    def evaluate(self, state: TrainState, split: str = "test") -> dict[str, float]:
        """metrics.evaluate on the test (or "val": validation) classes (Recall@K, NMI, MAP@R,
        R-precision)."""
        embeddings, labels, _ = self.embed_split(state, getattr(self, split),
                                                 self.workdir / "embeddings" / split)
        results = metrics.evaluate(embeddings, labels, seed=int(self.config.seed))
        return {name: float(value) for name, value in results.items()}


# ----------------------------------------------------------------------------------------------
# Checkpoints.


class _Checkpoints:
    """orbax CheckpointManager in workdir/checkpoints; items "state", "meta" (JSON) and, in a
    mid-epoch checkpoint, "plan" (the epoch's global batches and controller, `_EpochPlan`).

    meta: {"epoch": epoch of the checkpoint, "position": steps done in that epoch (None at an
    epoch boundary), "epoch_start_step": checkpoint step of the epoch's start (None: the
    initial state), "batch_losses", "batch_errors", "batch_mined", "batch_mined_violations":
    per-step values so far (mid-epoch only, `_STEP_METRICS`), "train_seconds": seconds spent
    training those steps (so a resumed epoch reports its whole train time; absent when this
    process did not time them all, see _EpochTrainTime), "plan": the plan's record and
    in-batch κ (mid-epoch only), "best_val": the best epoch by validation R@1 so far
    (`_BestByValidation`)}.
    """

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            os.fspath(directory.absolute()),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                # Saved in the calling thread: a failed write (a full disk) is an error here,
                # at its epoch, not a background thread's traceback later. The states are
                # small next to an epoch (MBs; ~0.1 s on Omniglot).
                enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest(self, initial_state: TrainState):
        """(step, state, meta, plan) of the newest checkpoint that restores; plan: the epoch's
        `_EpochPlan` of a mid-epoch checkpoint, None at an epoch boundary.

        A damaged checkpoint (truncated or missing file, invalid JSON) is skipped with a
        warning naming it and moved to `<dir>_damaged/<step>` (kept, out of the way of the
        steps the run saves again). If none restores: CheckpointError naming the directory.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta, plan = self.restore(step, initial_state)
            except Exception as error:  # any failure to read it: try an older checkpoint
                reason = f"{type(error).__name__}: {_first_line(error)}"
                logger.warning("checkpoint %s does not restore (%s); trying an older one",
                               self.directory / str(step), reason)
                damaged.append((step, reason))
                continue
            if damaged:
                self._set_aside([step for step, _ in damaged])
                logger.warning("resuming from step %d instead of the damaged step(s) %s, moved "
                               "to %s", step, [s for s, _ in damaged],
                               self.directory.with_name(self.directory.name + "_damaged"))
            return step, state, meta, plan
        newest, reason = damaged[0]
        raise CheckpointError(
            f"{self.directory}: no checkpoint restores (the newest, step {newest}: {reason}); "
            "move the folder aside to start afresh")

    def _set_aside(self, steps) -> None:
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + "_damaged")
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(self.directory / str(step), target)
        _sync(f"damaged checkpoints moved {self.directory.name}")
        self.manager.reload()

    def restore(self, step: int, like: TrainState
                ) -> tuple[TrainState, dict, _EpochPlan | None]:
        """(state, meta, plan) of `step`, the state placed and typed as `like`; plan: None
        unless the checkpoint is mid-epoch."""
        ocp = self.ocp
        meta = dict(self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)
        items = {"state": ocp.args.StandardRestore(_abstract(like))}
        if meta.get("position") is not None:
            items["plan"] = ocp.args.StandardRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        plan = None
        if meta.get("position") is not None:
            saved = restored.plan
            template = jax.device_get(like.controller)
            ctrl = serialization.from_state_dict(template, jax.tree.map(
                lambda t, v: np.asarray(v, np.asarray(t).dtype),
                serialization.to_state_dict(template), dict(saved["controller"])))
            plan = _EpochPlan(np.asarray(saved["ids"], np.int32), np.asarray(saved["mask"], bool),
                              np.asarray(saved["mined"], bool), dict(meta["plan"]["record"]),
                              ctrl, kappa=float(meta["plan"]["kappa"]))
        return restored.state, meta, plan

    def save(self, state: TrainState, meta: dict, plan: _EpochPlan | None = None) -> None:
        """Saves `state` with `meta` (and a mid-epoch checkpoint's `plan`) at its step."""
        ocp = self.ocp
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        self._check_space()
        items = {"state": ocp.args.StandardSave(state)}
        if plan is not None:
            items["plan"] = ocp.args.StandardSave({
                "ids": plan.ids, "mask": plan.mask, "mined": plan.mined,
                "controller": serialization.to_state_dict(plan.controller)})
            meta = {**meta, "plan": {"record": plan.record, "kappa": plan.kappa}}
        self.manager.save(step, args=ocp.args.Composite(
            meta=ocp.args.JsonSave(meta), **items), force=True)

    def _check_space(self) -> None:
        """Raises ENOSPC before a save that cannot fit: the previous checkpoint's size (plus a
        margin) must be free. A write that fails inside orbax leaves its pending TensorStore
        writes printing tracebacks after the error, so a known-full disk is caught here."""
        latest = self.manager.latest_step()
        if latest is None:
            return
        folder = self.directory / str(latest)
        try:
            needed = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            free = shutil.disk_usage(self.directory).free
        except OSError:  # cannot tell: let the save itself find out
            return
        if free < needed * _SAVE_MARGIN + _SAVE_SLACK:
            raise OSError(errno.ENOSPC, f"No space left on device: {free} bytes free, a "
                          f"checkpoint takes about {needed}", str(self.directory))

    def delete(self, step: int) -> None:
        if step in self.manager.all_steps():
            self.manager.delete(step)

    def close(self) -> None:
        """Waits for the pending save (raising its error) and closes the manager either way."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


class _BestByValidation:
    """The best epoch by validation R@1 so far, and its state in workdir/checkpoints_best.

    The regular checkpoints' meta carries {"best_val": {"epoch", "step", "recall@1"}}, so a
    resumed run knows the best so far; the best state is saved (orbax, meta: epoch, val and
    test metrics) right after the regular checkpoint of its epoch, and the previous best is
    deleted (`drop_older`) only once both are on disk. On resume the best states other than the
    restored meta's are dropped (one saved after the restored checkpoint: its epoch is trained
    again), and a best of the restored epoch whose save did not land is written from the
    restored state.
    """

    METRIC = "recall@1"

    def __init__(self, directory: Path):
        self.directory = directory
        self._checkpoints: _Checkpoints | None = None
        self.epoch = self.step = None
        self.value = -math.inf

    @property
    def checkpoints(self) -> _Checkpoints:
        if self._checkpoints is None:  # created on first use: runs without a validation split
            self._checkpoints = _Checkpoints(self.directory, keep=2)  # never make the folder
        return self._checkpoints

    def resume(self, state: TrainState, meta: dict) -> None:
        """The best so far from a restored checkpoint's meta (none for a fresh run)."""
        saved = meta.get("best_val") or {}
        self.epoch, self.step = saved.get("epoch"), saved.get("step")
        self.value = float(saved.get(self.METRIC, -math.inf))
        if self.directory.exists():  # drop a best saved after the restored checkpoint
            for step in self.checkpoints.manager.all_steps():
                if step != self.step:
                    self.checkpoints.delete(step)
        if self.step is not None and self.step == int(state.step) and (
                self.checkpoints.latest() is None):
            self.checkpoints.save(state, {"epoch": self.epoch, "val": {self.METRIC: self.value}})

    def observe(self, epoch: int, step: int, val_metrics: dict) -> None:
        value = float(val_metrics[self.METRIC])
        if value > self.value:
            self.epoch, self.step, self.value = epoch, step, value

    def meta(self) -> dict:
        if self.epoch is None:
            return {}
        return {"best_val": {"epoch": self.epoch, "step": self.step, self.METRIC: self.value}}

    def save(self, state: TrainState, record: dict) -> None:
        """Saves the new best state; the previous one stays until `drop_older`."""
        self.checkpoints.save(state, {"epoch": record["epoch"], "val": record["val"],
                                      "test": record["test"]})

    def drop_older(self) -> None:
        """Deletes every best state but the current one, once it is on disk (call it once the
        regular checkpoint whose meta names it is on disk too)."""
        self.checkpoints.manager.wait_until_finished()
        for step in self.checkpoints.manager.all_steps():
            if step != self.step:
                self.checkpoints.delete(step)

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()


def _abstract(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


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


def _run_steps(trainer: _Trainer, state: TrainState, plan: _EpochPlan, start: int,
               guard: _PreemptionGuard, progress) -> tuple[TrainState, list, bool]:
    """Train steps `start`.. of the epoch's plan; returns (state, per-step metrics, stopped).

    Raises _NonFiniteStep (position in the epoch, global step) when a step was not finite,
    found by a look at the steps' flags every FINITE_CHECK_EVERY steps and at the end.
    """
    labels = trainer.labels
    step_metrics, checked = [], 0
    # The global step after each position, known on the host: no device sync per step.
    first_step = int(state.step) - start
    positions = range(start, trainer.steps_per_epoch)
    images = trainer.batches(trainer.train.images, (plan.ids[i] for i in positions))
    try:
        for position, batch in zip(positions, images, strict=True):
            ids = plan.ids[position]
            batch_labels = labels[ids[:, 0] if ids.ndim == 2 else ids]
            compiling = not trainer.step_compiled and not progress.disable
            if compiling:
                progress.set_postfix_str("compiling the train step")
            state, values = trainer.train_step(state, batch, trainer.put(batch_labels),
                                               trainer.put(plan.mask[position]),
                                               trainer.put(plan.mined[position]),
                                               np.float32(plan.kappa))
            step_metrics.append(values)
            if compiling:  # the rate (and ETA) counts from here, not from the compile
                jax.block_until_ready(values["loss"])
                progress.reset()
                progress.update(position)
                progress.set_postfix_str("")
            trainer.step_compiled = True
            progress.update()
            if not progress.disable and (position % 10 == 0
                                         or position + 1 == trainer.steps_per_epoch):
                latest = jax.device_get(values)
                progress.set_postfix(loss=f"{latest['loss']:.4f}",
                                     error=f"{latest['training_error']:.3f}")
            if len(step_metrics) - checked >= FINITE_CHECK_EVERY:
                checked = _check_finite(step_metrics, checked, start, first_step)
            if (position + 1 < trainer.steps_per_epoch
                    and guard.requested(first_step + position + 1)):
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
    trainer = _Trainer(config, workdir)
    checkpoints = _Checkpoints(workdir / "checkpoints", int(config.train.checkpoints_to_keep))
    best = _BestByValidation(workdir / "checkpoints_best")
    writer = logs.create_metric_writer(workdir)
    closers = (checkpoints.close, best.close, writer.flush, writer.close)
    try:
        results = _train(trainer, checkpoints, best, writer, tqdm)
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
# A checkpoint is saved only with this many times the previous one's size, plus the slack in
# bytes, free.
_SAVE_MARGIN = 1.1
_SAVE_SLACK = 1 << 16


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


def _disk_full_message(workdir: Path, checkpoints: _Checkpoints) -> str:
    with contextlib.suppress(Exception):
        checkpoints.manager.reload()
    last = checkpoints.latest()
    kept = (f"the last complete checkpoint (step {last}) and metrics.jsonl are kept"
            if last is not None else "no checkpoint had been written yet")
    return (f"no space left on the device of --workdir={workdir}: {kept}; free some space and "
            "rerun the same command to resume")


# Per-step values a mid-epoch checkpoint carries (train step metric -> meta field).
_STEP_METRICS = {"loss": "batch_losses", "training_error": "batch_errors",
                 "num_mined": "batch_mined", "mined_violations": "batch_mined_violations"}


def _train(trainer: _Trainer, checkpoints: _Checkpoints, best: _BestByValidation, writer,
           tqdm) -> dict[str, float]:
    config, workdir = trainer.config, trainer.workdir
    latest = checkpoints.latest()
    logs.prepare_workdir(workdir, config, resuming=latest is not None,
                         resumable_fields=RESUMABLE_FIELDS, dataset=trainer.dataset_counts(),
                         path_fields=PATH_FIELDS)
    state = trainer.initial_state
    meta: dict = {}
    resumed_plan = None
    if latest is not None:
        latest, state, meta, resumed_plan = checkpoints.restore_newest(trainer.initial_state)
        logger.info("resuming from %s, step %d (epoch %s, position %s)",
                    workdir / "checkpoints", latest, meta.get("epoch"), meta.get("position"))
    # A mid-epoch checkpoint: the epoch goes on with its saved plan.
    mid_epoch_step = latest if resumed_plan is not None else None
    epoch_start_step = meta.get("epoch_start_step") if resumed_plan is not None else None
    trainer.log.truncate(int(state.epoch))
    best.resume(state, meta)
    if latest is None:
        writer.write_hparams({name: str(value) for name, value in
                              logs.flatten(logs.as_json(config.to_dict())).items()})

    final: dict[str, float] | None = None
    epochs = int(config.train.epochs)
    images_per_step = (3 * int(config.train.batch_size) if trainer.kind == "smart"
                       else inbatch_images(config))
    show_progress = bool(config.train.progress) and jax.process_index() == 0
    # Two bars: the run (epochs, overall ETA, what the run is doing) and the epoch's steps.
    run_bar = tqdm(total=epochs, initial=int(state.epoch), desc="run", unit="epoch",
                   disable=not show_progress, position=0)
    with _PreemptionGuard() as guard, run_bar:
        for epoch in range(int(state.epoch) + 1, epochs + 1):
            epoch_started = time.perf_counter()
            resuming = mid_epoch_step is not None
            if resuming:
                plan = resumed_plan
            else:
                epoch_start_step = int(state.step) if int(state.epoch) > 0 else None
                run_bar.set_postfix_str(f"epoch {epoch}: " + (
                    "embedding, neighbours, mining" if trainer.mines_in_epoch(state)
                    else "drawing batches"))
                plan = trainer.plan_epoch(state, epoch)
            run_bar.set_postfix_str(f"epoch {epoch}: training")
            start = int(meta["position"]) if resuming else 0
            per_step = {name: list(meta.get(name, [])) if resuming else []
                        for name in _STEP_METRICS.values()}
            time_before = _EpochTrainTime.resumed_from(meta if resuming else None, start)
            train_started = time.perf_counter()
            with tqdm(total=trainer.steps_per_epoch, initial=start,
                      desc=f"epoch {epoch}/{epochs}", unit="step", disable=not show_progress,
                      leave=False, position=1) as progress:
                try:
                    state, step_metrics, stopped = _run_steps(
                        trainer, state, trainer.local_plan(plan), start, guard, progress)
                except _NonFiniteStep as bad:
                    last = checkpoints.latest()
                    raise Diverged(
                        f"non-finite loss, gradient or update at epoch {epoch}, step "
                        f"{bad.position + 1} of {trainer.steps_per_epoch} (global step "
                        f"{bad.step}); nothing after the last checkpoint was saved: "
                        + (f"step {last} in {workdir / 'checkpoints'}" if last is not None
                           else "no checkpoint yet")
                        + "; lower optimizer.learning_rate or look at the data") from None
            values = jax.device_get(step_metrics)
            for metric, name in _STEP_METRICS.items():
                per_step[name] += [float(value[metric]) for value in values]
            train_time = time_before.plus(len(values), time.perf_counter() - train_started)
            position = train_time.position
            if stopped:
                checkpoints.save(state, {
                    "epoch": epoch, "position": position, "epoch_start_step": epoch_start_step,
                    **per_step, **train_time.checkpoint_meta(), **best.meta()}, plan)
                if mid_epoch_step is not None:  # keep one mid-epoch checkpoint at most
                    checkpoints.delete(mid_epoch_step)
                raise Preempted(f"{guard.name}: saved step {int(state.step)} (epoch {epoch}, "
                                f"step {position} of {trainer.steps_per_epoch}); rerun the "
                                "same command to resume", guard.signum)
            training_error = float(np.mean(per_step["batch_errors"]))
            num_mined = float(np.sum(per_step["batch_mined"]))
            mined_error = (float(np.sum(per_step["batch_mined_violations"])) / num_mined
                           if num_mined else None)
            state = trainer.own_buffers(state.replace(
                epoch=state.epoch + 1,
                controller=controller.update(plan.controller, training_error, mined_error)))
            record = {
                "epoch": epoch, "step": int(state.step),
                "loss": float(np.mean(per_step["batch_losses"])),
                "training_error": training_error, "training_error_mined": mined_error,
                "controller_error": (mined_error if plan.controller.config.error_on == "mined"
                                     else training_error),
                "controller_target": plan.controller.config.target_error,
                # NaN before an "auto" κ₀ is calibrated: logged as None (JSON has no NaN).
                "kappa_next": _finite_or_none(float(state.controller.kappa)),
                "learning_rate": float(trainer.schedule(int(state.step) - 1)),
                **{name: value for name, value in plan.record.items() if name != "seconds"},
                "seconds": {**plan.record["seconds"], "train": train_time.seconds, "eval": 0.0},
                "train_images_per_second": train_time.images_per_second(images_per_step),
            }
            if resuming:  # the epoch ran in two processes; its times add both parts
                record["resumed_at_position"] = start
            evaluated = epoch % int(config.train.eval_every) == 0 or epoch == epochs
            if evaluated:
                run_bar.set_postfix_str(f"epoch {epoch}: evaluating")
                eval_started = time.perf_counter()
                final = trainer.evaluate(state)
                record["test"] = final
                if trainer.val is not None:
                    record["val"] = trainer.evaluate(state, "val")
                    best.observe(epoch, int(state.step), record["val"])
                    record["best_val"] = best.meta().get("best_val")
                record["seconds"]["eval"] = time.perf_counter() - eval_started
            record["seconds"]["epoch"] = time_before.seconds + time.perf_counter() - epoch_started
            trainer.log.append(record)
            run_bar.update()
            writer.write_scalars(epoch, {
                name: value for name, value in logs.flatten(record).items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)})
            writer.flush()
            checkpoints.save(state, {"epoch": epoch, "position": None,
                                     "epoch_start_step": epoch_start_step, **best.meta()})
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
        final = trainer.evaluate(state)
    if best.epoch is not None:
        logger.info("best epoch by validation R@1: %d (%.4f); its state: %s", best.epoch,
                    best.value, trainer.workdir / "checkpoints_best")
    return final
