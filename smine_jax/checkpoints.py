"""Checkpoints: what a resumed run restores, and the best epoch by validation.

`Checkpoints` keeps the run's orbax checkpoints in workdir/checkpoints: at the end of every
epoch the state, and on preemption a mid-epoch checkpoint that also holds the epoch's plan
(`epoch_plan.EpochPlan`), the per-step values so far (`STEP_METRICS`) and the epoch's train time
(`EpochTrainTime`), so a resumed epoch goes on where it stopped. `BestByValidation` keeps the
state of the best epoch by validation R@1 in workdir/checkpoints_best.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import serialization

from smine_jax.epoch_plan import EpochPlan
from smine_jax.runtime import sync

logger = logging.getLogger(__name__)

# A checkpoint is saved only with this many times the previous one's size, plus the slack in
# bytes, free.
_SAVE_MARGIN = 1.1
_SAVE_SLACK = 1 << 16

# Per-step values a mid-epoch checkpoint carries (train step metric -> meta field).
STEP_METRICS = {"loss": "batch_losses", "training_error": "batch_errors",
                "num_mined": "batch_mined", "mined_violations": "batch_mined_violations"}


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir restores; the message names the directory."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


class EpochTrainTime(NamedTuple):
    """An epoch's train time so far: `seconds` cover `steps_timed` of its first `position` steps.

    A resumed epoch adds the time its mid-epoch checkpoint carries, so its images/s covers both
    processes. Checkpoints of older versions carry none; then only this process's steps are
    timed, and the time must not be stored as the whole epoch's.
    """

    seconds: float
    steps_timed: int
    position: int

    @classmethod
    def resumed_from(cls, meta: dict | None, start: int) -> EpochTrainTime:
        """The time before this process: that of the checkpoint resumed at `start` (None: a
        fresh epoch); an older checkpoint without "train_seconds" times none of its steps."""
        if meta is not None and "train_seconds" in meta:
            return cls(float(meta["train_seconds"]), start, start)
        return cls(0.0, 0, start)

    def plus(self, steps: int, seconds: float) -> EpochTrainTime:
        """The time after `steps` more steps that took `seconds`."""
        return type(self)(self.seconds + seconds, self.steps_timed + steps, self.position + steps)

    def checkpoint_meta(self) -> dict[str, float]:
        """{"train_seconds": ...} for a mid-epoch checkpoint, when it covers every step so far."""
        return {"train_seconds": self.seconds} if self.steps_timed == self.position else {}

    def images_per_second(self, images_per_step: int) -> float:
        """Train throughput over the timed steps."""
        return self.steps_timed * images_per_step / max(self.seconds, 1e-9)


class Checkpoints:
    """orbax CheckpointManager in workdir/checkpoints; items "state", "meta" (JSON) and, in a
    mid-epoch checkpoint, "plan" (the epoch's global batches and controller, `EpochPlan`).

    meta: {"epoch": epoch of the checkpoint, "position": steps done in that epoch (None at an
    epoch boundary), "batch_losses", "batch_errors", "batch_mined", "batch_mined_violations":
    per-step values so far (mid-epoch only, `STEP_METRICS`), "train_seconds": seconds spent
    training those steps (so a resumed epoch reports its whole train time; absent when this
    process did not time them all, see EpochTrainTime), "plan": the plan's record and
    in-batch κ (mid-epoch only), "best_val": the best epoch by validation R@1 so far
    (`BestByValidation`)}.
    """

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            os.fspath(directory.absolute()),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                # Saved in the calling thread: a failed write (a full disk) is an error here,
                # at its epoch, not a background thread's traceback later. The states are
                # small next to an epoch (MBs; ~0.1 s on Omniglot).
                enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest(self, initial_state: Any):
        """(step, state, meta, plan) of the newest checkpoint that restores; plan: the epoch's
        `EpochPlan` of a mid-epoch checkpoint, None at an epoch boundary.

        A damaged checkpoint (truncated or missing file, invalid JSON) is skipped with a
        warning naming it and moved to `<dir>_damaged/<step>` (kept, out of the way of the
        steps the run saves again). If none restores: CheckpointError naming the directory.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta, plan = self.restore(step, initial_state)
            except Exception as error:  # any failure to read it: try an older checkpoint
                reason = f"{type(error).__name__}: {_first_line(error)}"
                logger.warning("checkpoint %s does not restore (%s); trying an older one",
                               self.directory / str(step), reason)
                damaged.append((step, reason))
                continue
            if damaged:
                self._set_aside([step for step, _ in damaged])
                logger.warning("resuming from step %d instead of the damaged step(s) %s, moved "
                               "to %s", step, [s for s, _ in damaged],
                               self.directory.with_name(self.directory.name + "_damaged"))
            return step, state, meta, plan
        newest, reason = damaged[0]
        raise CheckpointError(
            f"{self.directory}: no checkpoint restores (the newest, step {newest}: {reason}); "
            "move the folder aside to start afresh")

    def _set_aside(self, steps) -> None:
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + "_damaged")
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(self.directory / str(step), target)
        sync(f"damaged checkpoints moved {self.directory.name}")
        self.manager.reload()

    def restore(self, step: int, like: Any) -> tuple[Any, dict, EpochPlan | None]:
        """(state, meta, plan) of `step`, the state (a `train.TrainState`) placed and typed as
        `like`; plan: None unless the checkpoint is mid-epoch."""
        ocp = self.ocp
        meta = dict(self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)
        mid_epoch = meta.get("position") is not None
        items = {"state": ocp.args.StandardRestore(abstract_state(like))}
        if mid_epoch:
            items["plan"] = ocp.args.StandardRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        plan = None
        if mid_epoch:
            saved = restored.plan
            template = jax.device_get(like.controller)
            ctrl = serialization.from_state_dict(template, jax.tree.map(
                lambda t, v: np.asarray(v, np.asarray(t).dtype),
                serialization.to_state_dict(template), dict(saved["controller"])))
            plan = EpochPlan(np.asarray(saved["ids"], np.int32), np.asarray(saved["mask"], bool),
                             np.asarray(saved["mined"], bool), dict(meta["plan"]["record"]),
                             ctrl, kappa=float(meta["plan"]["kappa"]))
        return restored.state, meta, plan

    def save(self, state: Any, meta: dict, plan: EpochPlan | None = None) -> None:
        """Saves `state` with `meta` (and a mid-epoch checkpoint's `plan`) at its step."""
        ocp = self.ocp
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        self._check_space()
        items = {"state": ocp.args.StandardSave(state)}
        if plan is not None:
            items["plan"] = ocp.args.StandardSave({
                "ids": plan.ids, "mask": plan.mask, "mined": plan.mined,
                "controller": serialization.to_state_dict(plan.controller)})
            meta = {**meta, "plan": {"record": plan.record, "kappa": plan.kappa}}
        self.manager.save(step, args=ocp.args.Composite(
            meta=ocp.args.JsonSave(meta), **items), force=True)

    def _check_space(self) -> None:
        """Raises ENOSPC before a save that cannot fit: the previous checkpoint's size (plus a
        margin) must be free. A write that fails inside orbax leaves its pending TensorStore
        writes printing tracebacks after the error, so a known-full disk is caught here."""
        latest = self.manager.latest_step()
        if latest is None:
            return
        folder = self.directory / str(latest)
        try:
            needed = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            free = shutil.disk_usage(self.directory).free
        except OSError:  # cannot tell: let the save itself find out
            return
        if free < needed * _SAVE_MARGIN + _SAVE_SLACK:
            raise OSError(errno.ENOSPC, f"No space left on device: {free} bytes free, a "
                          f"checkpoint takes about {needed}", str(self.directory))

    def delete(self, step: int) -> None:
        if step in self.manager.all_steps():
            self.manager.delete(step)

    def close(self) -> None:
        """Waits for the pending save (raising its error) and closes the manager either way."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


class BestByValidation:
    """The best epoch by validation R@1 so far, and its state in workdir/checkpoints_best.

    The regular checkpoints' meta carries {"best_val": {"epoch", "step", "recall@1"}}, so a
    resumed run knows the best so far; the best state is saved (orbax, meta: epoch, val and
    test metrics) right after the regular checkpoint of its epoch, and the previous best is
    deleted (`drop_older`) only once both are on disk. On resume the best states other than the
    restored meta's are dropped (one saved after the restored checkpoint: its epoch is trained
    again), and a best of the restored epoch whose save did not land is written from the
    restored state.
    """

    METRIC = "recall@1"

    def __init__(self, directory: Path):
        self.directory = directory
        self._checkpoints: Checkpoints | None = None
        self.epoch = self.step = None
        self.value = -math.inf

    @property
    def checkpoints(self) -> Checkpoints:
        if self._checkpoints is None:  # created on first use: runs without a validation split
            self._checkpoints = Checkpoints(self.directory, keep=2)  # never make the folder
        return self._checkpoints

    def resume(self, state: Any, meta: dict) -> None:
        """The best so far from a restored checkpoint's meta (none for a fresh run)."""
        saved = meta.get("best_val") or {}
        self.epoch, self.step = saved.get("epoch"), saved.get("step")
        self.value = float(saved.get(self.METRIC, -math.inf))
        if self.directory.exists():  # drop a best saved after the restored checkpoint
            for step in self.checkpoints.manager.all_steps():
                if step != self.step:
                    self.checkpoints.delete(step)
        if self.step is not None and self.step == int(state.step) and (
                self.checkpoints.latest() is None):
            self.checkpoints.save(state, {"epoch": self.epoch, "val": {self.METRIC: self.value}})

    def observe(self, epoch: int, step: int, val_metrics: dict) -> None:
        value = float(val_metrics[self.METRIC])
        if value > self.value:
            self.epoch, self.step, self.value = epoch, step, value

    def meta(self) -> dict:
        if self.epoch is None:
            return {}
        return {"best_val": {"epoch": self.epoch, "step": self.step, self.METRIC: self.value}}

    def save(self, state: Any, record: dict) -> None:
        """Saves the new best state; the previous one stays until `drop_older`."""
        self.checkpoints.save(state, {"epoch": record["epoch"], "val": record["val"],
                                      "test": record["test"]})

    def drop_older(self) -> None:
        """Deletes every best state but the current one, once it is on disk (call it once the
        regular checkpoint whose meta names it is on disk too)."""
        self.checkpoints.manager.wait_until_finished()
        for step in self.checkpoints.manager.all_steps():
            if step != self.step:
                self.checkpoints.delete(step)

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()


def abstract_state(state: Any) -> Any:
    """The shapes, dtypes and shardings of `state`'s leaves: what orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
