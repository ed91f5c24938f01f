"""The cub config file of the command line (ml_collections loads it by path):

    python -m experiments.cub --config=experiments/configs/cub.py[:VARIANT] --workdir=DIR

The config itself is `smine_jax.configs.cub`, installed with the package.
"""

from smine_jax.configs.cub import get_config

__all__ = ["get_config"]
