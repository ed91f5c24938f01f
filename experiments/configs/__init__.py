"""ml_collections experiment configs: get_config(arg) per dataset, shared defaults in common."""
