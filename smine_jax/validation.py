"""Input checks shared by the public functions: clear errors at the boundary, never deep in jax.

Every check names the argument it rejects and says what was expected, so a user sees
``ValueError: embeddings: 3 rows contain NaN or inf (first: row 17)`` instead of a traceback
from inside a compiled function.
"""

from __future__ import annotations

import numpy as np


def as_embeddings(
    embeddings, name: str = "embeddings", *, allow_nonfinite: bool = False,
    allow_empty: bool = False,
) -> np.ndarray:
    """Returns `embeddings` as a float32 [N, D] host array, or raises ValueError naming `name`.

    N = 0 rows is refused unless `allow_empty` (e.g. a process with no samples of its own).
    """
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {array.shape}")
    if (array.shape[0] == 0 and not allow_empty) or array.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty array [N, D], got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real-valued array, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not allow_nonfinite:
        bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        if bad_rows.size:
            raise ValueError(
                f"{name}: {bad_rows.size} of {array.shape[0]} rows contain NaN or inf "
                f"(first: row {int(bad_rows[0])})")
    return array


def as_labels(labels, num_rows: int | None = None, name: str = "labels",
                            rows_name: str = "embeddings") -> np.ndarray:
    """Returns `labels` as an int64 [N] host array, or raises ValueError naming `name`.

    Labels are arbitrary integers (negative and non-contiguous values are fine).
    """
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array [N], got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        integral = np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array))
        if integral and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"{name}: expected integer class labels, got dtype {array.dtype}")
    if num_rows is not None and array.shape[0] != num_rows:
        raise ValueError(
                f"{name}: has {array.shape[0]} entries but {rows_name} has {num_rows} rows; "
                "they must have the same length")
    return array.astype(np.int64, copy=False)


def check_k(k, num_rows: int, name: str = "k") -> int:
    """Checks 1 <= k <= N - 1 (the neighbours of a row are the OTHER rows) and returns int(k)."""
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"{name}: expected a positive integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= num_rows - 1:
        raise ValueError(
            f"{name}={k} must satisfy 1 <= {name} <= N - 1 = {num_rows - 1}: each of the "
            f"N = {num_rows} rows has only N - 1 other rows to be its neighbours")
    return k


def as_query_ids(query_ids, num_rows: int, name: str = "query_ids") -> np.ndarray:
    """Returns the row ids to search for as int32 [Q] (None: all N rows), or raises ValueError."""
    if query_ids is None:
        return np.arange(num_rows, dtype=np.int32)
    array = np.asarray(query_ids)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name}: expected a 1-D integer array, got {array.dtype} {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= num_rows):
        raise ValueError(f"{name}: every id must lie in [0, {num_rows - 1}]")
    return array.astype(np.int32)


def integer(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
            whole_floats: bool = False) -> int:
    """int(value) for an integer in [minimum, maximum] (Python or numpy, never bool; with
    `whole_floats` also 2.0, as configs and YAML give), else ValueError naming `name`.

    The one integer check of the package: count, size and index arguments go through it, so
    their messages read alike ("NAME: expected a positive integer, got VALUE")."""
    if whole_floats and isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    in_range = (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
                and (minimum is None or value >= minimum)
                and (maximum is None or value <= maximum))
    if not in_range:
        raise ValueError(f"{name}: expected {_integer_kind(minimum, maximum)}, got {value!r}")
    return int(value)


def _integer_kind(minimum: int | None, maximum: int | None) -> str:
    if maximum is not None:
        return f"an integer in [{minimum}, {maximum}]" if minimum is not None else (
            f"an integer <= {maximum}")
    return {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")


def positive_int(value, name: str, *, whole_floats: bool = False) -> int:
    """`integer(value, name, minimum=1)`."""
    return integer(value, name, minimum=1, whole_floats=whole_floats)


def is_concrete(*values) -> bool:
    """Whether none of `values` is a jax tracer: value checks run on concrete inputs only (under
    jit the inputs are trusted, shape checks still run)."""
    import jax

    return not any(isinstance(value, jax.core.Tracer) for value in values)
