"""What a run records about itself in its workdir: config.json, metrics.jsonl, TensorBoard.

- `prepare_workdir` writes config.json (the config, package versions, git revision) and refuses
  to resume a run whose saved config differs outside the resumable fields.
- `MetricsLog` appends one JSON record per epoch to metrics.jsonl (and trims the records a
  resumed run will rewrite).
- `create_metric_writer`: TensorBoard event files in workdir/tensorboard, written with
  tensorboardX (no TensorFlow), and the log.
Only process 0 writes files.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path

import jax

from smine_jax import fileio

logger = logging.getLogger(__name__)


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("smine_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                    "ml_collections", "tensorboardX", "tensorflow-datasets", "scann"):
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


class TensorBoardWriter:
    """Scalars and hparams as TensorBoard event files in `logdir`, through tensorboardX (no
    TensorFlow); scalars and hparams also go to the log, as clu's default writer does.

    Each writer starts a new event file. The first scalars it writes, at step s, follow a
    restart marker at s, so TensorBoard hides the steps >= s of earlier files: the epochs a
    resumed run repeats show once, the earlier ones stay.
    """

    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter

        # The name's nanosecond time keeps two writers of one second apart and in order;
        # tensorboardX writes from a thread, which flushes the file every `flush_secs`.
        self._writer = SummaryWriter(os.fspath(logdir), flush_secs=5,
                                     filename_suffix=f".{time.time_ns()}.{os.getpid()}")
        self._started = False

    def write_scalars(self, step: int, scalars: dict) -> None:
        """One event of simple values under the metric names as tags (`add_scalar` would
        rewrite tags such as test.recall@1)."""
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        if not self._started:
            self._writer.file_writer.add_event(
                Event(step=int(step), session_log=SessionLog(status=SessionLog.START)))
            self._started = True
        self._writer.file_writer.add_summary(Summary(value=[
            Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()
        ]), int(step))
        _log_scalars(step, scalars)

    def write_hparams(self, hparams: dict) -> None:
        """The HParams dashboard's session-start summary (what clu writes); its metrics are
        inferred from the scalars."""
        from tensorboardX.summary import hparams as hparams_summaries

        _, session_start, _ = hparams_summaries(hparams, {})
        self._writer.file_writer.add_summary(session_start)
        logger.info("hparams: %s", hparams)

    def flush(self) -> None:
        """Flushes what the writer thread has written; events it has not taken yet follow
        within `flush_secs` (close() writes them all)."""
        self._writer.flush()

    def close(self) -> None:
        """Writes what the thread still holds and closes the file."""
        self._writer.close()


def _log_scalars(step: int, scalars: dict) -> None:
    values = ", ".join(f"{name}={value:.6g}" for name, value in sorted(scalars.items()))
    logger.info("[%d] %s", step, values)


def create_metric_writer(workdir: Path):
    """`TensorBoardWriter` on workdir/tensorboard for process 0 (processes share the workdir);
    the log only for other processes, or when tensorboardX is not installed."""
    if jax.process_index() == 0:
        try:
            return TensorBoardWriter(workdir / "tensorboard")
        except ImportError as error:
            logger.warning("no TensorBoard summaries (%s); metrics go to the log and "
                           "metrics.jsonl", error)
    return _LoggingWriter()


class _LoggingWriter:
    """Scalars to the log only."""

    def write_scalars(self, step: int, scalars: dict) -> None:
        _log_scalars(step, scalars)

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
