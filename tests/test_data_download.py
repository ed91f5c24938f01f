"""Omniglot download: a loopback HTTP server and file:// URLs stand in for GitHub."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smine_jax import data
from smine_jax.data import sources


def _make_archives(folder: Path) -> dict[str, tuple[int, str]]:
    """Two zips in the official layout <split>/<alphabet>/<character>/<image>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    archives = {}
    for split, alphabets in (("images_background", ("Latin", "Greek")),
                             ("images_evaluation", ("Futurama",))):
        archive = folder / f"{split}.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for alphabet in alphabets:
                for character in (1, 2):
                    for drawer in (1, 2, 3):
                        image = Image.fromarray(np.eye(9, dtype=bool) ^ (drawer % 2 == 0))
                        png = folder / "tmp.png"
                        image.save(png)
                        zf.write(png, f"{split}/{alphabet}/character{character:02d}/"
                                      f"{character:04d}_{drawer:02d}.png")
        data_bytes = archive.read_bytes()
        archives[archive.name] = (len(data_bytes), hashlib.sha256(data_bytes).hexdigest())
    return archives


@contextlib.contextmanager
def _serve(directory: Path):
    """A loopback HTTP server for `directory`, in a thread; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_over_http_verifies_unpacks_and_is_reused(tmp_path):
    archives = _make_archives(tmp_path / "server")
    cache_dir = tmp_path / "cache"
    with _serve(tmp_path / "server") as url:
        root = sources.download_omniglot(cache_dir, base_url=url, archives=archives)
    assert root == (cache_dir / "omniglot").resolve()
    dataset = sources.omniglot_folder(root)
    assert dataset.counts() == {"train": 12, "test": 6}
    assert dataset.subset("train").class_names[0] == "images_background/Greek/character01"
    assert dataset.read_image(0).shape == (9, 9, 3)
    assert not list(cache_dir.glob("*partial*")) and not list(cache_dir.rglob("*.part-*"))
    # The server is gone: a second call uses what is unpacked.
    assert sources.download_omniglot(cache_dir, base_url=url, archives=archives) == root


def test_download_from_a_file_url_through_the_config(tmp_path, monkeypatch):
    archives = _make_archives(tmp_path / "mirror")
    monkeypatch.setattr(sources, "OMNIGLOT_ARCHIVES", archives)
    config = data.default_config()
    config.update(name="omniglot", cache_dir=str(tmp_path / "cache"), strict_counts=False,
                  download_url=(tmp_path / "mirror").as_uri() + "/")
    dataset = data.build_dataset(config)
    assert dataset.name == "omniglot" and dataset.counts() == {"train": 12, "test": 6}


def test_download_rejects_a_wrong_checksum(tmp_path):
    archives = _make_archives(tmp_path / "mirror")
    name, (size, _) = next(iter(archives.items()))
    archives[name] = (size, "0" * 64)
    with pytest.raises(RuntimeError, match=f"{name}: download failed verification: expected "
                                           f"{size} bytes with sha256 0000"):
        sources.download_omniglot(tmp_path / "cache", archives=archives,
                                  base_url=(tmp_path / "mirror").as_uri() + "/")
    assert not (tmp_path / "cache" / "omniglot").exists()
    assert not list((tmp_path / "cache" / "downloads").iterdir())


def test_offline_fails_at_once_and_names_the_dir_option(tmp_path):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"cannot download Omniglot.*--config\.data\.dir=PATH"):
        sources.download_omniglot(tmp_path, base_url=f"http://127.0.0.1:{port}/", timeout=5)
    assert time.monotonic() - start < 5
