"""Train-step and embedding-pass throughput of an experiment config, on synthetic images.

    python -m benchmarks.train_bench                       # Omniglot config (small net, 28²)
    python -m benchmarks.train_bench --config cub          # GoogLeNet, 256² cache -> 224² crops
    python -m benchmarks.train_bench --variant semihard --steps 10
    python -m benchmarks.train_bench --xla-flags="--xla_cpu_prefer_vector_width=512"

Builds the experiment's model, train state and jitted train step exactly as the trainer does
(`train.make_train_step` with the config's objective and on-device augmentation, sharded over
all devices on the `data` axis), feeds it random uint8 images of the cache's size, and reports:

- compile seconds of the train step;
- train step: milliseconds per step, images/s (3 × batch_size images a step for triplet
  batches, `train.inbatch_images` for the in-batch variants), and process CPU seconds per
  step (on a shared CPU machine the wall clock moves with the load; the CPU time less so);
- embedding pass (eval mode, centre crop, batches of `train.embed_batch_size`): images/s;
- peak memory: the device's `peak_bytes_in_use` where the backend reports it (GPU, TPU), else
  the process's peak RSS.

Targets: on this project's 2-core CPU, the Omniglot train step >= 1,200 images/s (the
PyTorch + pytorch-metric-learning reference of the same net). `--xla-flags` sets XLA_FLAGS
before jax starts, to compare compiler options in separate runs. The malloc tuning of the
experiment entry points (`smine_jax.hostmem`) is applied as they apply it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = ("omniglot", "cub", "cars196")
TARGET_IMAGES_PER_S = 1200  # Omniglot on the project's CPU


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=CONFIGS, default="omniglot")
    parser.add_argument("--variant", default="",
                        help="config variants after the colon, e.g. semihard or smoke")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="train.batch_size (triplets a step); 0 = the config's")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--embed-batches", type=int, default=20, help="timed embedding batches")
    parser.add_argument("--dtype", default="", help="model.dtype (float32 | bfloat16)")
    parser.add_argument("--xla-flags", default=None, help="XLA_FLAGS for this run")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "embed_batches"):
        if getattr(args, name) < (1 if name != "warmup" else 0):
            parser.error(f"--{name.replace('_', '-')}: expected a positive count")
    if args.batch_size < 0:
        parser.error("--batch-size: expected a positive count (or 0 for the config's)")
    return args


def _peak_memory(jax) -> tuple[str, float]:
    """('device' | 'host RSS', GiB): the device's peak allocation where reported, else RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device", stats["peak_bytes_in_use"] / 2**30
    from smine_jax import hostmem

    return "host RSS", hostmem.peak_rss_gib()


def _timed(call, count: int, block) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call over `count` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = None
    for _ in range(count):
        result = call()
    block(result)
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def run(args) -> dict:
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from smine_jax import data, models, train

    module = importlib.import_module(f"smine_jax.configs.{args.config}")
    config = module.get_config(args.variant or None)
    if args.batch_size:
        config.train.batch_size = args.batch_size
    if args.dtype:
        config.model.dtype = args.dtype
    train.check_config(config)
    resolved = data.resolve_config(config.data)
    size, crop, channels = (resolved[name] for name in ("image_size", "crop_size", "channels"))

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    model = models.build_model(config.model)
    augment, center = data.preprocessors(config.data)
    state = train.create_train_state(config, model, (crop, crop, channels), steps_per_epoch=100)
    state = train.replicated_state(state, replicated)
    step = jax.jit(train.make_train_step(model, train.make_objective(config), augment),
                   donate_argnums=(0,), out_shardings=(replicated, replicated))

    triplets = str(config.mining.kind) == "smart"
    rows = int(config.train.batch_size) if triplets else train.inbatch_images(config)
    images_per_step = 3 * rows if triplets else rows
    rng = np.random.default_rng(0)
    shape = (rows, 3, size, size, channels) if triplets else (rows, size, size, channels)
    images = jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8), batch_sharding)
    labels = np.repeat(np.arange(rows // 4 + 1, dtype=np.int32), 4)[:rows]  # m-per-class, m=4
    labels = jax.device_put(labels, batch_sharding)
    mask = jax.device_put(np.ones(rows, bool), batch_sharding)
    mined = jax.device_put(np.arange(rows) % 2 == 0, batch_sharding)  # half mined, as p = 0.5

    start = time.perf_counter()
    state, values = step(state, images, labels, mask, mined)
    jax.block_until_ready(values)
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, values = step(state, images, labels, mask, mined)
    jax.block_until_ready(values)

    def train_call():
        nonlocal state
        state, metrics = step(state, images, labels, mask, mined)
        return metrics

    step_s, step_cpu_s = _timed(train_call, args.steps, jax.block_until_ready)
    loss = float(jax.device_get(values)["loss"])
    steps_taken = int(jax.device_get(state.step))  # compile + warmup + timed: all really ran

    embed = jax.jit(train.make_embed_fn(model, center), out_shardings=batch_sharding)
    embed_batch = int(config.train.embed_batch_size)
    embed_images = jax.device_put(rng.integers(0, 256, (embed_batch, size, size, channels),
                                               dtype=np.uint8), batch_sharding)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    jax.block_until_ready(embed(variables, embed_images))
    embed_s, _ = _timed(lambda: embed(variables, embed_images), args.embed_batches,
                        jax.block_until_ready)
    memory_kind, peak_gib = _peak_memory(jax)
    return dict(
        config=f"{args.config}{':' + args.variant if args.variant else ''}",
        model=str(config.model.name), dtype=str(config.model.dtype),
        input=f"{size}² cache -> {crop}² x {channels}", rows_per_step=rows,
        images_per_step=images_per_step, steps_taken=steps_taken, compile_s=compile_s,
        step_ms=1e3 * step_s, step_cpu_ms=1e3 * step_cpu_s,
        train_images_per_s=images_per_step / step_s,
        embed_images_per_s=embed_batch / embed_s, peak_memory=memory_kind, peak_gib=peak_gib,
        loss_finite=bool(np.isfinite(loss)), devices=[str(d) for d in jax.devices()],
        backend=jax.default_backend(),
        xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__,
        cpu=platform.processor() or platform.machine(), cores=os.cpu_count())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.xla_flags is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags
    from smine_jax import hostmem

    malloc_tuned = not args.no_malloc_tuning and hostmem.tune_malloc()
    summary = {**run(args), "malloc_tuned": bool(malloc_tuned)}
    print(f"{summary['config']}: {summary['model']} {summary['dtype']}, {summary['input']}, "
          f"{summary['images_per_step']} images a step on {len(summary['devices'])} device(s)")
    print(f"  compile            {summary['compile_s']:8.1f} s")
    print(f"  train step         {summary['step_ms']:8.1f} ms  "
          f"{summary['train_images_per_s']:8.0f} images/s  "
          f"(CPU time {summary['step_cpu_ms']:.0f} ms a step)")
    print(f"  embedding pass     {summary['embed_images_per_s']:8.0f} images/s")
    print(f"  peak memory        {summary['peak_gib']:8.2f} GiB ({summary['peak_memory']})")
    if args.config == "omniglot" and summary["backend"] == "cpu":
        met = summary["train_images_per_s"] >= TARGET_IMAGES_PER_S
        print(f"  target (CPU)       >= {TARGET_IMAGES_PER_S} images/s: "
              f"{'met' if met else 'NOT met'}")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
