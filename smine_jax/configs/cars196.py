"""Cars196 (method.md §5): GoogLeNet, 64-d, classes 1–98 train / 99–196 test.

    python -m experiments.cars196 --config=experiments/configs/cars196.py[:VARIANT] --workdir=DIR
    --config.data.dir=PATH (native folder with cars_annos.mat; the tfds download is broken)
"""

from __future__ import annotations

from smine_jax.configs import common, cub


def get_config(arg: str | None = None):
    config = cub.configure_paper_protocol(common.base_config(), "cars196")
    return common.apply_variants(config, arg, extra={"smoke": cub.smoke})
