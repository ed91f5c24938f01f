"""The figures of RESULTS.md (records in, PNG out).

R@1 vs epoch and vs training seconds (every variant and the peer), κ and the controller's signal
per epoch of smart vs smart_v1 (the paper's Figs. 3–4), and a montage of the triplets a run
mined at two epochs (Fig. 10).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .runs import PEER, TRIPLET_VARIANTS, VARIANTS, run_dir
from .stats import controller_signal, mean_cumulative_seconds, mean_curve

FIGURES = {"r1_epoch": "results_r1_vs_epoch.png", "r1_seconds": "results_r1_vs_seconds.png",
           "controller": "results_kappa_error.png", "triplets": "results_triplets.png"}


def write_figures(finished: Mapping[str, Mapping[int, list]], names: Sequence[str],
                  runs_dir: Path, folder: Path) -> dict[str, str]:
    """Draws every figure of the finished runs into `folder` (the montage from the first
    finished run of a TRIPLET_VARIANTS variant that saved triplets); {caption: file name}."""
    plot_recall_curves(finished, names, folder / FIGURES["r1_epoch"],
                       folder / FIGURES["r1_seconds"])
    plot_controller(finished, folder / FIGURES["controller"])
    panels, title = [], ""
    for name in TRIPLET_VARIANTS:
        for seed in sorted(finished.get(name, {})):
            panels, title = montage_panels(run_dir(runs_dir, name, seed))
            if panels:
                break
        if panels:
            break
    plot_triplet_montage(panels, folder / FIGURES["triplets"], title)
    return {"R@1 vs epoch": FIGURES["r1_epoch"],
            "R@1 vs training seconds": FIGURES["r1_seconds"],
            "κ and the controller's error signal per epoch, smart vs smart_v1":
                FIGURES["controller"],
            "Mined triplets at two epochs (anchor, positive, negative)": FIGURES["triplets"]}


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(name: str) -> dict:
    """The line style of a variant (its colour in VARIANTS order) or of the peer."""
    if name == PEER:
        return {"color": "black", "linestyle": "--", "marker": "x"}
    index = VARIANTS.index(name) if name in VARIANTS else len(VARIANTS)
    return {"color": f"C{index % 10}", "marker": "o" if name in TRIPLET_VARIANTS else "s",
            "markersize": 3}


def plot_recall_curves(finished: Mapping[str, Mapping[int, list]], names: Sequence[str],
                       path_epoch: Path, path_seconds: Path) -> None:
    """R@1 (mean over the finished seeds) vs epoch and vs training seconds (no evaluation)."""
    plt = _pyplot()
    from matplotlib import ticker

    longest = max((mean_cumulative_seconds(list(by_seed.values()), mean_curve(
        list(by_seed.values()))[0])[-1] for by_seed in finished.values() if by_seed),
        default=0.0)
    unit, unit_name = ((3600.0, "hours") if longest > 3 * 3600 else (60.0, "minutes")
                       if longest > 600 else (1.0, "seconds"))
    for path, by_seconds in ((path_epoch, False), (path_seconds, True)):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for name in names:
            seed_records = list(finished.get(name, {}).values())
            epoch_axis, values = mean_curve(seed_records)
            if not values.size:
                continue
            x = (mean_cumulative_seconds(seed_records, epoch_axis) / unit if by_seconds
                 else epoch_axis)
            axis.plot(x, 100 * values, label=f"{name} (n={len(seed_records)})", **_style(name))
        axis.set_xlabel(f"training {unit_name} (evaluation excluded)" if by_seconds
                        else "epoch")
        axis.set_ylabel("R@1 on the test classes (%)")
        axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=not by_seconds))
        save_curves(plt, figure, axis, path, "no finished run")


def save_curves(plt, figure, axis, path: Path, empty_text: str) -> None:
    """Finishes a one-axis figure of curves (legend, or `empty_text` without any; grid) and
    writes it to `path`."""
    if axis.lines:
        axis.legend(fontsize=7)
    else:
        axis.text(0.5, 0.5, empty_text, ha="center", transform=axis.transAxes)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_controller(finished: Mapping[str, Mapping[int, list]], path: Path,
                    names: Sequence[str] = ("smart", "smart_v1")) -> None:
    """κ used and the controller's signal per epoch (`controller.error_on`: the error of all
    triplets or of the mined ones), one line per seed, each variant's target dotted (the
    paper's Figs. 3–4)."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name in names:
        targets = set()
        for number, (_, records) in enumerate(sorted(finished.get(name, {}).items())):
            epoch_axis = [r["epoch"] for r in records]
            kappa = [r["kappa"] if r.get("kappa") is not None else math.nan for r in records]
            signal = [controller_signal(r) for r in records]
            targets |= {goal for _, goal in signal}
            label = name if number == 0 else None
            style = {"color": _style(name)["color"], "marker": "o", "markersize": 3,
                     "alpha": 0.8}
            top.plot(epoch_axis, kappa, label=label, **style)
            bottom.plot(epoch_axis, [error for error, _ in signal], label=label, **style)
        for goal in sorted(targets):
            bottom.axhline(goal, color=_style(name)["color"], linestyle=":", alpha=0.7,
                           label=f"{name} target {goal}")
    top.set_ylabel("κ (mining epochs)")
    top.set_yscale("log", base=2)
    bottom.set_ylabel("controller's error signal")
    bottom.set_xlabel("epoch")
    from matplotlib import ticker

    bottom.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    if not any(finished.get(name) for name in names):
        top.text(0.5, 0.5, f"no finished {' / '.join(names)} run", ha="center",
                 transform=top.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_triplet_montage(panels: Sequence[tuple[str, np.ndarray]], path: Path,
                         title: str = "") -> None:
    """panels: (caption, uint8 [K, 3, S, S, C] anchor / positive / negative images); one row per
    anchor, three columns per panel."""
    plt = _pyplot()
    rows = max((images.shape[0] for _, images in panels), default=0)
    columns = 3 * len(panels)
    figure, axes = plt.subplots(max(rows, 1), max(columns, 1),
                                figsize=(1.2 * max(columns, 1), 1.3 * max(rows, 1) + 0.6),
                                squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for panel, (caption, images) in enumerate(panels):
        for row in range(images.shape[0]):
            for role, name in enumerate(("anchor", "positive", "negative")):
                axis = axes[row, 3 * panel + role]
                image = images[row, role]
                axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
                            vmin=0, vmax=255)
                if row == 0:
                    axis.set_title(f"{caption}\n{name}" if role == 1 else name, fontsize=7)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no triplets saved", ha="center")
    if title:
        figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def choose_triplets(triplets: Mapping[int, Mapping[str, np.ndarray]], num_anchors: int,
                    seed: int = 0) -> list[tuple[int, np.ndarray, bool]]:
    """Two epochs of saved triplets ({epoch: npz arrays}) for the montage: the first epoch with
    mined triplets and the last (the first and the last when they coincide). Returns, per
    epoch, (epoch, int [K, 3] rows (anchor, positive, negative), all shown rows mined): a
    seeded uniform draw of K of that epoch's mined triplets (of all its triplets where none
    was mined), so that the panel is a fair sample of what the epoch trained on."""
    epochs = sorted(triplets)
    if not epochs:
        return []
    mined_epochs = [e for e in epochs if np.asarray(triplets[e]["mined"]).any()]
    chosen = sorted({mined_epochs[0] if mined_epochs else epochs[0], epochs[-1]})
    if len(chosen) == 1 and len(epochs) > 1:
        chosen = [epochs[0], epochs[-1]]
    rng = np.random.default_rng(seed)
    panels = []
    for epoch in chosen:
        arrays = triplets[epoch]
        mined = np.asarray(arrays["mined"], bool)
        pool = np.flatnonzero(mined) if mined.any() else np.arange(len(mined))
        if not pool.size:
            continue
        rows = np.sort(rng.choice(pool, min(num_anchors, pool.size), replace=False))
        shown = np.stack([arrays["anchor"], arrays["positive"], arrays["negative"]], 1)[rows]
        panels.append((epoch, shown, bool(mined[rows].all())))
    return panels


def montage_panels(workdir: Path, num_anchors: int = 8) -> tuple[list, str]:
    """Loads a run's saved triplets and its training images (the run's config.json,
    `smine_jax.data`): the panels of `plot_triplet_montage` and a title."""
    import ml_collections

    from smine_jax import data, train

    files = sorted((workdir / "triplets").glob("epoch_*.npz"))
    triplets = {}
    for file in files:
        stem = file.stem.split("_")
        if len(stem) == 2 and stem[1].isdigit():  # one process: epoch_EEEE.npz
            with np.load(file) as arrays:
                triplets[int(stem[1])] = {key: arrays[key] for key in arrays.files}
    chosen = choose_triplets(triplets, num_anchors)
    if not chosen:
        return [], ""
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())[
        "config"])
    dataset = data.build_dataset(config.data, progress=False)
    dataset = train.subset_dataset(dataset, max_classes=int(config.subset.max_classes),
                                   max_per_class=int(config.subset.max_per_class))
    images = data.load(config.data, split="train", dataset=dataset, progress=False).images
    panels = [(f"epoch {epoch} ({'mined' if mined else 'random'})", data.gather(images, rows))
              for epoch, rows, mined in chosen]
    return panels, f"{workdir.parent.name}, {workdir.name}: anchor, positive, negative"
