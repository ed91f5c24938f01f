"""smine_jax.logs' TensorBoard writer, read back with TensorBoard's own reader (no TensorFlow)."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.plugins.hparams import plugin_data_pb2

from smine_jax import logs


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows the run in `logdir`."""
    accumulator = event_accumulator.EventAccumulator(str(logdir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def _file_scalars(path) -> dict[tuple[int, str], float]:
    """(step, tag) -> value of the scalars in one event file."""
    return {(event.step, value.tag): value.simple_value
            for event in event_file_loader.LegacyEventFileLoader(str(path)).Load()
            for value in event.summary.value if value.HasField("simple_value")}


def test_scalars_and_hparams_read_back_with_tensorboard(tmp_path):
    writer = logs.create_metric_writer(tmp_path)
    assert isinstance(writer, logs.TensorBoardWriter)
    writer.write_hparams({"loss.margin": "0.2", "train.epochs": "3"})
    writer.write_scalars(3, {"loss": 0.25, "test.recall@1": 0.5, "images": 72})
    writer.write_scalars(4, {"loss": 0.125})
    writer.flush()
    writer.close()

    logdir = tmp_path / "tensorboard"
    (path,) = logdir.iterdir()
    assert path.name.startswith("events.out.tfevents.")
    assert _scalars(logdir) == {"loss": [(3, 0.25), (4, 0.125)], "test.recall@1": [(3, 0.5)],
                                "images": [(3, 72.0)]}
    accumulator = event_accumulator.EventAccumulator(str(logdir))
    accumulator.Reload()
    (content,) = accumulator.PluginTagToContent("hparams").values()
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert {name: value.string_value for name, value in start.hparams.items()} == {
        "loss.margin": "0.2", "train.epochs": "3"}


def test_a_resumed_run_adds_a_file_and_replaces_only_the_steps_it_repeats(tmp_path):
    first = logs.create_metric_writer(tmp_path)
    for step in (1, 2, 3):
        first.write_scalars(step, {"loss": float(step)})
    first.close()
    # Resumed from the checkpoint of step 2: step 3 is written again, with another value.
    second = logs.create_metric_writer(tmp_path)
    for step in (3, 4):
        second.write_scalars(step, {"loss": 10.0 * step})
    second.close()

    logdir = tmp_path / "tensorboard"
    old, new = sorted(logdir.iterdir())
    assert _file_scalars(old) == {(1, "loss"): 1.0, (2, "loss"): 2.0, (3, "loss"): 3.0}
    assert _file_scalars(new) == {(3, "loss"): 30.0, (4, "loss"): 40.0}
    assert _scalars(logdir) == {"loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}


def test_other_processes_and_a_missing_tensorboardx_only_log(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger=logs.__name__)
    with monkeypatch.context() as patch:
        patch.setattr(jax, "process_index", lambda: 1)
        other_process = logs.create_metric_writer(tmp_path)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "tensorboardX", None)  # import fails
        without_tensorboardx = logs.create_metric_writer(tmp_path)
    assert "no TensorBoard summaries" in caplog.text
    for writer in (other_process, without_tensorboardx):
        writer.write_hparams({"train.epochs": "3"})
        writer.write_scalars(2, {"loss": 0.5})
        writer.flush()
        writer.close()
    assert "[2] loss=0.5" in caplog.text
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.slow
def test_importing_logs_imports_neither_tensorflow_nor_tensorboardx():
    code = ("import sys, smine_jax.logs; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'tensorflow', 'tensorboardX', 'tensorboard'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=300)
    assert result.stdout.strip() == "[]"
