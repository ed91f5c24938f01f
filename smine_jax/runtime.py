"""Devices and processes of a run: where arrays live and what each process holds.

Data parallelism: one `Mesh` of all devices with a `data` axis; batches are sharded on it and
the train state is replicated (`Runtime`). With several processes (jax.distributed) each process
holds its part of every global batch (`Runtime.global_batch`, `local_part`) and of every
dataset pass (`local_block`); `sync` and `gather_rows` are where the processes meet, and
`PreemptionGuard` makes them stop at the same step. With one process every helper is a no-op
or a plain `device_put`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from smine_jax import data

logger = logging.getLogger(__name__)


def replicated_state(state: Any, sharding) -> Any:
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


class Runtime:
    """The mesh of all devices and the two placements of a run: the state replicated, the
    batches split over the `data` axis. Built once per run."""

    def __init__(self):
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))

    def place_state(self, state: Any) -> Any:
        """`state` replicated on every device, in buffers of its own (`replicated_state`)."""
        return replicated_state(state, self.replicated)

    def global_batch(self, local: np.ndarray) -> jax.Array:
        """The global batch, sharded on `data`, of which `local` is this process's part (the
        whole batch with one process)."""
        if jax.process_count() == 1:
            return jax.device_put(local, self.batch_sharding)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        return jax.make_array_from_process_local_data(self.batch_sharding, local, global_shape)

    def image_batches(self, images: np.ndarray, id_batches: Iterator, *,
                      prefetch: int) -> Iterator[jax.Array]:
        """The global image batch of each ids of `id_batches` (this process's part of every
        batch), gathered from `images` and placed `prefetch` batches ahead (one process)."""
        if jax.process_count() == 1:
            return data.prefetch_batches(images, id_batches, size=prefetch,
                                         sharding=self.batch_sharding)
        return (self.global_batch(data.gather(images, ids)) for ids in id_batches)


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    unique = {shard.index[0].start: shard for shard in shards}
    return np.concatenate([np.asarray(shard.data) for shard in unique.values()])


def local_part(batches: np.ndarray) -> np.ndarray:
    """This process's slice of every global batch ([steps, batch, ...] -> [steps,
    batch / processes, ...]): process p feeds rows p·b … (p + 1)·b − 1 of each."""
    if jax.process_count() == 1:
        return batches
    size = batches.shape[1] // jax.process_count()
    start = jax.process_index() * size
    return batches[:, start:start + size]


def local_block(num_samples: int) -> np.ndarray:
    """This process's contiguous block of sample ids: the block it embeds
    (`data.inference_batches` shards by the same `data.shard_ids`)."""
    return data.shard_ids(num_samples, jax.process_index(), jax.process_count())


def gather_rows(rows):
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


def sync(name: str) -> None:
    """Barrier across processes (no-op with one process). Every process must pass the same
    `name`: no absolute paths in it (a workdir spelled differently must still meet)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class PreemptionGuard:
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
        """Whether to stop after global step `step` (every process gets the same answer)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._requested

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False
