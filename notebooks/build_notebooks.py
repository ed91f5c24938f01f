"""Writes the Colab notebooks of this folder from the cell sources below, outputs stripped.

    python notebooks/build_notebooks.py           # (re)write notebooks/*.ipynb
    python notebooks/build_notebooks.py --check   # exit status 1 if a committed file differs

The notebooks are reviewed here, as Python strings, and regenerated; never edit the .ipynb
files by hand (tests/test_notebooks.py checks that they match this script and carry no
outputs). Cell ids are fixed, so the same sources always give the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat import v4

NOTEBOOKS_DIR = Path(__file__).resolve().parent
PARAMETERS_TAG = "parameters"  # papermill's convention: the cell a runner may override

# ----------------------------------------------------------------------------------------------
# Cells both notebooks share.

SETUP = r'''
# Set-up. On Colab (Runtime > Change runtime type > TPU) this installs smine_jax from its
# repository; elsewhere install it first (README, "Setup").
REPO_URL = "https://github.com/OWNER/REPO"  # placeholder: the project's repository
EXTRA = "tpu"  # "gpu" on a GPU runtime, "" on CPU

import importlib.util
import subprocess
import sys


def importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


if importable("google.colab") and not importable("smine_jax"):
    requirement = f"smine_jax[{EXTRA}] @ git+{REPO_URL}" if EXTRA else f"git+{REPO_URL}"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", requirement])

from smine_jax import hostmem

hostmem.tune_malloc()  # before jax runs anything (README, "XLA on CPU")

import jax

backend = jax.default_backend()
print(f"jax {jax.__version__}: {backend.upper()} backend, {jax.device_count()} device(s)")
for device in jax.devices():
    print(" ", device.id, device.device_kind)
'''

COMMON_PARAMETERS = r'''
# Parameters (a "parameters" cell: edit here, or set the SMINE_NOTEBOOK_* environment variables
# as the test suite does).
import os

SMALL = os.environ.get("SMINE_NOTEBOOK_SMALL", "0") == "1"  # tiny sizes: CPU, the test suite
# Data: DATA_DIR "" downloads Omniglot's two official archives once (~15 MB, online; the files
# tfds's `omniglot` reads, checked against its checksums; no TensorFlow needed). Offline, a
# local folder: DATASET "omniglot" (images_background/ + images_evaluation/, or their parent)
# or "folder" (any root/<class>/<image> tree, the first half of the classes train).
DATA_DIR = os.environ.get("SMINE_NOTEBOOK_DATA", "")
DATASET = "omniglot"
FIGURES_DIR = os.environ.get("SMINE_NOTEBOOK_FIGURES", "figures")  # every figure is saved here
SEED = 0
'''

PLOT_HELPERS = r'''
# Figure helpers: every figure is saved to FIGURES_DIR and shown.
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

figures_dir = Path(FIGURES_DIR)
figures_dir.mkdir(parents=True, exist_ok=True)


def save_and_show(figure, name):
    """Writes `figure` to FIGURES_DIR/name (PNG), then shows it."""
    path = figures_dir / name
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.show()
    print(f"saved {path}")


def triplet_montage(images, triplet_ids, labels, title, notes=()):
    """Rows anchor / positive / negative, one column per triplet.

    images: uint8 [N, S, S, C]; triplet_ids: int [T, 3] (anchor, positive, negative) sample
    ids; labels: [N] class labels; notes: optional text under each column.
    """
    triplet_ids = np.asarray(triplet_ids)
    columns = len(triplet_ids)
    figure, axes = plt.subplots(3, columns, figsize=(1.3 * columns, 4.6), squeeze=False)
    for row, role in enumerate(("anchor", "positive", "negative")):
        for column, sample in enumerate(triplet_ids[:, row]):
            axis = axes[row, column]
            image = images[sample]
            axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
                        vmin=0, vmax=255)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"class {labels[sample]}", fontsize=7)
        axes[row, 0].set_ylabel(role)
    for column, note in enumerate(notes):
        axes[2, column].set_xlabel(note, fontsize=7)
    figure.suptitle(title)
    return figure


def distances(embeddings, triplet_ids):
    """(d(a, p), d(a, n)): Euclidean distances of [T, 3] triplets in `embeddings`."""
    anchor, positive, negative = (embeddings[triplet_ids[:, i]] for i in range(3))
    return (np.linalg.norm(anchor - positive, axis=1),
            np.linalg.norm(anchor - negative, axis=1))
'''

# ----------------------------------------------------------------------------------------------
# 01_quickstart: the project's trainer on Omniglot, then its records as figures.

QUICKSTART = (
    ("markdown", r'''# smine_jax quickstart: Smart Mining on Omniglot

Trains the Omniglot configuration (`experiments/configs/omniglot.py`, a 4 × 64 conv net at 28²)
with **Smart Mining** (Harwood et al., ICCV 2017): every epoch embeds the training set, builds
nearest-neighbour lists, mines triplets whose negatives lie beyond κ times the nearest positive
(Algorithm 1, Eq. 6), trains with the ratio triplet + global loss (Eqs. 2-3), and lets the
controller set the next κ from the training error (Eqs. 7-8). Everything comes from one call,
`train.train_and_evaluate(config, workdir)`; the figures below are read back from the workdir:

1. Recall@1 on the test classes per epoch;
2. κ and the training error per epoch;
3. a few mined triplets (anchor, positive, negative);
4. a 2-D t-SNE of the test embeddings, coloured by class.

On Colab choose *Runtime > Change runtime type > TPU* first. `SMALL = True` (below) is a tiny
run of a few seconds on a CPU.'''),
    ("code", SETUP),
    ("parameters", COMMON_PARAMETERS + r'''
EPOCHS = 3 if SMALL else 10
WORKDIR = os.environ.get("SMINE_NOTEBOOK_WORKDIR", "")  # "" = a fresh temporary folder
TSNE_CLASSES = 20  # test classes shown in the t-SNE
'''),
    ("markdown", r'''## Configuration

The experiment config with a few fields changed; `print(config)` lists every field, and the
README's table says which are choices of this implementation. With `SMALL`, the `smoke`
variant (a 2-block net on 32 classes × 8 images per split), κ₀ = 1 so that mining finds
triplets on so few images, and one random epoch instead of two, so that two epochs mine.'''),
    ("code", r'''import tempfile
from pathlib import Path

from experiments.configs import omniglot

config = omniglot.get_config("smoke" if SMALL else None)  # variant "smart" (the default)
config.seed = SEED
config.data.update(name=DATASET, dir=DATA_DIR)
if DATASET != "omniglot":
    config.data.strict_counts = False  # official counts exist for Omniglot only
config.train.update(epochs=EPOCHS, eval_every=1 if SMALL else 2, progress=not SMALL)
if SMALL:
    config.controller.update(kappa_init=1.0, random_epochs=1)
workdir = Path(WORKDIR or tempfile.mkdtemp(prefix="smine_quickstart_"))
print("workdir:", workdir)
print("model:", dict(config.model))
print("controller:", dict(config.controller))
'''),
    ("markdown", r'''## Training

Writes `config.json`, `metrics.jsonl` (one record per epoch), checkpoints, the epoch's triplets
(`triplets/epoch_XXXX.npz`) and the embedding dumps into the workdir, and returns the final test
metrics. Rerunning this cell on the same workdir resumes from its last checkpoint.'''),
    ("code", r'''from smine_jax import train

results = train.train_and_evaluate(config, workdir)
print({name: round(value, 4) for name, value in results.items()})
'''),
    ("code", r'''import json

records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
print("epoch  loss    error  kappa  mined  R@1")
for record in records:
    kappa = f"{record['kappa']:5.2f}" if record["kappa"] is not None else "  -  "
    recall = f"{record['test']['recall@1']:.3f}" if "test" in record else "  -"
    print(f"{record['epoch']:5d}  {record['loss']:.4f}  {record['training_error']:.3f}  "
          f"{kappa}  {record['mined_fraction']:.2f}   {recall}")
'''),
    ("code", PLOT_HELPERS),
    ("markdown", r'''## Recall@1 per epoch

Leave-one-out Recall@1 on the test classes (`metrics.evaluate`), every `train.eval_every`
epochs and after the last.'''),
    ("code", r'''evaluated = [record for record in records if "test" in record]
figure, axis = plt.subplots(figsize=(5, 3.2))
axis.plot([r["epoch"] for r in evaluated], [r["test"]["recall@1"] for r in evaluated], "o-")
axis.set(xlabel="epoch", ylabel="Recall@1 (test classes)", title="Recall@1 vs epoch")
axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
axis.grid(alpha=0.3)
save_and_show(figure, "01_recall_at_1.png")
'''),
    ("markdown", r'''## κ and the training error

The training error e is the fraction of the epoch's triplets with a non-zero ratio loss; the
controller steers by it over every triplet or over the mined ones only
(`controller.error_on`, logged as `controller_error`). The first epochs train on random
triplets only; from then on the controller fits κ = α·e + β to the recent (κ, e) pairs and
picks the κ expected to bring e to the target (dashed).'''),
    ("code", r'''mining_records = [record for record in records if record["mining"]]
signal = [r["controller_error"] if r["controller_error"] is not None else float("nan")
          for r in records]
figure, error_axis = plt.subplots(figsize=(6, 3.6), layout="constrained")
error_axis.plot([r["epoch"] for r in records], [r["training_error"] for r in records], "o-",
                color="tab:blue", alpha=0.5, label="training error (all triplets)")
error_axis.plot([r["epoch"] for r in records], signal, "^-", color="tab:blue",
                label=f"controller's signal ({config.controller.error_on})")
error_axis.axhline(config.controller.target_error, color="tab:blue", linestyle="--",
                   alpha=0.6, label="target error")
error_axis.set(xlabel="epoch", ylabel="training error", ylim=(0, 1.05))
error_axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
kappa_axis = error_axis.twinx()
kappa_axis.plot([r["epoch"] for r in mining_records], [r["kappa"] for r in mining_records],
                "s-", color="tab:red", label="κ (mining epochs)")
kappa_axis.set_yscale("log", base=2)
kappa_axis.yaxis.set_major_formatter("{x:g}")
kappa_axis.set_ylabel("κ", color="tab:red")
handles = error_axis.get_legend_handles_labels()[0] + kappa_axis.get_legend_handles_labels()[0]
figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
error_axis.set_title("κ and training error per epoch")
save_and_show(figure, "01_kappa_training_error.png")
'''),
    ("markdown", r'''## Mined triplets

The last epoch's triplets (`triplets/epoch_XXXX.npz`: train-split ids and whether each was
mined) shown from the image cache the trainer used. Under each column, the distances in the
embedding they were mined from (that epoch's dump): a mined negative lies beyond the boundary
and its positive farther away still (bar the rare fallbacks of the README's implementation
notes), so the triplet violates the margin.'''),
    ("code", r'''from smine_jax import data, index

dataset = train.subset_dataset(data.build_dataset(config.data, progress=False),
                               max_classes=config.subset.max_classes,
                               max_per_class=config.subset.max_per_class)
train_split = data.load(config.data, split="train", dataset=dataset, progress=False)

last = sorted((workdir / "triplets").glob("epoch_*.npz"))[-1]
epoch = int(last.stem.split("_")[1])
saved = np.load(last)
rows = np.stack([saved["anchor"], saved["positive"], saved["negative"]], axis=1)
mined = np.flatnonzero(saved["mined"])
kind = "mined" if len(mined) else "random (nothing mined)"
shown = rows[mined[:8]] if len(mined) else rows[:8]
dump = workdir / "embeddings" / f"epoch_{epoch:04d}"
notes = ()
if dump.is_dir():  # the training embeddings this epoch was mined from
    embeddings, _, _ = index.read_shards(dump)
    notes = [f"d+ {p:.2f}\nd- {n:.2f}" for p, n in zip(*distances(embeddings, shown), strict=True)]
print(f"epoch {epoch}: {len(mined)} of {len(rows)} triplets mined")
figure = triplet_montage(train_split.images, shown, train_split.labels,
                         f"{kind} triplets of epoch {epoch}", notes)
save_and_show(figure, "01_mined_triplets.png")
'''),
    ("markdown", r'''## t-SNE of the test embeddings

The embeddings of the last evaluation (`embeddings/test`), for the first `TSNE_CLASSES` test
classes, mapped to 2-D with scikit-learn's t-SNE.'''),
    ("code", r'''from sklearn.manifold import TSNE

embeddings, labels, _ = index.read_shards(workdir / "embeddings" / "test")
classes = np.unique(labels)[:TSNE_CLASSES]
keep = np.isin(labels, classes)
points = TSNE(n_components=2, perplexity=min(30.0, (keep.sum() - 1) / 3), init="pca",
              method="exact" if keep.sum() <= 250 else "barnes_hut",  # exact: few points
              random_state=SEED).fit_transform(embeddings[keep])
figure, axis = plt.subplots(figsize=(5.5, 5))
axis.scatter(points[:, 0], points[:, 1], c=np.searchsorted(classes, labels[keep]) % 20,
             cmap="tab20", vmin=0, vmax=19, s=14)
axis.set(xticks=[], yticks=[],
         title=f"t-SNE, {len(classes)} test classes (R@1 {results['recall@1']:.3f})")
save_and_show(figure, "01_tsne.png")
'''),
)

# ----------------------------------------------------------------------------------------------
# 02_sample_triplets: the pure mining function inside a user's own loop.

SAMPLE_TRIPLETS = (
    ("markdown", r'''# Smart mining in your own training loop

`smine_jax.mining.sample_triplets` is a pure function: neighbour lists, labels, κ and a PRNG
key in, triplet ids out; no trainer, no state. This notebook writes a minimal loop around it:

1. embed the training images with a small conv net (`models.build_model`);
2. `index.neighbours`: each image's k nearest other images;
3. `mining.sample_triplets` (Algorithm 1): per anchor, the nearest positive p⁺ᴺᴺ sets the
   boundary κ·d²(a, p⁺ᴺᴺ) (Eq. 6); the nearest negative beyond it is paired with a positive
   farther away, so each mined triplet violates the margin;
4. a few optax steps on the ratio triplet + global loss (`losses.triplet_objective`,
   Eqs. 2-3); repeat.

Then: the triplets it picked, and how κ changes what is mined. On Colab choose
*Runtime > Change runtime type > TPU* first.'''),
    ("code", SETUP),
    ("parameters", COMMON_PARAMETERS + r'''
MAX_CLASSES = 0 if SMALL else 200  # training classes used (0 = all)
ROUNDS = 2 if SMALL else 5  # embed -> neighbours -> mine -> train rounds
STEPS_PER_ROUND = 3 if SMALL else 40  # optax steps per round
BATCH_SIZE = 16 if SMALL else 128  # triplets per step
KAPPA = 2.0  # κ of the training rounds
KAPPAS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)  # the κ sweep at the end
'''),
    ("markdown", r'''## Data

The Omniglot experiment's data settings (28² grey images, its mean and std) through
`data.load`: an image cache (uint8 [N, 28, 28, 1]) decoded once, plus labels.'''),
    ("code", r'''import numpy as np

from experiments.configs import omniglot
from smine_jax import data

config_data = omniglot.get_config().data
config_data.update(name=DATASET, dir=DATA_DIR, strict_counts=DATASET == "omniglot" and not SMALL)
train_split = data.load(config_data, split="train", progress=False)
keep = train_split.labels < MAX_CLASSES if MAX_CLASSES else np.s_[:]
images = np.asarray(train_split.images[keep])  # uint8 [N, 28, 28, 1]
labels = np.asarray(train_split.labels[keep])  # 0-based class ids
augment, preprocess = data.preprocessors(config_data)  # pure, run inside the jitted steps
print(f"{len(images)} images of {len(np.unique(labels))} classes, {images.shape[1:]}")
'''),
    ("markdown", r'''## Model, embedding and train step

A small conv net with a 64-d L2-normalised head (the same module the trainer builds), a jitted
embedding pass over fixed-size padded batches, and a jitted train step on a batch of triplets:
the 3B images go through the net at once and `losses.triplet_objective` takes the (a, p, n)
rows.'''),
    ("code", r'''import optax

from smine_jax import index, losses, mining, models

model_config = models.default_config("small_conv")
model_config.update(width=16 if SMALL else 64, depth=2 if SMALL else 4,
                    embedding_dim=16 if SMALL else 64)
model = models.build_model(model_config)
key = jax.random.PRNGKey(SEED)
variables = models.init_variables(model, jax.random.fold_in(key, 0), (1, *images.shape[1:]))
optimizer = optax.sgd(0.05, momentum=0.9)
opt_state = optimizer.init(variables["params"])


@jax.jit
def embed_batch(variables, batch):
    return model.apply(variables, preprocess(batch))


def embed_all(variables, batch_size=256):
    """f32 [N, D]: every image once (eval mode), padded batches of one shape."""
    return np.concatenate([np.asarray(embed_batch(variables, batch.images))[batch.mask]
                           for batch in data.inference_batches(images, batch_size)])


@jax.jit
def train_step(variables, opt_state, key, batch):
    """One SGD step on uint8 [B, 3, S, S, C] triplet images (anchor, positive, negative)."""
    flat = batch.reshape((-1, *batch.shape[2:]))

    def loss_fn(params):
        embeddings, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, augment(key, flat),
            train=True, mutable=["batch_stats"])
        triplets = embeddings.reshape(batch.shape[0], 3, -1)
        loss, aux = losses.triplet_objective(triplets[:, 0], triplets[:, 1], triplets[:, 2])
        return loss, (aux, updates["batch_stats"])

    (_, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    return {"params": params, "batch_stats": batch_stats}, opt_state, aux
'''),
    ("markdown", r'''## The loop

Each round embeds every image, searches k = 2 × the largest class neighbours per image, mines
one triplet per anchor with `sample_triplets` (slots without a valid negative fall back to
random triplets, `mined=False`) and trains on a shuffled share of them.'''),
    ("code", r'''k = min(2 * int(np.bincount(labels).max()), len(labels) - 1)
shuffle = np.random.default_rng(SEED)
history = []
for round_index in range(ROUNDS):
    embeddings = embed_all(variables)
    neighbour_ids, sq_dists = index.neighbours(embeddings, k)
    triplets = mining.sample_triplets(jax.random.fold_in(key, 1000 + round_index),
                                      neighbour_ids, sq_dists, labels, KAPPA)
    rows = np.stack([np.asarray(ids) for ids in triplets[:3]], axis=1)  # [N, 3] sample ids
    mined = np.asarray(triplets.mined)
    order = np.resize(shuffle.permutation(len(rows)), STEPS_PER_ROUND * BATCH_SIZE)
    for step, ids in enumerate(order.reshape(STEPS_PER_ROUND, BATCH_SIZE)):
        step_key = jax.random.fold_in(key, 10_000 * (round_index + 1) + step)
        variables, opt_state, aux = train_step(variables, opt_state, step_key,
                                               data.gather(images, rows[ids]))
        history.append({name: float(value) for name, value in aux.items()})
    print(f"round {round_index}: {mined.sum()} of {len(rows)} anchors mined at κ = {KAPPA}, "
          f"loss {history[-1]['loss']:.4f}, training error {history[-1]['training_error']:.3f}")
'''),
    ("code", PLOT_HELPERS),
    ("code", r'''figure, axis = plt.subplots(figsize=(6, 3.2))
axis.plot([h["loss"] for h in history], label="loss (ratio triplet + global)")
axis.plot([h["training_error"] for h in history], label="training error")
for boundary in range(STEPS_PER_ROUND, len(history), STEPS_PER_ROUND):
    axis.axvline(boundary - 0.5, color="grey", alpha=0.3)  # a new round: mined again
axis.set(xlabel="step", title="training on sample_triplets' triplets")
axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
axis.legend(fontsize=8)
save_and_show(figure, "02_training.png")
'''),
    ("markdown", r'''## The triplets it picked

The last round's mined triplets, with their distances in the embedding they were mined from.
The negative lies beyond the boundary (d(a, n) ≥ √κ · d(a, p⁺ᴺᴺ)) and before the positive
(d(a, n) < d(a, p)): a hard triplet, but not one of the hardest, which are more often label
noise or the same mode.'''),
    ("code", r'''picked = rows[mined][:8]
notes = [f"d+ {p:.2f}\nd- {n:.2f}"
         for p, n in zip(*distances(embeddings, picked), strict=True)]
figure = triplet_montage(images, picked, labels, f"mined triplets at κ = {KAPPA}", notes)
save_and_show(figure, "02_picked_triplets.png")
'''),
    ("markdown", r'''## How κ changes what is mined

Because `sample_triplets` is a pure function, mining for many κ is a `jax.vmap` over κ with
the same neighbour lists (`mine_triplets` is the same call that also returns `MiningInfo`,
here for p⁺ᴺᴺ). A larger κ skips more near negatives: fewer anchors find one inside their k
neighbours, and the negatives found lie farther away, at least √κ · d(a, p⁺ᴺᴺ).'''),
    ("code", r'''import jax.numpy as jnp

sweep_key = jax.random.fold_in(key, 2)
sweep, info = jax.vmap(lambda kappa: mining.mine_triplets(
    sweep_key, neighbour_ids, sq_dists, labels, kappa))(jnp.asarray(KAPPAS, jnp.float32))
mined_share, negative_distance, distance_ratio = [], [], []
for position, kappa in enumerate(KAPPAS):
    is_mined = np.asarray(sweep.mined[position])
    anchor = np.asarray(sweep.anchor[position])[is_mined]
    negative = np.asarray(sweep.negative[position])[is_mined]
    nearest = np.asarray(info.nearest_positive[position])[anchor]  # p_nn of each anchor
    d_negative = np.linalg.norm(embeddings[anchor] - embeddings[negative], axis=1)
    d_nearest = np.linalg.norm(embeddings[anchor] - embeddings[nearest], axis=1)
    mined_share.append(is_mined.mean())
    negative_distance.append(d_negative.mean() if is_mined.any() else np.nan)
    apart = d_nearest > 0  # p_nn on top of the anchor: boundary 0 for every κ, no ratio
    distance_ratio.append(np.median(d_negative[apart] / d_nearest[apart]) if apart.any()
                          else np.nan)
    print(f"κ = {kappa:5.2f}: {is_mined.sum():5d} mined, mean d(a, n) "
          f"{negative_distance[-1]:.3f}, median d(a, n) / d(a, p_nn) {distance_ratio[-1]:.2f}")

figure, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharex=True, layout="constrained")
axes[0].plot(KAPPAS, mined_share, "o-")
axes[0].set(ylabel="share of anchors mined", ylim=(0, 1.05))
axes[1].plot(KAPPAS, negative_distance, "o-")
axes[1].set(ylabel="mean d(a, n) of mined triplets")
axes[2].plot(KAPPAS, distance_ratio, "o-", label="median d(a, n) / d(a, p⁺ᴺᴺ)")
axes[2].plot(KAPPAS, np.sqrt(KAPPAS), "k--", label="boundary √κ")
axes[2].legend(fontsize=8)
for axis in axes:
    axis.set_xscale("log", base=2)
    axis.set_xticks(KAPPAS, labels=[f"{kappa:g}" for kappa in KAPPAS], fontsize=7)
    axis.set_xlabel("κ")
    axis.grid(alpha=0.3)
figure.suptitle("what κ mines")
save_and_show(figure, "02_kappa_sweep.png")
'''),
)

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_sample_triplets.ipynb": SAMPLE_TRIPLETS,
}

_METADATA = {
    "accelerator": "TPU",  # Colab opens them on a TPU runtime
    "colab": {"provenance": []},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def build(cells) -> nbformat.NotebookNode:
    """A notebook (nbformat 4, no outputs) from (kind, source) pairs; kind "markdown", "code"
    or "parameters" (a code cell tagged for papermill-style runners)."""
    notebook = v4.new_notebook(metadata=_METADATA)
    for number, (kind, source) in enumerate(cells):
        source = source.strip("\n")
        if kind == "markdown":
            cell = v4.new_markdown_cell(source)
        else:
            cell = v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = [PARAMETERS_TAG]
        cell.id = f"cell-{number:02d}"  # fixed ids: the same sources give the same file
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    return notebook


def notebooks() -> dict[str, nbformat.NotebookNode]:
    """File name -> generated notebook, for every notebook of this folder."""
    return {name: build(cells) for name, cells in NOTEBOOKS.items()}


def render(notebook: nbformat.NotebookNode) -> str:
    """The file text of `notebook` (nbformat's JSON, one trailing newline)."""
    return nbformat.writes(notebook).rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare with the files on disk; exit 1 if one differs")
    args = parser.parse_args(argv)
    stale = []
    for name, notebook in notebooks().items():
        path = NOTEBOOKS_DIR / name
        text = render(notebook)
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build_notebooks.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
