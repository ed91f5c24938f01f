"""Several processes for real: two `python -m experiments.omniglot` processes on 127.0.0.1
(jax.distributed, one CPU device each, Gloo collectives) against one process with two host
devices; a process killed mid-epoch; a workdir that is not shared."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
from test_experiments import _cli, _epoch_records, _run_cli, _Watcher
from test_train import make_omniglot_folder

from benchmarks import multiprocess_bench as bench

# A small run with enough steps an epoch (48 at batch 8) to be killed in the middle of one.
ARGS = ["--config=experiments/configs/omniglot.py:smoke", "--config.data.image_size=48",
        "--config.data.crop_size=40", "--config.model.depth=3", "--config.train.batch_size=8",
        "--config.subset.max_per_class=24", "--config.controller.kappa_init=1.0"]


def _processes(workdirs, *args, port: int, env, **popen) -> list[subprocess.Popen]:
    """Process i of 2 with workdir workdirs[i] (the same folder for a shared workdir)."""
    return [_cli(*ARGS, *args, f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={index}", env=env, **popen)
            for index, workdir in enumerate(workdirs)]


def _final_metrics(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    data_dir = make_omniglot_folder(root / "omniglot", num_classes=16, per_class=24, size=48)
    return [f"--config.data.dir={data_dir}"], {"SMINE_JAX_CACHE": str(root / "cache")}


@pytest.mark.slow
def test_two_processes_train_what_one_process_with_two_devices_trains_and_resume_after_a_kill(
        omniglot, tmp_path):
    data, env = omniglot
    reference = _run_cli(*ARGS, *data, f"--workdir={tmp_path / 'one'}", timeout=600, env={
        **env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert reference.returncode == 0, reference.stderr[-3000:]

    # SIGKILL process 1 in the middle of epoch 2: process 0 stops within seconds, one line.
    workdir = tmp_path / "two"
    port = bench.free_port()
    first, second = _processes([workdir, workdir], *data, port=port, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchers = [_Watcher(first), _Watcher(second)]
    watchers[0].wait_for("epoch 2:", timeout=600)
    time.sleep(0.5)
    second.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert watchers[0].finish(timeout=120) == 1, watchers[0].text[-3000:]
    assert time.monotonic() - killed < 90  # bounded: the heartbeat timeout is 60 s
    watchers[1].finish()
    last = watchers[0].text.strip().splitlines()[-1]
    assert re.match(r"^error: another process of the run stopped or cannot be reached .*"
                    r"the run resumes from its last checkpoint$", last), last
    assert [r["epoch"] for r in _epoch_records(workdir)] == [1]

    # Both again: the run resumes from epoch 1 and ends exactly as one process with 2 devices.
    processes = _processes([workdir, workdir], *data, port=bench.free_port(), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    expected = _final_metrics(reference.stdout)
    for stdout, _ in outputs:
        got = _final_metrics(stdout)
        assert got.keys() == expected.keys()
        for name, value in expected["final_test_metrics"].items():
            assert abs(got["final_test_metrics"][name] - value) <= 1e-5, name
    assert _epoch_records(workdir) == _epoch_records(tmp_path / "one")
    # Each process wrote its own shard of every dump, and every process read both.
    dumps = sorted((workdir / "embeddings").iterdir())
    assert {"test", "epoch_0003"} <= {dump.name for dump in dumps}
    for dump in dumps:
        assert sorted(p.name for p in dump.glob("*.shard.json")) == [
            "shard-00000-of-00002.shard.json", "shard-00001-of-00002.shard.json"], dump
    assert sorted(p.name for p in (workdir / "triplets").iterdir()) == [
        f"epoch_000{e}.npz" for e in (1, 2, 3)]


@pytest.mark.slow
def test_a_workdir_that_is_not_shared_stops_every_process_naming_the_missing_shard(
        omniglot, tmp_path):
    data, env = omniglot
    processes = _processes([tmp_path / "a", tmp_path / "b"], *data,
                           "--config.train.shard_timeout=3", port=bench.free_port(), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for index, process in enumerate(processes):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 1, stderr[-3000:]
        own = tmp_path / "ab"[index]  # it waits there for the other process's shard
        last = stderr.strip().splitlines()[-1]
        shard = f"shard-0000{1 - index}-of-00002.shard.json"
        assert last.startswith(f"error: {own / 'embeddings'}") and shard in last, last
        assert "did not appear within 3 s" in last and "shared workdir" in last, last
        assert "Traceback" not in stderr


def test_the_process_flags_come_together_or_not_at_all(tmp_path):
    result = _run_cli("--config=experiments/configs/omniglot.py:smoke", "--num_processes=2",
                      f"--workdir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert re.search(r"^error: --coordinator_address: required with --num_processes",
                     result.stderr.strip().splitlines()[-1]), result.stderr[-2000:]
    result = _run_cli("--config=experiments/configs/omniglot.py:smoke", "--num_processes=2",
                      "--coordinator_address=127.0.0.1:1", "--process_id=2",
                      f"--workdir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert re.search(r"^error: --process_id=2: expected 0 <= id < --num_processes=2",
                     result.stderr.strip().splitlines()[-1]), result.stderr[-2000:]


def test_the_benchmark_splits_the_mining_epochs_by_phase(tmp_path):
    seconds = {"embed": 1.0, "index": 2.0, "mine": 0.5, "train": 10.0, "eval": 3.0}
    records = [{"mining": False, "seconds": {**seconds, "train": 8.0}},
               {"mining": True, "seconds": seconds},
               {"mining": True, "seconds": {**seconds, "embed": 3.0}}]
    split = bench.phase_seconds(records)
    assert split == {**seconds, "embed": 2.0, "random epoch train": 8.0}
    final = {"final_test_metrics": {"recall@1": 0.5}}
    text = bench.table({bench.SETTINGS[1]: (split, final), bench.SETTINGS[2]: (split, final),
                        bench.SETTINGS[0]: (split, {"final_test_metrics": {"recall@1": 0.4}})})
    rows = text.splitlines()[2:]
    assert [row.endswith("| yes |") for row in rows] == [True, True, False]
    two = bench.commands(bench.SETTINGS[2], tmp_path, ["--config.train.epochs=3"])
    assert [argv[-1] for argv, _ in two] == ["--process_id=0", "--process_id=1"]
    assert bench.commands(bench.SETTINGS[1], tmp_path, [])[0][1] == {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
