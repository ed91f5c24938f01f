"""Thin command-line entry points (cub, cars196, omniglot) and their ml_collections configs."""
