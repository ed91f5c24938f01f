"""Data pipeline throughput: cache builds (images/s) and gather + on-device augmentation.

    python -m benchmarks.data_bench                          # full size (the lead's run)
    python -m benchmarks.data_bench --num-jpegs 200 --omniglot-limit 200 --steps 5   # smoke

Measures
  1. cache build of Omniglot (the folder of --omniglot-dir, skipped when absent), decode + resize;
  2. cache build of a generated folder of JPEGs of 500×375 (5,000 by default);
  3. gather by random ids from the memory-mapped cache + device_put + jitted augmentation
     (random crop 227², flip, normalisation) of batches of 128: separately, back to back, and
     overlapped with `prefetch_batches`. Target on a CPU: gather + augment >= 5,000 images/s.
Each cache build starts from an empty cache directory; `--executor thread,process` compares
the two decoding pools (process includes the start of spawned workers, ~1-2 s). Prints one
line per measurement and a JSON summary at the end.

On a CPU the augmentation of a batch of 128 at 227² writes a 75 MiB float32 buffer per call,
allocated by XLA's worker threads; glibc's per-thread arenas cannot hold it, so without tuning
every call is a fresh mmap with ~19k page faults. The script applies
`smine_jax.hostmem.tune_malloc` (one arena, no mmap / trim of large blocks) as the experiment
entry points do, before jax runs; `--no-malloc-tuning` measures without it. On a GPU the device
allocator reuses memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from smine_jax import hostmem

# Before jax runs anything (see the module docstring); --no-malloc-tuning opts out.
MALLOC_TUNED = "--no-malloc-tuning" not in sys.argv and hostmem.tune_malloc()

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from smine_jax import data  # noqa: E402
from smine_jax.data import sources  # noqa: E402

DEFAULT_OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
TARGET_IMAGES_PER_S = 5000


def _write_jpeg(path: Path, width: int, height: int, seed: int) -> None:
    """A photo-like JPEG: smooth gradients plus noise (compresses like a real photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_jpeg_folder(root: Path, count: int, width: int, height: int,
                     num_classes: int = 50) -> Path:
    """`count` JPEGs in `num_classes` class folders under `root` (not timed)."""
    jobs = []
    for i in range(count):
        folder = root / f"class{i % num_classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:05d}.jpg", width, height, i))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda job: _write_jpeg(*job), jobs))
    return root


def time_cache_build(dataset, workdir: Path, image_size: int, channels: int, executor: str,
                     workers: int | None) -> tuple[float, np.ndarray]:
    """images/s of one cache build from an empty cache directory."""
    cache_dir = workdir / f"cache-{executor}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    images = data.cached_images(dataset, cache_dir, image_size=image_size, channels=channels,
                                num_workers=workers, executor=executor, progress=False)
    return len(dataset) / (time.perf_counter() - start), images


def time_gather_augment(images, batch_size: int, crop_size: int, steps: int) -> dict:
    """images/s of gather, augment, both back to back, and both overlapped (prefetch)."""
    rng = np.random.default_rng(0)
    id_batches = [rng.integers(0, len(images), batch_size) for _ in range(steps)]
    channels = images.shape[-1]
    augment = jax.jit(lambda key, x: data.augment(key, x, crop_size=crop_size,
                                                  mean=(0.5,) * channels,
                                                  std=(0.25,) * channels))
    key = jax.random.key(0)
    device_images = data.device_batch(images, id_batches[0])
    augment(key, device_images).block_until_ready()  # compile

    def rate(run) -> float:
        start = time.perf_counter()
        run()
        return steps * batch_size / (time.perf_counter() - start)

    def gather_only():
        for ids in id_batches:
            data.device_batch(images, ids).block_until_ready()

    def augment_only():
        for _ in id_batches:
            augment(key, device_images).block_until_ready()

    def sequential():
        for ids in id_batches:
            augment(key, data.device_batch(images, ids)).block_until_ready()

    def overlapped():
        for batch in data.prefetch_batches(images, id_batches, size=2):
            augment(key, batch).block_until_ready()

    return {name: rate(run) for name, run in (("gather", gather_only), ("augment", augment_only),
                                              ("gather+augment", sequential),
                                              ("gather+augment prefetched", overlapped))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--omniglot-dir", default=str(DEFAULT_OMNIGLOT))
    parser.add_argument("--omniglot-limit", type=int, default=0,
                        help="cache only the first N Omniglot images (0 = all 32,460)")
    parser.add_argument("--num-jpegs", type=int, default=5000)
    parser.add_argument("--jpeg-size", default="500x375", help="WIDTHxHEIGHT")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--crop-size", type=int, default=227)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--executor", default="thread,process",
                        help="comma-separated decoding pools to time: thread, process")
    parser.add_argument("--workers", type=int, default=0, help="0 = number of CPUs")
    parser.add_argument("--workdir", default="", help="default: a temporary directory")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's allocator as it is (applied at import otherwise)")
    args = parser.parse_args(argv)
    executors = [e for e in args.executor.split(",") if e]
    workers = args.workers or None
    width, height = (int(v) for v in args.jpeg_size.lower().split("x"))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="data_bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {os.cpu_count()} CPUs; "
          f"malloc tuned: {MALLOC_TUNED}; GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '')!r}; workdir {workdir}")
    results: dict = {"cpus": os.cpu_count(), "device": jax.devices()[0].platform,
                     "malloc_tuned": MALLOC_TUNED}

    def time_builds(name: str, description: str, dataset, cache_dir: Path):
        """Times the cache build with each executor; returns the last build's images."""
        images = None
        for executor in executors:
            rate, images = time_cache_build(dataset, cache_dir, args.image_size, 3, executor,
                                            workers)
            results[f"{name} cache build ({executor}) images/s"] = rate
            print(f"{name} cache build, {description} -> {args.image_size}², {executor} pool: "
                  f"{rate:,.0f} images/s")
        return images

    omniglot = Path(args.omniglot_dir)
    if (omniglot / "images_background").is_dir():
        dataset = sources.omniglot_folder(omniglot)
        if args.omniglot_limit:
            dataset = dataset.select(np.arange(min(args.omniglot_limit, len(dataset))))
        time_builds("omniglot", f"{len(dataset)} PNGs 105²", dataset, workdir / "omniglot")
    else:
        print(f"omniglot: skipped (no {omniglot})")

    jpeg_root = make_jpeg_folder(workdir / "jpegs", args.num_jpegs, width, height)
    dataset = sources.class_folders(jpeg_root).select(np.arange(args.num_jpegs))
    images = time_builds("jpeg", f"{len(dataset)} JPEGs {width}×{height}", dataset,
                         workdir / "jpegs-cache")

    if images is not None:
        rates = time_gather_augment(images, args.batch_size, args.crop_size, args.steps)
        for name, rate in rates.items():
            results[f"{name} images/s"] = rate
            print(f"{name}, batch {args.batch_size}, {args.image_size}² -> {args.crop_size}²: "
                  f"{rate:,.0f} images/s")
        best = max(rates["gather+augment"], rates["gather+augment prefetched"])
        print(f"target gather + augment >= {TARGET_IMAGES_PER_S:,} images/s: "
              f"{'met' if best >= TARGET_IMAGES_PER_S else 'NOT met'} ({best:,.0f})")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v
                      for k, v in results.items()}))
    return results


if __name__ == "__main__":
    main()
