"""What a run records about itself in its workdir: config.json, metrics.jsonl, TensorBoard.

- `prepare_workdir` writes config.json (the config, package versions, git revision) and refuses
  to resume a run whose saved config differs outside the resumable fields.
- `MetricsLog` appends one JSON record per epoch to metrics.jsonl (and trims the records a
  resumed run will rewrite).
- `create_metric_writer`: clu's default writer where clu imports (it needs TensorFlow), else
  `EventFileWriter`, which writes the same TensorBoard event files without TensorFlow.
Only process 0 writes files.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from struct import pack

import jax

from smine_jax import fileio

logger = logging.getLogger(__name__)


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("smine_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                    "ml_collections", "clu", "tensorflow-datasets", "scann"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).parent, capture_output=True, text=True,
                               timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode:
        return None
    return result.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def as_json(value):
    """Config values as JSON (tuples become lists, so a saved and a live config compare)."""
    return json.loads(json.dumps(value, default=str))


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _resolved(value) -> str | None:
    """A path field's folder as an absolute, symlink-free path ("" and None stay as they are)."""
    return str(Path(str(value)).expanduser().resolve()) if value else value


def prepare_workdir(workdir: Path, config, *, resuming: bool,
                    resumable_fields: tuple[str, ...] = (), dataset: dict | None = None,
                    path_fields: tuple[str, ...] = ()) -> None:
    """Writes workdir/config.json (config, package versions, git revision, `dataset`: the
    image and class counts the run found, so a run with `data.strict_counts=False` records
    them, and `paths`: the `path_fields` resolved to absolute paths).

    When resuming, the saved config must equal `config` up to `resumable_fields`, else
    ValueError naming --workdir and the differing fields; a path field only differs when it
    names another folder (`../data` and its absolute spelling are the same).
    """
    path = workdir / "config.json"
    current = as_json(config.to_dict())
    new_paths = {name: _resolved(flatten(current).get(name)) for name in path_fields}
    if resuming and path.is_file():
        record = json.loads(path.read_text())
        saved = record["config"]
        old, new = flatten(saved), flatten(current)
        old_paths = record.get("paths") or {}

        def same(name):
            if old.get(name, "<absent>") == new.get(name, "<absent>"):
                return True
            return name in path_fields and old_paths.get(
                name, _resolved(old.get(name))) == new_paths[name]

        changed = sorted(name for name in set(old) | set(new)
                         if not same(name) and name not in resumable_fields)
        if changed:
            details = ", ".join(f"{name}: {old.get(name, '<absent>')!r} -> "
                                f"{new.get(name, '<absent>')!r}" for name in changed[:6])
            raise ValueError(
                f"--workdir={workdir}: holds a checkpoint of a run with another config "
                f"({details}{', ...' if len(changed) > 6 else ''}); rerun with the saved config "
                f"({path}) or use a new --workdir")
    if jax.process_index() == 0:
        record = {"config": current, "versions": _package_versions(),
                  "git_revision": _git_revision(),
                  "written": datetime.datetime.now().isoformat(timespec="seconds"),
                  "process_count": jax.process_count(), "device_count": jax.device_count(),
                  "dataset": dataset, "paths": new_paths}
        fileio.write_text_atomically(
            path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(payload: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in payload:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(payload: bytes) -> int:
    crc = crc32c(payload)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, *, step: int | None = None, file_version: str | None = None,
           scalars: dict | None = None) -> bytes:
    """A tensorflow.Event proto: wall_time (1, double), step (2), file_version (3), summary (5)
    of Summary.Value {tag (1), simple_value (2, float)} entries."""
    proto = b"\x09" + pack("<d", wall_time)
    if step is not None:
        proto += b"\x10" + _varint(step)
    if file_version is not None:
        proto += _field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field(1, _field(1, tag.encode()) + b"\x15" + pack("<f", float(value)))
            for tag, value in scalars.items())
        proto += _field(5, summary)
    return proto


class EventFileWriter:
    """TensorBoard scalars without TensorFlow: Event protos (hand-encoded) in TFRecord framing
    (length, masked CRC-32C of the length, data, masked CRC-32C of the data), the file layout
    TensorBoard reads. Used when clu's writer cannot import TensorFlow. Scalars also go to the
    log, as clu's default writer does."""

    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        self.path = logdir / (f"events.out.tfevents.{int(time.time())}."
                              f"{socket.gethostname()}.{os.getpid()}.smine_jax")
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._write(_event(time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = pack("<Q", len(data))
        self._file.write(header + pack("<I", _masked_crc(header)) + data
                         + pack("<I", _masked_crc(data)))

    def write_scalars(self, step: int, scalars: dict) -> None:
        self._write(_event(time.time(), step=int(step), scalars=scalars))
        values = ", ".join(f"{name}={value:.6g}" for name, value in sorted(scalars.items()))
        logger.info("[%d] %s", step, values)

    def write_hparams(self, hparams: dict) -> None:
        logger.info("hparams: %s", hparams)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def create_metric_writer(workdir: Path):
    """clu `metric_writers.create_default_writer` (TensorBoard summaries in
    workdir/tensorboard + the log) when clu imports, which needs TensorFlow; otherwise
    `EventFileWriter` (same files, no TensorFlow). Only process 0 writes summaries."""
    logdir = workdir / "tensorboard"
    try:
        from clu import metric_writers
    except ImportError:
        if jax.process_index() == 0:
            return EventFileWriter(logdir)
        return _LoggingWriter()
    return metric_writers.create_default_writer(os.fspath(logdir),
                                                just_logging=jax.process_index() > 0)


class _LoggingWriter:
    """Scalars to the log only (processes other than 0 when clu is unavailable)."""

    def write_scalars(self, step: int, scalars: dict) -> None:
        logger.info("[%d] %s", step, scalars)

    def write_hparams(self, hparams: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _parsed(line: str) -> dict | None:
    """A metrics.jsonl line as a record; None for a blank or torn one (a write cut short by a
    kill or a full disk), which a resumed run drops."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """workdir/metrics.jsonl: one JSON record per epoch (process 0 writes)."""

    def __init__(self, path: Path):
        self.path = path

    def truncate(self, last_epoch: int) -> None:
        """Keeps the records of epochs <= last_epoch (a resumed run rewrites the later ones)."""
        if jax.process_index() or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if (record := _parsed(line)) is not None and record.get("epoch", 0) <= last_epoch]
        fileio.write_text_atomically(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict) -> None:
        if jax.process_index():
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(record, sort_keys=True) + "\n")
            file.flush()
            os.fsync(file.fileno())
