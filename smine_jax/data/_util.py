"""Small helpers shared by the data modules: argument checks and hashing."""

from __future__ import annotations

import hashlib
import json

from smine_jax import validation


def positive_int(value, name: str) -> int:
    """A positive integer from a config, where 2.0 means 2 (`validation.positive_int`)."""
    return validation.positive_int(value, name, whole_floats=True)


def check_channels(channels) -> int:
    """1 (grey) or 3 (RGB), else ValueError."""
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    return int(channels)


def sha256_json(value) -> str:
    """sha256 hex digest of the canonical JSON of `value`."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
