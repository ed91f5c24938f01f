"""benchmarks/train_bench.py runs end to end on a tiny config and reports its figures."""

from __future__ import annotations

import importlib.util
import json

import pytest


@pytest.fixture(scope="module")
def train_bench():
    return importlib.import_module("benchmarks.train_bench")


@pytest.mark.parametrize("variant, images_per_step", [("smoke", 96), ("smoke,semihard", 64)])
def test_reports_train_and_embedding_throughput(train_bench, tmp_path, capsys, variant,
                                                images_per_step):
    out = tmp_path / "summary.json"
    argv = ["--variant", variant, "--steps", "2", "--warmup", "0", "--embed-batches", "1",
            "--no-malloc-tuning", "--json", str(out)]
    assert train_bench.main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["images_per_step"] == images_per_step and summary["loss_finite"]
    assert summary["steps_taken"] == 1 + 0 + 2  # the compiling step, no warmup, 2 timed steps
    for name in ("step_ms", "step_cpu_ms", "embed_images_per_s", "peak_gib"):
        assert summary[name] > 0
    # images/s is the step's images over its measured time, not a separate clock
    assert summary["train_images_per_s"] == pytest.approx(
        images_per_step / (summary["step_ms"] / 1e3), rel=1e-9)
    # the peak holds at least one step's uint8 input batch
    assert summary["peak_gib"] * 2**30 >= images_per_step * 28 * 28
    assert "train step" in capsys.readouterr().out


def test_bad_counts_name_the_flag(train_bench, capsys):
    with pytest.raises(SystemExit):
        train_bench.parse_args(["--steps", "0"])
    assert "--steps" in capsys.readouterr().err
