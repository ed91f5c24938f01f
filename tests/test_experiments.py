"""Tests of the experiment configs and the command line: the protocol's values, variants,
one-line config errors, and resumption after SIGKILL / SIGTERM with identical final metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_train import make_omniglot_folder

from smine_jax.configs import cars196, common, cub, omniglot

REPO = Path(__file__).resolve().parents[1]


def _flat(config) -> dict:
    def walk(tree, prefix=""):
        for name, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", value

    return dict(walk(config.to_dict()))


# ----------------------------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("module,name", [(cub, "cub"), (cars196, "cars196")])
def test_paper_protocol_configs(module, name):
    config = module.get_config()
    assert config.data.name == name and config.variant == "smart"
    assert (config.model.name, config.model.embedding_dim) == ("googlenet", 64)
    assert (config.data.image_size, config.data.crop_size, config.data.channels) == (256, 224, 3)
    assert config.data.flip and config.data.mean == (0.485, 0.456, 0.406)
    optimizer = config.optimizer
    assert (optimizer.learning_rate, optimizer.lr_halve_every, optimizer.momentum,
            optimizer.weight_decay, optimizer.head_lr_multiplier) == (0.1, 3, 0.9, 5e-4, 10.0)
    assert (config.train.epochs, config.train.batch_size, config.train.triplets_per_anchor) == (
        20, 128, 1)
    assert (config.loss.kind, config.loss.triplet_loss, config.loss.margin,
            config.loss.use_global, config.loss.global_margin, config.loss.global_weight) == (
        "triplet", "ratio", 0.2, True, 0.01, 0.8)
    assert (config.mining.kind, config.mining.mined_fraction, config.mining.k) == (
        "smart", 0.5, 0)
    controller = config.controller
    assert (controller.policy, controller.target_error, controller.error_on, controller.window,
            controller.kappa_init, controller.kappa_random, controller.kappa_min,
            controller.kappa_max, controller.random_epochs) == (
        "adaptive", 0.6, "mined", 3, "auto", None, 1.0, 64.0, 2)


def test_omniglot_config_is_the_cpu_protocol():
    config = omniglot.get_config()
    assert config.data.name == "omniglot" and config.data.dir == ""
    assert (config.data.image_size, config.data.crop_size, config.data.channels,
            config.data.flip) == (28, 28, 1, False)
    assert (config.model.name, config.model.width, config.model.depth,
            config.model.embedding_dim) == ("small_conv", 64, 4, 64)


VARIANT_FIELDS = {
    "smart": {},
    "smart_manual": {"controller.policy": "manual"},
    "index_no_global": {"loss.use_global": False},
    "random_global": {"mining.mined_fraction": 0.0},
    "semihard": {"mining.kind": "semihard", "loss.triplet_loss": "margin",
                 "loss.use_global": False},
    "batch_hard": {"mining.kind": "batch_hard", "loss.triplet_loss": "margin",
                   "loss.use_global": False},
    "distance_weighted": {"mining.kind": "distance_weighted", "loss.triplet_loss": "margin",
                          "loss.use_global": False},
    "lifted": {"mining.kind": "none", "loss.kind": "lifted", "model.l2_normalise": False},
    "npairs": {"mining.kind": "none", "loss.kind": "npairs", "train.samples_per_class": 2},
    "inbatch_all": {"mining.kind": "all"},
    "smart_batches": {"mining.kind": "all", "mining.batches": "index",
                      "mining.inbatch_kappa": True, "controller.error_on": "all"},
    "smart_batches_semihard": {"mining.kind": "semihard", "loss.triplet_loss": "margin",
                               "loss.use_global": False, "mining.batches": "index",
                               "mining.inbatch_kappa": True, "controller.error_on": "all"},
    "smart_batches_dw": {"mining.kind": "distance_weighted", "loss.triplet_loss": "margin",
                         "loss.use_global": False, "mining.batches": "index",
                         "mining.inbatch_kappa": True, "controller.error_on": "all"},
}
# The first version's Smart Mining: the variant sets these whatever the defaults are.
SPEC_V1 = {"controller.error_on": "all", "controller.target_error": 0.5,
           "controller.kappa_init": 16.0, "controller.kappa_random": 64.0,
           "controller.max_step_factor": None, "mining.mined_fraction": 0.5, "mining.k": 0,
           "train.triplets_per_anchor": 1}


def _expected_differences(variant: str, default: dict) -> dict:
    if variant == "smart_v1":
        return {name: value for name, value in SPEC_V1.items() if default[name] != value}
    return VARIANT_FIELDS[variant]


@pytest.mark.parametrize("variant", sorted([*VARIANT_FIELDS, "smart_v1"]))
def test_each_variant_changes_only_its_fields(variant):
    assert set(VARIANT_FIELDS) | {"smart_v1"} == set(common.VARIANTS)
    default, changed = _flat(cub.get_config()), _flat(cub.get_config(variant))
    differences = {name: changed[name] for name in default
                   if changed[name] != default[name] and name != "variant"}
    assert differences == _expected_differences(variant, default)
    assert changed["variant"] == variant


def test_smart_v1_is_the_first_spec():
    config = _flat(omniglot.get_config("smart_v1"))
    assert {name: config[name] for name in SPEC_V1} == SPEC_V1


def test_variants_combine_in_order_with_smoke():
    config = omniglot.get_config("smoke,semihard")
    assert config.variant == "smoke,semihard"
    assert config.mining.kind == "semihard" and config.subset.max_classes == 32
    assert config.train.epochs == 3 and config.model.width == 16
    cub_smoke = cub.get_config("smoke")
    assert cub_smoke.model.name == "small_conv" and cub_smoke.data.crop_size == 56
    assert cars196.get_config("smoke,lifted").loss.kind == "lifted"


def test_unknown_variant_names_the_flag():
    with pytest.raises(ValueError, match=r"--config: unknown variant 'fancy'.*semihard"):
        omniglot.get_config("smoke,fancy")


# ----------------------------------------------------------------------------------------------
# The command line.


def _cli(*args: str, env=None, **popen):
    command = [sys.executable, "-m", "experiments.omniglot", *args]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                    **(env or {})}, **popen)


def _run_cli(*args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    process = _cli(*args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_workdir_errors_are_one_line_naming_the_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file", r"^error: --workdir=.*/file: is a file; expected a folder$"),
             (tmp_path / "file" / "run", r"^error: --workdir=.*/file/run: lies under .*/file, "
                                         r"which is a file; expected a folder$")]
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                              str(readonly)], capture_output=True, check=False).returncode == 0
    if mounted:
        cases.append((readonly / "run", r"^error: --workdir=.*/readonly/run: cannot write there "
                                        r"\(Read-only file system\)"))
    try:
        for workdir, message in cases:
            result = _run_cli("--config=experiments/configs/omniglot.py:smoke",
                              f"--workdir={workdir}", timeout=120)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert re.search(message, lines[-1]), lines[-1]
    finally:
        if mounted:
            subprocess.run(["umount", str(readonly)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_resumes_identically(tmp_path):
    """A workdir on a 240 kB tmpfs (needs root to mount; skipped otherwise) fills up; the run
    stops with one line, and after the file system grows it resumes to the same metrics."""
    data_dir = make_omniglot_folder(tmp_path / "omniglot")
    args = ["--config=experiments/configs/omniglot.py:smoke", f"--config.data.dir={data_dir}",
            "--config.data.image_size=16", "--config.data.crop_size=16",
            "--config.model.width=8", "--config.model.depth=2", "--config.model.embedding_dim=16",
            "--config.subset.max_classes=0", "--config.subset.max_per_class=0",
            "--config.train.batch_size=16", "--config.train.embed_batch_size=32",
            "--config.train.epochs=6", "--config.train.progress=False"]
    env = {"SMINE_JAX_CACHE": str(tmp_path / "cache")}
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240k", "tmpfs", str(small)],
                      capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        reference = _run_cli(*args, f"--workdir={tmp_path / 'reference'}", env=env)
        assert reference.returncode == 0, reference.stderr[-3000:]
        full = _run_cli(*args, f"--workdir={small / 'run'}", env=env)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert re.search(r"^error: no space left on the device of --workdir=.*/small/run: the "
                         r"last complete checkpoint \(step \d+\) and metrics\.jsonl are kept",
                         lines[-1]), lines[-1]
        kept = [json.loads(line) for line in (small / "run" / "metrics.jsonl").read_text()
                .splitlines() if line.endswith("}")]
        assert kept and [r["epoch"] for r in kept] == list(range(1, len(kept) + 1))
        subprocess.run(["mount", "-o", "remount,size=20m", str(small)], check=True)
        resumed = _run_cli(*args, f"--workdir={small / 'run'}", env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert (json.loads(resumed.stdout.strip().splitlines()[-1])
                == json.loads(reference.stdout.strip().splitlines()[-1]))
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_data_errors_are_one_line_naming_the_file(tmp_path):
    data_dir = make_omniglot_folder(tmp_path / "omniglot", num_classes=3, per_class=3)
    broken = next((data_dir / "images_background").rglob("*.png"))
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    env = {"SMINE_JAX_CACHE": str(tmp_path / "cache")}
    result = _run_cli("--config=experiments/configs/omniglot.py:smoke",
                      f"--config.data.dir={data_dir}", f"--workdir={tmp_path / 'a'}", env=env,
                      timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(rf"^error: cannot read image .*{broken.name}: ", lines[-1]), lines[-1]
    # With data.skip_unreadable the image is left out and counted in config.json.
    result = _run_cli("--config=experiments/configs/omniglot.py:smoke",
                      f"--config.data.dir={data_dir}", "--config.data.skip_unreadable=True",
                      "--config.train.epochs=1", f"--workdir={tmp_path / 'a'}", env=env,
                      timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads((tmp_path / "a" / "config.json").read_text())["dataset"]["train"]
    assert counts["skipped_unreadable"] == 1 and counts["images"] == 3 * 3 - 1
    # Offline without --config.data.dir: the download fails with what to do instead.
    result = _run_cli("--config=experiments/configs/omniglot.py:smoke",
                      "--config.data.download_url=http://127.0.0.1:9/",
                      f"--workdir={tmp_path / 'b'}", env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(r"^error: cannot download Omniglot .* pass --config\.data\.dir=PATH",
                     lines[-1]), lines[-1]


@pytest.mark.parametrize("args,message", [
    (["--config=experiments/configs/omniglot.py:smoke,fancy"],
     r"^error: --config: unknown variant 'fancy'"),
    (["--config=experiments/configs/omniglot.py:smoke", "--config.data.dir=/no/such/dir"],
     r"^error: --config\.data\.dir=/no/such/dir: not a directory"),
    (["--config=experiments/configs/omniglot.py", "--config.train.no_such_field=3"],
     r"^error: --config\.train\.no_such_field: no such field in the config"),
    (["--config=experiments/configs/omniglot.py", "--config.train.epochz=3"],
     r'^error: --config\.train\.epochz: no such field in the config \(did you mean "epochs"\?\)$'),
    (["--config=experiments/configs/omniglot.py", "--config.trian.epochs=3"],
     r'^error: --config\.trian\.epochs: no such field in the config \(did you mean "train"\?\)$'),
    (["--config=experiments/configs/omniglot.py", "--config.train.batch_size=0",
      "--config.data.dir=/tmp"],
     r"^error: --config\.train\.batch_size=0: expected an integer >= 1"),
    (["--config=experiments/configs/cub.py:smoke"],
     r"^error: --config: experiments\.omniglot needs a omniglot config"),
])
def test_config_errors_are_one_line_naming_the_flag(tmp_path, args, message):
    result = _run_cli(*args, f"--workdir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines)
    assert re.search(message, lines[-1]), lines[-1]


class _Watcher:
    """Collects a child's stderr in a thread, so a test can wait for a text to appear."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.text = process, ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for chunk in iter(lambda: self.process.stderr.read1(4096), b""):
            self.text += chunk.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared:\n{self.text[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout: float = 240) -> int:
        code = self.process.wait(timeout=timeout)
        self._thread.join(timeout=10)
        return code


def _epoch_records(workdir: Path) -> list[dict]:
    records = [json.loads(line)
               for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        del record["seconds"], record["train_images_per_second"]
        record.pop("resumed_at_position", None)
    return records


@pytest.mark.slow
def test_resume_after_sigkill_sigterm_and_ctrl_c_ends_with_identical_metrics(tmp_path):
    data_dir = make_omniglot_folder(tmp_path / "omniglot", num_classes=16, per_class=24,
                                    size=48)
    args = ["--config=experiments/configs/omniglot.py:smoke", f"--config.data.dir={data_dir}",
            "--config.data.image_size=48", "--config.data.crop_size=40",
            "--config.model.depth=3", "--config.train.batch_size=8",
            "--config.subset.max_per_class=24",  # 48 steps an epoch: time to interrupt one
            "--config.controller.kappa_init=1.0"]
    env = {"SMINE_JAX_CACHE": str(tmp_path / "cache")}

    reference = _run_cli(*args, f"--workdir={tmp_path / 'reference'}", env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads(reference.stdout.strip().splitlines()[-1])

    workdir = tmp_path / "interrupted"
    # SIGKILL in the middle of epoch 2: resumes from the end of epoch 1.
    watcher = _Watcher(_cli(*args, f"--workdir={workdir}", env=env, stderr=subprocess.PIPE))
    watcher.wait_for("epoch 2:")
    time.sleep(0.1)
    watcher.process.send_signal(signal.SIGKILL)
    assert watcher.finish() == -signal.SIGKILL
    assert [r["epoch"] for r in _epoch_records(workdir)] == [1]

    # SIGTERM in the middle of epoch 3 of the resumed run: a mid-epoch checkpoint, exit 143;
    # then Ctrl-C (SIGINT) in the same epoch of the next run: the same, exit 130.
    for signum, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        watcher = _Watcher(_cli(*args, f"--workdir={workdir}", env=env,
                                stderr=subprocess.PIPE))
        watcher.wait_for("epoch 3:")
        watcher.process.send_signal(signum)
        assert watcher.finish() == status, watcher.text[-3000:]
        assert f"{signum.name}: saved step" in watcher.text
        assert "Traceback" not in watcher.text
        assert [r["epoch"] for r in _epoch_records(workdir)] == [1, 2]

    resumed = _run_cli(*args, f"--workdir={workdir}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == expected
    assert _epoch_records(workdir) == _epoch_records(tmp_path / "reference")

    # The epoch split by SIGTERM reports the train time of both processes: its images/s times
    # its train seconds covers the whole epoch, as in an uninterrupted epoch.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    def images_trained(record):
        return record["train_images_per_second"] * record["seconds"]["train"]

    assert [r.get("resumed_at_position", 0) > 0 for r in records] == [False, False, True]
    assert images_trained(records[2]) == pytest.approx(images_trained(records[1]), rel=1e-6)
