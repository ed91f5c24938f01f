"""Config files for `--config=` (loaded by path): each delegates `get_config` to
`smine_jax.configs.<dataset>`, where the configs live so that they install with the package."""
