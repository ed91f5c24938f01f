"""An epoch's plan: which samples every train step of the epoch sees (method.md §2–3).

    embed the training split -> shards (`embedding.Embedder`)
      -> k nearest neighbours of the epoch's anchors (`index.neighbours`; each process searches
         for the anchors of its block, the lists are shared), κ₀ calibrated from them where
         controller.kappa_init="auto"
      -> triplet batches (`mining.mine_triplets` + `mining.epoch_triplets`, or random triplets
         before mining starts), or the image batches of the in-batch variants (m-per-class at
         random, or `mining.index_batches`)
      -> `EpochPlan`: the epoch's global batches, its controller and the record it logs.

`plan_epoch` is a function of (the state at the epoch's start, the epoch) and the run's fixed
`PlanInputs`: its random choices come from `stream_key(state.rng, stream, epoch, ...)`, so a
resumed run that plans an epoch again gets the same batches. Its only side effects are files: the
embedding dump (only the latest epoch's is kept) and, with `train.save_triplets`, the epoch's
triplets file.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from smine_jax import controller, data, fileio, index, mining
from smine_jax.embedding import Embedder
from smine_jax.runtime import gather_rows, local_block, local_part, sync

# Independent random streams of a run: fold_in(fold_in(base key, stream), ...). Their values
# are part of every run's results. The others: 0 model init, 4 train step (`train`).
_MINE_STREAM, _ASSEMBLE_STREAM, _RANDOM_STREAM = 1, 2, 3
_BATCHES_STREAM, _ANCHORS_STREAM = 5, 6


def stream_key(rng, stream: int, *path: int) -> jax.Array:
    """fold_in(... fold_in(fold_in(rng, stream), path[0]) ..., path[-1]): the key of one
    random stream (model init, train step, mining, ...) at one (epoch, ...) of the run."""
    for value in (stream, *path):
        rng = jax.random.fold_in(rng, value)
    return rng


@dataclasses.dataclass
class EpochPlan:
    """One epoch's global batches (the same on every process): ids [steps, rows(, 3)], mask,
    and which triplets were mined ([steps, rows]; all False for image batches). Each process
    feeds its slice of every batch (`local_plan`). A mid-epoch checkpoint saves it
    (`checkpoints.Checkpoints.save`), so a resumed epoch goes on with the same batches without
    embedding, indexing and mining again."""

    ids: np.ndarray
    mask: np.ndarray
    mined: np.ndarray
    record: dict  # what the plan's construction logs (κ, mined fraction, fallbacks, seconds)
    # The epoch's controller (κ₀ calibrated if "auto"), on the host: the train steps donate the
    # state it came from.
    controller: controller.ControllerState
    # The in-batch boundary κ of the epoch's train steps (`mining.inbatch_kappa`; 0: none).
    kappa: float = 0.0


def local_plan(plan: EpochPlan) -> EpochPlan:
    """`plan` with this process's slice of every batch (`runtime.local_part`)."""
    return dataclasses.replace(plan, **{name: local_part(getattr(plan, name))
                                        for name in ("ids", "mask", "mined")})


@dataclasses.dataclass(frozen=True, eq=False)
class PlanInputs:
    """What an epoch's plan depends on besides the state and the epoch (fixed for a run).

    Attributes:
      config: the run's config.
      train_split: the training split (`data.ImageSplit`), embedded at each mining epoch.
      labels: i32[N] its labels.
      embedder: embeds the training split (`embedding.Embedder`).
      workdir: the run's workdir (embedding dumps, triplet files).
      steps_per_epoch: train steps of an epoch (the plan's first dimension).
    """

    config: Any
    train_split: data.ImageSplit
    labels: np.ndarray
    embedder: Embedder
    workdir: Path
    steps_per_epoch: int

    @property
    def num_train(self) -> int:
        return len(self.labels)


class NeighbourLists(NamedTuple):
    """A mining epoch's neighbour lists of all its anchors (the same on every process) and the
    controller they set."""

    labels: np.ndarray  # i32[N] of the embedded training set
    anchors: np.ndarray  # the epoch's anchor ids
    ids: jax.Array  # i32[A, k]
    sq_dists: jax.Array  # f32[A, k]
    controller: controller.ControllerState  # κ₀ calibrated from the lists where "auto"
    record: dict  # kappa, k, anchors, kappa_calibrated
    seconds: dict  # embed, index


def record_without_mining() -> tuple[dict, dict]:
    """(record, seconds) of an epoch plan that does not mine; a mining epoch fills them in."""
    return ({"mining": False, "kappa": None, "mined_fraction": 0.0, "mined_fraction_target": 0.0},
            {"embed": 0.0, "index": 0.0, "mine": 0.0})


def inbatch_images(config) -> int:
    """Images per batch of the in-batch variants (default: 3 × batch_size, as a triplet batch)."""
    return int(config.train.inbatch_images) or 3 * int(config.train.batch_size)


