# %% [markdown]
# Cells every notebook of this folder shares, written once: a notebook script holds a cell
# `# shared cell: NAME` where one of them goes (build_notebooks.py puts it there).

# %% name="install"
# @title Install smine_jax (Colab only)
import importlib.util
import pathlib
import subprocess
import sys

# On Colab (Runtime > Change runtime type > TPU), when smine_jax is not importable yet, this
# cell pip-installs it from PACKAGE_SOURCE (the form field): a git URL such as
# git+https://github.com/<owner>/<repo> (the repository or your fork of it) or a wheel, a .whl
# URL or path (upload it with the Files pane first). EXTRA: "tpu" on a TPU runtime, "gpu" on a
# GPU runtime, "" on CPU. Elsewhere it installs nothing (README, "Setup").
PACKAGE_SOURCE = ""  # @param {type:"string"}
EXTRA = "tpu"  # @param ["tpu", "gpu", ""]

EXPECTED_SOURCE = ("a git URL (git+https://github.com/<owner>/<repo>) or a wheel "
                   "(a .whl URL or path)")


def importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def pip_requirement(source, extra):
    """pip's requirement for `source` (the PACKAGE_SOURCE field) with the optional `extra`;
    ValueError naming the field when `source` is empty or neither a git URL nor a wheel."""
    source = source.strip()
    if not source:
        raise ValueError(f"PACKAGE_SOURCE is empty: type {EXPECTED_SOURCE} into the form "
                         "field of the install cell, then run the cell again")
    if "<" in source or ">" in source:
        raise ValueError(f"PACKAGE_SOURCE = {source!r} still holds a <placeholder>: "
                         f"expected {EXPECTED_SOURCE}")
    if source.startswith("git+"):
        url = source
    elif source.endswith(".whl"):
        path = pathlib.Path(source).expanduser()
        if "://" in source:
            url = source
        elif path.is_file():
            url = path.resolve().as_uri()
        else:
            raise ValueError(f"PACKAGE_SOURCE: no wheel file at {str(path)!r}; expected "
                             f"{EXPECTED_SOURCE}")
    elif source.startswith(("https://", "http://", "ssh://")):
        url = f"git+{source}"  # a repository's address, as pasted from the browser
    else:
        raise ValueError(f"PACKAGE_SOURCE = {source!r}: expected {EXPECTED_SOURCE}")
    return f"smine_jax[{extra}] @ {url}" if extra else url


def install(source, extra):
    """pip-installs smine_jax from `source`. A bad field or a failed pip ends the cell with
    one message naming PACKAGE_SOURCE (SystemExit: no traceback, "Run all" stops here)."""
    try:
        requirement = pip_requirement(source, extra)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"pip install {requirement}")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", requirement])
    if done.returncode != 0:
        raise SystemExit(f"PACKAGE_SOURCE: pip could not install {requirement!r} (its "
                         f"messages are above); expected {EXPECTED_SOURCE}")


if not importable("smine_jax"):
    if not importable("google.colab"):
        raise SystemExit("smine_jax is not importable in this kernel: install it first "
                         "(README, \"Setup\"), or fill in PACKAGE_SOURCE and call "
                         "install(PACKAGE_SOURCE, EXTRA)")
    install(PACKAGE_SOURCE, EXTRA)

# %% name="backend"
# Backend: smine_jax's allocator settings, then the devices JAX sees.
from smine_jax import hostmem

hostmem.tune_malloc()  # before jax runs anything (README, "XLA on CPU")

import jax  # noqa: E402 (after tune_malloc)

backend = jax.default_backend()
print(f"jax {jax.__version__}: {backend.upper()} backend, {jax.device_count()} device(s)")
for device in jax.devices():
    print(" ", device.id, device.device_kind)

# %% name="figures"
# Figure helpers: every figure is saved to FIGURES_DIR and shown.
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

figures_dir = Path(FIGURES_DIR)
figures_dir.mkdir(parents=True, exist_ok=True)


def save_and_show(figure, name):
    """Writes `figure` to FIGURES_DIR/name (PNG), then shows it."""
    path = figures_dir / name
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.show()
    print(f"saved {path}")


def triplet_montage(images, triplet_ids, labels, title, notes=()):
    """Rows anchor / positive / negative, one column per triplet.

    images: uint8 [N, S, S, C]; triplet_ids: int [T, 3] (anchor, positive, negative) sample
    ids; labels: [N] class labels; notes: optional text under each column.
    """
    triplet_ids = np.asarray(triplet_ids)
    columns = len(triplet_ids)
    figure, axes = plt.subplots(3, columns, figsize=(1.3 * columns, 4.6), squeeze=False)
    for row, role in enumerate(("anchor", "positive", "negative")):
        for column, sample in enumerate(triplet_ids[:, row]):
            axis = axes[row, column]
            image = images[sample]
            axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
                        vmin=0, vmax=255)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"class {labels[sample]}", fontsize=7)
        axes[row, 0].set_ylabel(role)
    for column, note in enumerate(notes):
        axes[2, column].set_xlabel(note, fontsize=7)
    figure.suptitle(title)
    return figure


def distances(embeddings, triplet_ids):
    """(d(a, p), d(a, n)): Euclidean distances of [T, 3] triplets in `embeddings`."""
    anchor, positive, negative = (embeddings[triplet_ids[:, i]] for i in range(3))
    return (np.linalg.norm(anchor - positive, axis=1),
            np.linalg.norm(anchor - negative, axis=1))
