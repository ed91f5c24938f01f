"""Omniglot, the CPU protocol: a small conv net at 28², 64-d, background / evaluation split.

    python -m experiments.omniglot --config=experiments/configs/omniglot.py --workdir=DIR
    --config.data.dir=PATH/TO/omniglot (offline; default: downloaded once, ~15 MB)

Choices: images squashed to 28² and used whole (crop 28 = no crop augmentation, no flip: the
characters are centred and mirroring changes a character), one channel; 4 blocks of 64 channels
(28 -> 14 -> 7 -> 3 -> 1), 64-d head trained with the backbone's learning rate (no pretrained
backbone, so no ×10); lr 0.1 halved every 4 epochs over 20 epochs; in-batch baselines on
m-per-class batches of 128 images (32 classes × 4).
"""

from __future__ import annotations

from smine_jax.configs import common


def smoke(config):
    """A tiny run (about a minute on CPU): 32 classes × 8 images per split, a 2-block net."""
    config.model.width = 16
    config.model.depth = 2
    config.data.strict_counts = False
    config.subset.max_classes = 32
    config.subset.max_per_class = 8
    config.train.update(epochs=3, batch_size=32, inbatch_images=64, embed_batch_size=64,
                        eval_every=1)


def get_config(arg: str | None = None):
    config = common.base_config()
    config.data.update(name="omniglot", image_size=28, crop_size=28, channels=1, flip=False,
                       mean=(0.92,), std=(0.22,))  # measured at 28²
    config.model.update(name="small_conv", width=64, depth=4, pooling="avg")
    config.optimizer.update(head_lr_multiplier=1.0, lr_halve_every=4)
    # In-batch baselines: m-per-class batches of 128 images (the PyTorch reference's).
    config.train.update(epochs=20, eval_every=5, inbatch_images=128)
    return common.apply_variants(config, arg, extra={"smoke": smoke})
