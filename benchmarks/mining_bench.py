"""Benchmark of the per-epoch mining pipeline: neighbour index, search, sample_triplets.

For each N and backend it times, in a fresh subprocess (so that peak RSS is that run's alone):

* build: `smine_jax.index.build_index` (input checks; ScaNN: tree and AH training),
* search: k nearest other rows of every row (`NeighbourIndex.search`, exact re-ranking included),
* sample_triplets: `smine_jax.mining.sample_triplets` on those lists, after one compiling call on
  the same shapes (anchors/s = N / that time),
* total: build + search + sample_triplets, the mining cost of one epoch once compiled,
* peak RSS of the subprocess up to that point,
* recall@k against exact search (`smine_jax.knn.exact_neighbours` with query_ids) on a random
  subsample of queries (2,000 by default).

Data: clustered unit vectors like trained embeddings: N // 50 classes of 50 samples (at least
2 classes), class centres uniform on the unit sphere, each sample = centre + N(0, 0.1²) per
dimension, then L2-normalised (method.md §1). Exact and ScaNN brute force are O(N²): above
--max-quadratic-n rows they print "skipped (O(N²))" unless --force.

    python -m benchmarks.mining_bench --sizes 10000,100000,1000000 --dim 64 --k 128 \\
        --backends exact,scann_bf,scann_tree_ah
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BACKENDS = {
    "exact": dict(backend="exact"),
    "scann_bf": dict(backend="scann", mode="brute_force"),
    "scann_tree_ah": dict(backend="scann", mode="tree_ah"),
}
QUADRATIC_BACKENDS = ("exact", "scann_bf")
REPO = Path(__file__).resolve().parents[1]
ROWS_PER_CLASS = 50
NOISE = 0.05
COLUMNS = (
    ("N", 9), ("backend", 14), ("build s", 8), ("search s", 9), ("to device s", 12),
    ("compile s", 10), ("triplets s", 11), ("anchors/s", 10), ("total s", 8), ("peak RSS GiB", 13),
    ("recall@k", 9),
)


def clustered_embeddings(num_rows: int, dim: int, seed: int):
    """Unit vectors around N // 50 random unit class centres; returns (f32[N, D], i32[N])."""
    rng = np.random.default_rng(seed)
    num_classes = max(2, num_rows // ROWS_PER_CLASS)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.permutation(np.arange(num_rows) % num_classes).astype(np.int32)
    embeddings = rng.standard_normal((num_rows, dim), dtype=np.float32)
    embeddings *= NOISE
    embeddings += centres[labels]
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings, labels


def _time_sample_triplets(ids, sq_dists, labels, kappa: float):
    """(host->device s, compile+first-call s, timed-call s, note) of sample_triplets.

    The neighbour lists are moved to the device once, outside the timed call (the copy of two
    [N, k] arrays is timed on its own: at N = 1M it is ~1 GiB and would otherwise dominate).
    """
    try:
        from smine_jax.mining import sample_triplets
    except ImportError as error:
        return None, None, None, f"sample_triplets n/a ({error})"
    import jax

    start = time.perf_counter()
    ids, sq_dists, labels = jax.block_until_ready(jax.device_put((ids, sq_dists, labels)))
    to_device_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        jax.block_until_ready(sample_triplets(jax.random.key(0), ids, sq_dists, labels, kappa))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        triplets = sample_triplets(jax.random.key(1), ids, sq_dists, labels, kappa)
        jax.block_until_ready(triplets)
        return to_device_s, compile_s, time.perf_counter() - start, ""
    except Exception as error:  # report, keep benchmarking the index
        return to_device_s, None, None, f"sample_triplets failed: {error!r}"


def run_worker(args) -> dict:
    """One (N, backend) measurement in this process; returns the row of the table."""
    import jax

    from smine_jax import index, knn

    options = dict(BACKENDS[args.backend])
    if args.backend == "scann_tree_ah":
        for name in ("num_leaves", "num_leaves_to_search", "reorder_k"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
    embeddings, labels = clustered_embeddings(args.size, args.dim, args.seed)

    start = time.perf_counter()
    built = index.build_index(embeddings, args.k, **options)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    ids, sq_dists = built.search()
    search_s = time.perf_counter() - start

    to_device_s, compile_s, triplets_s, note = _time_sample_triplets(ids, sq_dists, labels,
                                                                     args.kappa)
    from smine_jax import hostmem

    peak_rss = hostmem.peak_rss_gib()

    queries = np.random.default_rng(args.seed + 1).choice(
        args.size, min(args.recall_queries, args.size), replace=False)
    exact_ids, _ = knn.exact_neighbours(embeddings, args.k, query_ids=queries)
    exact_ids = np.asarray(exact_ids)
    hits = [np.intersect1d(found, true).size for found, true in zip(ids[queries], exact_ids,
                                                                     strict=True)]
    recall = float(np.mean(hits)) / args.k

    total_s = build_s + search_s + (to_device_s or 0.0) + (triplets_s or 0.0)
    return dict(
        N=args.size, backend=args.backend, build_s=build_s, search_s=search_s,
        to_device_s=to_device_s, compile_s=compile_s, triplets_s=triplets_s,
        anchors_per_s=args.size / triplets_s if triplets_s else None,
        total_s=total_s, peak_rss_gib=peak_rss, recall=recall, recall_queries=len(queries),
        config=repr(built.config) if built.config is not None else "exact",
        jax_devices=str(jax.devices()), note=note)


def _format(value, width: int) -> str:
    if value is None:
        text = "n/a"
    elif isinstance(value, float):
        text = f"{value:.3g}" if value >= 1e4 else f"{value:.3f}" if value < 10 else f"{value:.1f}"
    else:
        text = str(value)
    return text.rjust(width)


def _print_row(values) -> None:
    print(" ".join(_format(value, width) for value, (_, width) in zip(values, COLUMNS,
                                                                      strict=True)), flush=True)


def run_parent(args) -> list[dict]:
    import jax

    sizes = [int(size) for size in args.sizes.split(",")]
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; known: {sorted(BACKENDS)}")
    print(f"# mining benchmark: dim={args.dim} k={args.k} kappa={args.kappa} "
          f"classes=N//{ROWS_PER_CLASS} noise={NOISE} seed={args.seed}")
    print(f"# host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, jax {jax.__version__} "
          f"({jax.default_backend()})")
    _print_row([name for name, _ in COLUMNS])
    results, notes = [], []
    for size in sizes:
        for backend in backends:
            if (backend in QUADRATIC_BACKENDS and size > args.max_quadratic_n
                    and not args.force):
                print(f"{_format(size, 9)} {backend.rjust(14)}  skipped (O(N²))", flush=True)
                continue
            command = [sys.executable, "-m", "benchmarks.mining_bench", "--worker",
                       "--size", str(size), "--backend", backend]
            for name in ("dim", "k", "kappa", "seed", "recall_queries", "num_leaves",
                         "num_leaves_to_search", "reorder_k"):
                if getattr(args, name) is not None:
                    command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            try:
                process = subprocess.run(command, capture_output=True, text=True,
                                         timeout=args.timeout, cwd=REPO)
            except subprocess.TimeoutExpired:
                print(f"{_format(size, 9)} {backend.rjust(14)}  timed out after "
                      f"{args.timeout} s", flush=True)
                continue
            lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
            if process.returncode != 0 or not lines:
                print(f"{_format(size, 9)} {backend.rjust(14)}  failed (exit "
                      f"{process.returncode}): {process.stderr.strip()[-2000:]}", flush=True)
                continue
            row = json.loads(lines[-1][len("RESULT "):])
            results.append(row)
            _print_row([row["N"], row["backend"], row["build_s"], row["search_s"],
                        row["to_device_s"], row["compile_s"], row["triplets_s"],
                        row["anchors_per_s"],
                        row["total_s"], row["peak_rss_gib"], row["recall"]])
            notes.append(f"# N={size} {backend}: {row['config']}"
                         + (f"; {row['note']}" if row["note"] else ""))
    print(f"# recall@k: fraction of the exact k nearest found, over {args.recall_queries} "
          "random queries; total = build + search + to device + sample_triplets (compiled)")
    for note in notes:
        print(note)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--backends", default="exact,scann_bf,scann_tree_ah")
    parser.add_argument("--kappa", type=float, default=16.0, help="κ for sample_triplets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--num-leaves", type=int, default=None, help="tree_ah override")
    parser.add_argument("--num-leaves-to-search", type=int, default=None,
                        help="tree_ah override")
    parser.add_argument("--reorder-k", type=int, default=None, help="tree_ah override")
    parser.add_argument("--max-quadratic-n", type=int, default=200_000,
                        help="largest N run with the O(N²) backends unless --force")
    parser.add_argument("--force", action="store_true", help="run O(N²) backends at any N")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=sorted(BACKENDS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