def mines_in_epoch(config, state) -> bool:
    """Whether the epoch that starts from `state` embeds, indexes and mines."""
    if str(config.mining.kind) == "smart":
        return bool(state.controller.mining) and float(config.mining.mined_fraction) > 0
    return bool(state.controller.mining) and config.mining.batches == "index"


def neighbour_count(config, labels: np.ndarray) -> int:
    """k of method.md §2: `mining.k`, or 2 × the largest training class; at most N − 1."""
    k = int(config.mining.k) or 2 * int(np.bincount(labels).max())
    return min(k, len(labels) - 1)


def plan_epoch(inputs: PlanInputs, state, epoch: int) -> EpochPlan:
    """The epoch's batches, a pure function of (state at the epoch's start, epoch): triplet
    batches for mining.kind="smart", image batches for the in-batch variants."""
    if str(inputs.config.mining.kind) == "smart":
        return _triplet_plan(inputs, state, epoch)
    return _image_plan(inputs, state, epoch)


def _epoch_anchors(inputs: PlanInputs, state, epoch: int) -> np.ndarray:
    """The anchors of a mining epoch (the same on every process): every id, or with T =
    `train.triplets_per_anchor` > 1 a random ⌈N/T⌉ of them (sorted; a function of (seed,
    epoch)), so that an epoch still trains on N triplets."""
    ids = np.arange(inputs.num_train, dtype=np.int32)
    per_anchor = int(inputs.config.train.triplets_per_anchor)
    if per_anchor == 1:
        return ids
    seed = np.asarray(jax.device_get(stream_key(state.rng, _ANCHORS_STREAM, epoch, 0)))
    chosen = np.random.default_rng(seed.tolist()).choice(
        len(ids), size=math.ceil(len(ids) / per_anchor), replace=False)
    return ids[np.sort(chosen)]


def _neighbour_lists(inputs: PlanInputs, state, epoch: int) -> NeighbourLists:
    """Embed the training set -> shards -> k nearest neighbours of the epoch's anchors (each
    process searches for those in its block, then all processes share the lists);
    calibrates κ₀ from the lists at the first mining epoch of kappa_init="auto"."""
    config, ctrl = inputs.config, state.controller
    start = time.perf_counter()
    dump = inputs.workdir / "embeddings" / f"epoch_{epoch:04d}"
    embeddings, labels, _ = inputs.embedder.embed_split(state, inputs.train_split, dump)
    remove_old_dumps(keep=dump)
    embedded = time.perf_counter()
    anchors = _epoch_anchors(inputs, state, epoch)
    own = anchors[np.isin(anchors, local_block(inputs.num_train))]
    k = neighbour_count(config, inputs.labels)
    neighbour_ids, sq_dists = index.neighbours(
        embeddings, k, backend=str(config.mining.backend), query_ids=own,
        **_index_options(config))
    neighbour_ids, sq_dists = gather_rows(neighbour_ids), gather_rows(sq_dists)
    record: dict = {}
    if controller.needs_initial_kappa(ctrl):
        ratios = mining.boundary_ratios(neighbour_ids, sq_dists, labels, anchor_ids=anchors,
                                        chunk_size=int(config.mining.chunk_size))
        ctrl = controller.set_initial_kappa(ctrl, controller.kappa_for_share(
            ratios, ctrl.config.kappa_init_share))
        record["kappa_calibrated"] = True
    record.update(kappa=float(ctrl.kappa), k=k, anchors=len(anchors))
    return NeighbourLists(labels, anchors, neighbour_ids, sq_dists, ctrl, record,
                          {"embed": embedded - start, "index": time.perf_counter() - embedded})


def _triplet_plan(inputs: PlanInputs, state, epoch: int) -> EpochPlan:
    """N triplets in batches of `train.batch_size` (the last one padded and masked): mined
    from the neighbour lists (share `mining.mined_fraction`) or, before mining starts, random."""
    config, ctrl = inputs.config, state.controller
    fraction = float(config.mining.mined_fraction)
    record, seconds = record_without_mining()
    if mines_in_epoch(config, state):
        lists = _neighbour_lists(inputs, state, epoch)
        ctrl, labels = lists.controller, lists.labels
        started = time.perf_counter()
        mined, info = mining.mine_triplets(
            stream_key(state.rng, _MINE_STREAM, epoch), lists.ids, lists.sq_dists, labels,
            float(ctrl.kappa), triplets_per_anchor=int(config.train.triplets_per_anchor),
            anchor_ids=lists.anchors, chunk_size=int(config.mining.chunk_size))
        triplets, stats = mining.epoch_triplets(
            stream_key(state.rng, _ASSEMBLE_STREAM, epoch, 0), mined, labels,
            mined_fraction=fraction, num_triplets=inputs.num_train)
        summary = jax.device_get(mining.mining_summary(mined, info))
        triplets = jax.device_get(triplets)
        seconds.update(lists.seconds, mine=time.perf_counter() - started)
        record.update(lists.record, mining=True, mined_fraction=float(stats.mined_fraction),
                      mined_fraction_target=fraction,
                      fallbacks={name: int(value) for name, value in summary.items()})
    else:
        triplets = jax.device_get(mining.random_triplets(
            stream_key(state.rng, _RANDOM_STREAM, epoch, 0), inputs.labels, inputs.num_train))
    rows = np.stack([triplets.anchor, triplets.positive, triplets.negative], axis=1)
    mined_flags = np.asarray(triplets.mined, bool)
    if bool(config.train.save_triplets):
        save_triplets(inputs.workdir / "triplets" / f"epoch_{epoch:04d}.npz", rows, mined_flags,
                      inputs.labels)
    batch_size = int(config.train.batch_size)
    num_rows = inputs.steps_per_epoch * batch_size
    ids, mask = _pad_rows(rows.astype(np.int32), num_rows)
    mined_flags = np.concatenate([mined_flags, np.zeros(num_rows - len(rows), bool)])
    record["seconds"] = seconds
    shape = (inputs.steps_per_epoch, batch_size)
    return EpochPlan(ids.reshape(*shape, 3), mask.reshape(shape), mined_flags.reshape(shape),
                     record, jax.device_get(ctrl))


