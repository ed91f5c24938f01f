"""CUB-200-2011 (method.md §5): GoogLeNet, 64-d, classes 1–100 train / 101–200 test.

    python -m experiments.cub --config=experiments/configs/cub.py[:VARIANT] --workdir=DIR
    --config.data.dir=PATH (native CUB_200_2011/ folder; default: tfds caltech_birds2011)
    --config.model.init_from=googlenet.npz (ImageNet weights; python -m smine_jax.models.convert)
"""

from __future__ import annotations

from smine_jax.configs import common


def configure_paper_protocol(config, name: str):
    """method.md §5 on `name` ("cub" | "cars196"): GoogLeNet (torchvision layout: 256 -> 224 crops),
    ImageNet statistics, flip; the optimiser and schedule of `common.base_config`."""
    config.data.name = name
    config.data.flip = True
    config.model.name = "googlenet"
    common.use_model_inputs(config)  # image_size 256, crop 224, 3 channels, ImageNet mean/std
    return config


def smoke(config):
    """A tiny run (about a minute on CPU): small conv net, 32 classes × 8 images, 64² -> 56²."""
    config.model.name = "small_conv"
    config.model.width = 16
    config.model.depth = 3
    config.data.update(image_size=64, crop_size=56, strict_counts=False)
    config.subset.max_classes = 32
    config.subset.max_per_class = 8
    config.optimizer.head_lr_multiplier = 1.0
    config.train.update(epochs=3, batch_size=32, inbatch_images=64, embed_batch_size=64,
                        eval_every=1)


def get_config(arg: str | None = None):
    config = configure_paper_protocol(common.base_config(), "cub")
    return common.apply_variants(config, arg, extra={"smoke": smoke})
