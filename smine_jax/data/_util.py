"""Small helpers shared by the data modules: argument checks and hashing."""

from __future__ import annotations

import hashlib
import json

import numpy as np


def positive_int(value, name: str) -> int:
    """int(value) if it is an integer >= 1, else ValueError naming `name`."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer, float))
            or int(value) != value or value < 1):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_channels(channels) -> int:
    """1 (grey) or 3 (RGB), else ValueError."""
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    return int(channels)


def sha256_json(value) -> str:
    """sha256 hex digest of the canonical JSON of `value`."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
