# %% [markdown]
# # Smart mining in your own training loop
#
# `smine_jax.mining.sample_triplets` is a pure function: neighbour lists, labels, κ and a PRNG
# key in, triplet ids out; no trainer, no state. This notebook writes a minimal loop around it:
#
# 1. embed the training images with a small conv net (`models.build_model`);
# 2. `index.neighbours`: each image's k nearest other images;
# 3. `mining.sample_triplets` (Algorithm 1): per anchor, the nearest positive p⁺ᴺᴺ sets the
#    boundary κ·d²(a, p⁺ᴺᴺ) (Eq. 6); the nearest negative beyond it is paired with a positive
#    farther away, so each mined triplet violates the margin;
# 4. a few optax steps on the ratio triplet + global loss (`losses.triplet_objective`,
#    Eqs. 2-3); repeat.
#
# Then: the triplets it picked, and how κ changes what is mined. On Colab choose
# *Runtime > Change runtime type > TPU* first and fill in the install cell's `PACKAGE_SOURCE`
# (where to pip-install smine_jax from).

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

MAX_CLASSES = 0 if SMALL else 200  # training classes used (0 = all)
ROUNDS = 2 if SMALL else 5  # embed -> neighbours -> mine -> train rounds
STEPS_PER_ROUND = 3 if SMALL else 40  # optax steps per round
BATCH_SIZE = 16 if SMALL else 128  # triplets per step
KAPPA = 2.0  # κ of the training rounds
KAPPAS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)  # the κ sweep at the end

# %% [markdown]
# ## Data
#
# The Omniglot experiment's data settings (28² grey images, its mean and std) through
# `data.load`: an image cache (uint8 [N, 28, 28, 1]) decoded once, plus labels.

# %%
import numpy as np

from smine_jax import data
from smine_jax.configs import omniglot

config_data = omniglot.get_config().data
config_data.update(name=DATASET, dir=DATA_DIR, strict_counts=DATASET == "omniglot" and not SMALL)
train_split = data.load(config_data, split="train", progress=False)
keep = train_split.labels < MAX_CLASSES if MAX_CLASSES else np.s_[:]
images = np.asarray(train_split.images[keep])  # uint8 [N, 28, 28, 1]
labels = np.asarray(train_split.labels[keep])  # 0-based class ids
augment, preprocess = data.preprocessors(config_data)  # pure, run inside the jitted steps
print(f"{len(images)} images of {len(np.unique(labels))} classes, {images.shape[1:]}")

# %% [markdown]
# ## Model, embedding and train step
#
# A small conv net with a 64-d L2-normalised head (the same module the trainer builds), a jitted
# embedding pass over fixed-size padded batches, and a jitted train step on a batch of triplets:
# the 3B images go through the net at once and `losses.triplet_objective` takes the (a, p, n)
# rows.

# %%
import optax

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


# %% [markdown]
# ## The loop
#
# Each round embeds every image, searches k = 2 × the largest class neighbours per image, mines
# one triplet per anchor with `sample_triplets` (slots without a valid negative fall back to
# random triplets, `mined=False`) and trains on a shuffled share of them.

# %%
k = min(2 * int(np.bincount(labels).max()), len(labels) - 1)
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

# %%
# shared cell: figures

# %%
figure, axis = plt.subplots(figsize=(6, 3.2))
axis.plot([h["loss"] for h in history], label="loss (ratio triplet + global)")
axis.plot([h["training_error"] for h in history], label="training error")
for boundary in range(STEPS_PER_ROUND, len(history), STEPS_PER_ROUND):
    axis.axvline(boundary - 0.5, color="grey", alpha=0.3)  # a new round: mined again
axis.set(xlabel="step", title="training on sample_triplets' triplets")
axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
axis.legend(fontsize=8)
save_and_show(figure, "02_training.png")

# %% [markdown]
# ## The triplets it picked
#
# The last round's mined triplets, with their distances in the embedding they were mined from.
# The negative lies beyond the boundary (d(a, n) ≥ √κ · d(a, p⁺ᴺᴺ)) and before the positive
# (d(a, n) < d(a, p)): a hard triplet, but not one of the hardest, which are more often label
# noise or the same mode.

# %%
picked = rows[mined][:8]
notes = [f"d+ {p:.2f}\nd- {n:.2f}"
         for p, n in zip(*distances(embeddings, picked), strict=True)]
figure = triplet_montage(images, picked, labels, f"mined triplets at κ = {KAPPA}", notes)
save_and_show(figure, "02_picked_triplets.png")

# %% [markdown]
# ## How κ changes what is mined
#
# Because `sample_triplets` is a pure function, mining for many κ is a `jax.vmap` over κ with
# the same neighbour lists (`mine_triplets` is the same call that also returns `MiningInfo`,
# here for p⁺ᴺᴺ). A larger κ skips more near negatives: fewer anchors find one inside their k
# neighbours, and the negatives found lie farther away, at least √κ · d(a, p⁺ᴺᴺ).

# %%
import jax.numpy as jnp

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
