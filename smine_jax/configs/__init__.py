"""ml_collections experiment configs, installed with the package: `get_config(arg)` per dataset
(omniglot, cub, cars196), shared defaults and the paper's variants in `common`.

The command line loads them through the config files in a checkout's experiments/configs/
(`--config=experiments/configs/omniglot.py:smoke`), each of which delegates here; code
imports them directly: `from smine_jax.configs import omniglot`.
"""