def _image_plan(inputs: PlanInputs, state, epoch: int) -> EpochPlan:
    """m-per-class image batches: at random, or (`mining.batches="index"`, mining epochs)
    built from the neighbour lists by `mining.index_batches`."""
    config, ctrl = inputs.config, state.controller
    m = int(config.train.samples_per_class)
    record, seconds = record_without_mining()
    key = stream_key(state.rng, _BATCHES_STREAM, epoch, 0)
    images = inbatch_images(config)
    steps = inputs.steps_per_epoch
    if mines_in_epoch(config, state):
        lists = _neighbour_lists(inputs, state, epoch)
        ctrl = lists.controller
        started = time.perf_counter()
        fraction = float(config.mining.mined_fraction)
        ids, mask, info = mining.index_batches(
            key, lists.ids, lists.sq_dists, lists.labels, float(ctrl.kappa),
            classes_per_batch=images // m, samples_per_class=m, num_batches=steps,
            smart_fraction=fraction, anchor_ids=lists.anchors,
            chunk_size=int(config.mining.chunk_size))
        ids, mask, info = jax.device_get((ids, mask, info))
        seconds.update(lists.seconds, mine=time.perf_counter() - started)
        pair_slots = steps * (images // m // 2)
        record.update(lists.record, mining=True, mined_fraction_target=fraction,
                      mined_fraction=float(np.sum(info.smart_pairs)) / max(pair_slots, 1),
                      index_batches={
                          "smart_pairs_per_batch": float(np.mean(info.smart_pairs)),
                          "random_classes_per_batch": float(np.mean(info.random_classes)),
                          "seeds_available": int(info.seeds_available)})
    else:
        seed = np.asarray(jax.device_get(key))
        ids = data.m_per_class_batches(
            inputs.labels, images, m, seed=np.random.default_rng(seed.tolist()),
            num_batches=steps)
        mask = np.ones(ids.shape, bool)
    record["seconds"] = seconds
    kappa = float(ctrl.kappa) if (config.mining.inbatch_kappa and bool(ctrl.mining)) else 0.0
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
    return EpochPlan(ids, mask, np.zeros(ids.shape, bool), record, jax.device_get(ctrl),
                     kappa=kappa if np.isfinite(kappa) else 0.0)


def _pad_rows(rows: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows padded to num_rows by repeating its first rows, mask True for the real rows)."""
    mask = np.zeros(num_rows, bool)
    mask[:len(rows)] = True
    if len(rows) < num_rows:
        filler = np.resize(rows, (num_rows - len(rows), *rows.shape[1:]))
        rows = np.concatenate([rows, filler])
    return rows, mask


def _index_options(config) -> dict:
    if config.mining.backend == "scann":
        return {"mode": str(config.mining.scann_mode)}
    return {}


def save_triplets(path: Path, rows: np.ndarray, mined: np.ndarray, labels: np.ndarray) -> None:
    """`path` (workdir/triplets/epoch_EEEE.npz): an epoch's triplets (train-split ids, columns
    anchor / positive / negative of `rows`, in training order), which were `mined`, and their
    `labels`; process 0 writes it (the plan is the same on every process)."""
    if jax.process_index():
        return
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(handle):
        np.savez(handle, anchor=rows[:, 0], positive=rows[:, 1], negative=rows[:, 2],
                 mined=mined, labels=labels[rows])

    fileio.write_atomically(path, write)


def remove_old_dumps(keep: Path) -> None:
    """Keeps only the latest epoch's embedding dump (`keep`), once every process read it."""
    sync(f"dumps read {keep.name}")
    if jax.process_index():
        return
    for path in keep.parent.glob("epoch_*"):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
