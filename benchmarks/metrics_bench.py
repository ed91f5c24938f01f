"""Wall-clock and peak memory of ``smine_jax.metrics.evaluate`` on clustered embeddings.

    python -m benchmarks.metrics_bench --sizes 10000,50000,200000 --dim 512 --classes 100

Each size runs in a fresh subprocess, so its peak resident memory (``ru_maxrss`` of that
process: data, jax runtime and all) is its own, and its wall-clock is cold: jit compilation
included, as a user calling ``evaluate`` once at the end of training would see it. The data are
unit-length embeddings of ``--classes`` equally likely classes: a random unit centre per class
plus isotropic Gaussian noise of norm about ``--noise``, then L2-normalised like a network's
output. Target (issue #2): 50k x 512 in <= 60 s with peak RSS <= 4 GiB on the 2-core CPU;
200k must finish without running out of memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGET_SIZE, TARGET_SECONDS, TARGET_GIB = 50_000, 60.0, 4.0
REPO = Path(__file__).resolve().parents[1]


def clustered_embeddings(num_rows: int, dim: int, num_classes: int, noise: float, seed: int):
    """float32 [N, D] unit-length embeddings and int64 [N] labels (generated in row blocks so the
    generator itself never holds more than the output plus one block)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, num_classes, num_rows)
    points = np.empty((num_rows, dim), np.float32)
    block = 16_384
    for start in range(0, num_rows, block):
        rows = slice(start, min(start + block, num_rows))
        offsets = rng.standard_normal((rows.stop - start, dim), dtype=np.float32)
        points[rows] = centres[labels[rows]] + offsets * np.float32(noise / np.sqrt(dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points, labels


def run_one(args) -> dict:
    """Child process: generate one size, time one cold `evaluate`, report as a JSON line."""
    import jax

    from smine_jax import metrics

    points, labels = clustered_embeddings(args.child, args.dim, args.classes, args.noise,
                                          args.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    results = metrics.evaluate(points, labels, timings=timings)
    seconds = time.perf_counter() - start
    from smine_jax import hostmem

    peak_gib = hostmem.peak_rss_gib()
    return dict(results, seconds=seconds, knn_seconds=timings["knn"],
                kmeans_seconds=timings["kmeans"], peak_rss_gib=peak_gib,
                device=str(jax.devices()[0].platform))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000,200000",
                        help="comma-separated numbers of embeddings N")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--noise", type=float, default=3.0,
                        help="norm of the per-sample noise relative to the unit class centres")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args)))
        return

    sizes = [int(size) for size in args.sizes.split(",") if size]
    header = (f"{'N':>8} {'D':>5} {'classes':>7} {'seconds':>8} {'knn s':>7} {'kmeans s':>8} "
              f"{'peak GiB':>8} {'R@1':>6} {'R@2':>6} {'R@4':>6} {'R@8':>6} {'NMI':>6} "
              f"{'MAP@R':>6} {'R-prec':>6}  device")
    print(header)
    print("-" * len(header))
    failures = []
    for size in sizes:
        command = [sys.executable, "-m", "benchmarks.metrics_bench", "--child", str(size),
                   "--dim", str(args.dim), "--classes", str(args.classes),
                   "--noise", str(args.noise), "--seed", str(args.seed)]
        child = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if child.returncode != 0:
            reason = "killed (out of memory?)" if child.returncode < 0 else "failed"
            print(f"{size:>8} {args.dim:>5} {args.classes:>7}  {reason}, "
                  f"exit status {child.returncode}")
            print(child.stderr[-2000:], file=sys.stderr)
            failures.append(size)
            continue
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{size:>8} {args.dim:>5} {args.classes:>7} {row['seconds']:>8.1f} "
              f"{row['knn_seconds']:>7.1f} {row['kmeans_seconds']:>8.1f} "
              f"{row['peak_rss_gib']:>8.2f} {row['recall@1']:>6.3f} {row['recall@2']:>6.3f} "
              f"{row['recall@4']:>6.3f} {row['recall@8']:>6.3f} {row['nmi']:>6.3f} "
              f"{row['map@r']:>6.3f} {row['r_precision']:>6.3f}  {row['device']}", flush=True)
        if size == TARGET_SIZE:
            met = row["seconds"] <= TARGET_SECONDS and row["peak_rss_gib"] <= TARGET_GIB
            print(f"  target {TARGET_SIZE} in <= {TARGET_SECONDS:.0f} s and <= "
                  f"{TARGET_GIB:.0f} GiB: {'met' if met else 'NOT met'}")
    if failures:
        sys.exit(f"sizes that did not finish: {failures}")


if __name__ == "__main__":
    main()
