"""The cars196 config file of the command line (ml_collections loads it by path):

    python -m experiments.cars196 --config=experiments/configs/cars196.py[:VARIANT] --workdir=DIR

The config itself is `smine_jax.configs.cars196`, installed with the package.
"""

from smine_jax.configs.cars196 import get_config

__all__ = ["get_config"]
