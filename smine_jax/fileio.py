"""Atomic file writes: a temporary name beside the target, fsync, then rename.

A reader (or a resumed run) sees either the old file or the complete new one, never half of
it; a writer killed mid-way leaves only a hidden temporary file, which nothing trusts.
Used for embedding shards, weight files, cache sidecars, config.json and metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any


def write_atomically(path, write: Callable[[Any], None]) -> None:
    """Writes through `write(binary_file)` to a hidden temporary name beside `path`, fsyncs it,
    then renames it over `path`; the temporary file is removed if anything fails."""
    directory, name = os.path.split(os.fspath(path))
    temporary = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_text_atomically(path, text: str) -> None:
    """`text` (UTF-8) to `path`, atomically."""
    write_atomically(path, lambda file: file.write(text.encode()))


def write_json_atomically(path, value, **dump_options) -> None:
    """`json.dumps(value, **dump_options)` to `path`, atomically."""
    write_text_atomically(path, json.dumps(value, **dump_options))
