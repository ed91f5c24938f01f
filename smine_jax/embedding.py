"""Embedding a split with the model, and evaluation (method.md §2 step 1, §4).

Every image of a split is embedded once (eval mode, jitted, padded batches sharded over the
devices); each process embeds its contiguous block and writes it as a shard
(`index.write_shard`), then every process reads all shards back. The epoch plan embeds the
training split this way before the neighbour search (`epoch_plan`); evaluation embeds the test
or validation split and scores it with `metrics.evaluate`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from smine_jax import data, index, metrics
from smine_jax.runtime import Runtime, local_rows, sync


class SharedWorkdirError(RuntimeError):
    """Another process's embedding shard never appeared: the workdir is not shared."""


@dataclasses.dataclass(frozen=True)
class Embedder:
    """Embeds a split into shards and reads them all back.

    Attributes:
      runtime: the run's `Runtime` (placement of the image batches).
      embed: the jitted embed(variables, images u8[B, S, S, C]) -> f32[B, D], batch-sharded.
      local_batch: images per batch of this process (`train.embed_batch_size` / processes).
      shard_timeout: seconds to wait for the other processes' shards.
    """

    runtime: Runtime
    embed: Callable
    local_batch: int
    shard_timeout: float

    def embed_split(self, state: Any, split: data.ImageSplit, directory: Path):
        """Embeds every image of `split` once (eval mode) with the variables of `state` into
        shards under `directory`; returns all shards read back: (embeddings f32[N, D], labels
        i32[N], ids i64[N])."""
        images = split.images
        batch_size = self.local_batch
        processes, process = jax.process_count(), jax.process_index()
        num_batches = math.ceil(math.ceil(len(images) / processes) / batch_size)
        padding = data.InferenceBatch(
            ids=np.full(batch_size, -1, np.int32),
            images=np.zeros((batch_size, *images.shape[1:]), np.uint8),
            mask=np.zeros(batch_size, bool))
        batches = itertools.chain(
            data.inference_batches(images, batch_size, shard_index=process,
                                   num_shards=processes), itertools.repeat(padding))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        outputs = [(batch, self.embed(variables, self.runtime.global_batch(batch.images)))
                   for batch in itertools.islice(batches, num_batches)]
        ids = np.concatenate([batch.ids[batch.mask] for batch, _ in outputs])
        embeddings = np.concatenate([local_rows(out)[batch.mask]
                                     for batch, out in outputs])
        index.write_shard(directory, embeddings, np.asarray(split.labels)[ids], ids,
                          shard=process, num_shards=processes)
        sync(f"shards {directory.name}")
        if processes > 1:
            try:
                index.wait_for_shards(directory, processes, timeout=self.shard_timeout)
            except index.ShardError as error:
                raise SharedWorkdirError(str(error)) from None
        embeddings, labels, ids = index.read_shards(directory)
        if not np.array_equal(ids, np.arange(len(images))):
            raise RuntimeError(f"{directory}: the embedding dump does not cover every image once")
        return embeddings, labels, ids


def evaluate(embedder: Embedder, state: Any, split: data.ImageSplit, directory: Path, *,
             seed: int) -> dict[str, float]:
    """metrics.evaluate (Recall@K, NMI, MAP@R, R-precision; k-means seeded with `seed`) of
    `split` embedded with `state` (its dump in `directory`)."""
    embeddings, labels, _ = embedder.embed_split(state, split, directory)
    results = metrics.evaluate(embeddings, labels, seed=seed)
    return {name: float(value) for name, value in results.items()}
