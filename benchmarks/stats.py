"""Statistics of runs' metrics.jsonl records (pure): the numbers the reports print.

Means and spreads over seeds, R@1 curves and the training seconds to reach a level, the time
split per phase, the controller's settling, model selection by validation, and Welch's t-test
(scipy) of the claims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from smine_jax.configs import omniglot

PHASES = ("embed", "index", "mine", "train", "eval")
# The controller's dead band (method.md §3, controller.tolerance): "settled" = its signal stays
# within its target ± tolerance; κ's clip bounds (controller.kappa_min, kappa_max).
SETTLE_TOLERANCE = float(omniglot.get_config().controller.tolerance)
KAPPA_BOUNDS = (float(omniglot.get_config().controller.kappa_min),
                float(omniglot.get_config().controller.kappa_max))
SIGNIFICANCE = 0.05  # two-sided Welch t-test level of the claim verdicts


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof 1; NaN for fewer than 2 values), count);
    NaN values are left out; (NaN, NaN, 0) for none."""
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if not array.size:
        return math.nan, math.nan, 0
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std, int(array.size)


def final_test(records: Sequence[Mapping]) -> dict:
    """The test metrics of the last evaluated epoch ({} when none)."""
    tested = [record for record in records if "test" in record]
    return dict(tested[-1]["test"]) if tested else {}


def mean_curve(seed_records: Sequence[Sequence[Mapping]],
               key: str = "recall@1") -> tuple[np.ndarray, np.ndarray]:
    """(epochs, mean of test[key] over the seeds) on the evaluated epochs every seed has."""
    if not seed_records:
        return np.zeros(0, int), np.zeros(0)
    per_seed = [{r["epoch"]: r["test"][key] for r in records if "test" in r}
                for records in seed_records]
    epochs = sorted(set.intersection(*(set(curve) for curve in per_seed)))
    values = [np.mean([curve[epoch] for curve in per_seed]) for epoch in epochs]
    return np.asarray(epochs, int), np.asarray(values, np.float64)


def training_seconds(record: Mapping) -> float:
    """The epoch's wall-clock without the test evaluation (the cost of training itself)."""
    seconds = record.get("seconds", {})
    return float(seconds.get("epoch", 0.0)) - float(seconds.get("eval", 0.0))


def mean_cumulative_seconds(seed_records: Sequence[Sequence[Mapping]],
                            epochs: Sequence[int]) -> np.ndarray:
    """Mean over the seeds of the training seconds (no evaluation) up to the end of each of
    `epochs`."""
    totals = []
    for records in seed_records:
        cumulative, running = {}, 0.0
        for record in sorted(records, key=lambda r: r["epoch"]):
            running += training_seconds(record)
            cumulative[record["epoch"]] = running
        totals.append([cumulative[epoch] for epoch in epochs])
    return np.mean(np.asarray(totals, np.float64), axis=0) if totals else np.zeros(0)


def epochs_to_reach(epochs: Sequence[int], values: Sequence[float],
                    target: float) -> int | None:
    """The first epoch whose value is >= target (None: never, or no target)."""
    if target is None or not np.isfinite(target):
        return None
    for epoch, value in zip(epochs, values, strict=True):
        if value >= target:
            return int(epoch)
    return None


def controller_signal(record: Mapping) -> tuple[float, float]:
    """(the error the controller steered by, its target) of an epoch record: its
    `controller_error` (NaN: nothing mined) and `controller_target`."""
    value = record["controller_error"]
    return (math.nan if value is None else float(value)), float(record["controller_target"])


def settled_epoch(records: Sequence[Mapping],
                  tolerance: float = SETTLE_TOLERANCE) -> int | None:
    """The first mining epoch from which the controller's signal stays within its target ±
    tolerance (the controller's convergence, paper Figs. 3–4); None if it never settles."""
    mining = [r for r in sorted(records, key=lambda r: r["epoch"]) if r.get("mining")]
    settled = None
    for record in mining:
        error, goal = controller_signal(record)
        if abs(error - goal) <= tolerance:
            settled = settled if settled is not None else int(record["epoch"])
        else:
            settled = None
    return settled


def kappa_off_bounds(records: Sequence[Mapping], from_epoch: int,
                     bounds: tuple[float, float] = KAPPA_BOUNDS) -> bool | None:
    """Whether every mining epoch from `from_epoch` on used a κ strictly inside the clip
    bounds (None: no such epoch)."""
    kappas = [r["kappa"] for r in records if r.get("mining") and r["epoch"] >= from_epoch]
    if not kappas:
        return None
    return all(bounds[0] < kappa < bounds[1] for kappa in kappas)


def best_val_test(records: Sequence[Mapping], key: str = "recall@1") -> dict:
    """The test metrics of the epoch with the best validation R@1 (the first of equals; {}
    without validation metrics): model selection on held-out training classes."""
    scored = [r for r in records if "val" in r and "test" in r]
    if not scored:
        return {}
    best = max(scored, key=lambda r: (r["val"][key], -r["epoch"]))
    return {**best["test"], "epoch": best["epoch"], "val": best["val"]}


def time_split(seed_records: Sequence[Sequence[Mapping]]) -> dict[str, float]:
    """Mean seconds per epoch of each phase, of the epoch and of the epoch without evaluation
    (over every epoch of every seed), and the share of the epoch without evaluation spent in
    triplet selection (index + mine) and in embed + index + mine, over the mining epochs only
    (NaN when the variant never mines)."""
    records = [record for records in seed_records for record in records]
    if not records:
        return {}
    split = {phase: float(np.mean([r["seconds"].get(phase, 0.0) for r in records]))
             for phase in (*PHASES, "epoch")}
    split["no_eval"] = float(np.mean([training_seconds(r) for r in records]))
    mining = [r for r in records if r.get("mining") and training_seconds(r) > 0]

    def share(phases):
        if not mining:
            return math.nan
        return float(np.mean([sum(r["seconds"][p] for p in phases) / training_seconds(r)
                              for r in mining]))

    split["select_share"] = share(("index", "mine"))
    split["embed_select_share"] = share(("embed", "index", "mine"))
    return split


def compare(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None, str]:
    """(mean(a) - mean(b), the two-sided p-value of Welch's t-test (scipy), verdict): "held"
    when p < SIGNIFICANCE and the difference is positive, "reversed" when p < SIGNIFICANCE and
    it is negative, else "inconclusive"; "single seed" without a spread on both sides,
    "missing" without values. NaN values are left out."""
    from scipy.stats import ttest_ind

    mean_a, std_a, n_a = mean_std(a)
    mean_b, std_b, n_b = mean_std(b)
    if not n_a or not n_b:
        return math.nan, None, "missing"
    difference = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return difference, None, "single seed"
    if std_a == 0 and std_b == 0:  # no spread: any difference is exact
        p_value = 1.0 if difference == 0 else 0.0
    else:
        clean = [[v for v in values if v is not None and np.isfinite(v)] for values in (a, b)]
        p_value = float(ttest_ind(*clean, equal_var=False).pvalue)
    if p_value < SIGNIFICANCE:
        return difference, p_value, "held" if difference > 0 else "reversed"
    return difference, p_value, "inconclusive"
