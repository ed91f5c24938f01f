"""The omniglot config file of the command line (ml_collections loads it by path):

    python -m experiments.omniglot --config=experiments/configs/omniglot.py[:VARIANT] --workdir=DIR

The config itself is `smine_jax.configs.omniglot`, installed with the package.
"""

from smine_jax.configs.omniglot import get_config

__all__ = ["get_config"]
