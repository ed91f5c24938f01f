# %% [markdown]
# # smine_jax quickstart: Smart Mining on Omniglot
#
# Trains the Omniglot configuration (`smine_jax.configs.omniglot`, a 4 × 64 conv net at 28²)
# with **Smart Mining** (Harwood et al., ICCV 2017): every epoch embeds the training set, builds
# nearest-neighbour lists, mines triplets whose negatives lie beyond κ times the nearest positive
# (Algorithm 1, Eq. 6), trains with the ratio triplet + global loss (Eqs. 2-3), and lets the
# controller set the next κ from the training error (Eqs. 7-8). Everything comes from one call,
# `train.train_and_evaluate(config, workdir)`; the figures below are read back from the workdir:
#
# 1. Recall@1 on the test classes per epoch;
# 2. κ and the training error per epoch;
# 3. a few mined triplets (anchor, positive, negative);
# 4. a 2-D t-SNE of the test embeddings, coloured by class.
#
# On Colab choose *Runtime > Change runtime type > TPU* first and fill in the install cell's
# `PACKAGE_SOURCE` (where to pip-install smine_jax from). `SMALL = True` (below) is a tiny run of
# a few seconds on a CPU.

# %%
# shared cell: install

# %%
# shared cell: backend

# %% tags=["parameters"]
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

EPOCHS = 3 if SMALL else 10
WORKDIR = os.environ.get("SMINE_NOTEBOOK_WORKDIR", "")  # "" = a fresh temporary folder
TSNE_CLASSES = 20  # test classes shown in the t-SNE

# %% [markdown]
# ## Configuration
#
# The experiment config with a few fields changed; `print(config)` lists every field, and the
# README's table says which are choices of this implementation. With `SMALL`, the `smoke`
# variant (a 2-block net on 32 classes × 8 images per split), κ₀ = 1 so that mining finds
# triplets on so few images, and one random epoch instead of two, so that two epochs mine.

# %%
import tempfile
from pathlib import Path

from smine_jax.configs import omniglot

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

# %% [markdown]
# ## Training
#
# Writes `config.json`, `metrics.jsonl` (one record per epoch), checkpoints, the epoch's triplets
# (`triplets/epoch_XXXX.npz`) and the embedding dumps into the workdir, and returns the final test
# metrics. Rerunning this cell on the same workdir resumes from its last checkpoint.

# %%
from smine_jax import train

results = train.train_and_evaluate(config, workdir)
print({name: round(value, 4) for name, value in results.items()})

# %%
import json

records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
print("epoch  loss    error  kappa  mined  R@1")
for record in records:
    kappa = f"{record['kappa']:5.2f}" if record["kappa"] is not None else "  -  "
    recall = f"{record['test']['recall@1']:.3f}" if "test" in record else "  -"
    print(f"{record['epoch']:5d}  {record['loss']:.4f}  {record['training_error']:.3f}  "
          f"{kappa}  {record['mined_fraction']:.2f}   {recall}")

# %%
# shared cell: figures

# %% [markdown]
# ## Recall@1 per epoch
#
# Leave-one-out Recall@1 on the test classes (`metrics.evaluate`), every `train.eval_every`
# epochs and after the last.

# %%
evaluated = [record for record in records if "test" in record]
figure, axis = plt.subplots(figsize=(5, 3.2))
axis.plot([r["epoch"] for r in evaluated], [r["test"]["recall@1"] for r in evaluated], "o-")
axis.set(xlabel="epoch", ylabel="Recall@1 (test classes)", title="Recall@1 vs epoch")
axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
axis.grid(alpha=0.3)
save_and_show(figure, "01_recall_at_1.png")

# %% [markdown]
# ## κ and the training error
#
# The training error e is the fraction of the epoch's triplets with a non-zero ratio loss; the
# controller steers by it over every triplet or over the mined ones only
# (`controller.error_on`, logged as `controller_error`). The first epochs train on random
# triplets only; from then on the controller fits κ = α·e + β to the recent (κ, e) pairs and
# picks the κ expected to bring e to the target (dashed).

# %%
mining_records = [record for record in records if record["mining"]]
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

# %% [markdown]
# ## Mined triplets
#
# The last epoch's triplets (`triplets/epoch_XXXX.npz`: train-split ids and whether each was
# mined) shown from the image cache the trainer used. Under each column, the distances in the
# embedding they were mined from (that epoch's dump): a mined negative lies beyond the boundary
# and its positive farther away still (bar the rare fallbacks of the README's implementation
# notes), so the triplet violates the margin.

# %%
from smine_jax import data, index

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

# %% [markdown]
# ## t-SNE of the test embeddings
#
# The embeddings of the last evaluation (`embeddings/test`), for the first `TSNE_CLASSES` test
# classes, mapped to 2-D with scikit-learn's t-SNE.

# %%
from sklearn.manifold import TSNE

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
