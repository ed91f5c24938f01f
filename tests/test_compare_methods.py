"""Tests of the comparison: benchmarks.stats (statistics of the records), benchmarks.report
(RESULTS.md), benchmarks.plots (figures), benchmarks.runs (workdirs, records, commands) and the
benchmarks.compare_methods command line (the resumable smoke comparison end to end), and of
benchmarks.pml_peer (the PyTorch peer: its net against the Flax model, the missing-dependency
exit)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import t as student_t
from test_train import make_omniglot_folder

from benchmarks import compare_methods as cm
from benchmarks import plots, pml_peer, report, runs, stats

REPO = Path(__file__).resolve().parents[1]

METRIC_KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")


def _record(epoch: int, r1: float | None, *, mining: bool = False, kappa=None,
            error: float = 0.5, seconds: dict | None = None, **extra) -> dict:
    """A metrics.jsonl record as the trainer writes it (test metrics derived from r1; the
    controller's signal is the training error)."""
    record = {"epoch": epoch, "mining": mining, "kappa": kappa, "training_error": error,
              "controller_error": error, "controller_target": 0.5,
              "seconds": {"embed": 0.0, "index": 0.0, "mine": 0.0, "train": 1.0, "eval": 0.5,
                          "epoch": 1.5, **(seconds or {})}, **extra}
    if r1 is not None:
        record["test"] = {key: r1 * (1 + 0.1 * i) for i, key in enumerate(METRIC_KEYS)}
    return record


def _run(r1s, **kwargs) -> list[dict]:
    return [_record(epoch, r1, **kwargs) for epoch, r1 in enumerate(r1s, 1)]


# ----------------------------------------------------------------------------------------------
# Statistics.


@pytest.mark.parametrize("size", [2, 3, 7])
def test_mean_std_and_format_match_numpy(size):
    values = np.random.default_rng(size).random(size)
    mean, std, count = stats.mean_std([*values, math.nan, None])  # NaN / None are left out
    assert count == size
    assert mean == pytest.approx(values.mean()) and std == pytest.approx(values.std(ddof=1))
    assert report.format_mean_std(values) == (f"{100 * values.mean():.1f} ± "
                                          f"{100 * values.std(ddof=1):.1f}")
    assert report.format_mean_std(values[:1], scale=1, digits=3) == f"{values[0]:.3f}"
    assert report.format_mean_std([]) == report.format_mean_std([math.nan]) == report.MISSING
    assert math.isnan(stats.mean_std([0.3])[1]) and stats.mean_std([])[2] == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.floats(0, 1))
def test_epochs_to_reach_is_the_first_epoch_at_or_above_target(values, target):
    epochs = list(range(1, len(values) + 1))
    found = stats.epochs_to_reach(epochs, values, target)
    reference = next((e for e, v in zip(epochs, values, strict=True) if v >= target), None)
    assert found == reference


def test_epochs_to_reach_edges():
    assert stats.epochs_to_reach([1, 2, 3], [0.1, 0.95, 1.0], 0.95) == 2  # equality reaches
    assert stats.epochs_to_reach([1, 2], [0.1, 0.2], 0.3) is None
    assert stats.epochs_to_reach([1, 2], [0.1, 0.2], math.nan) is None
    assert stats.epochs_to_reach([], [], 0.1) is None


def test_finished_runs_cut_to_the_epochs_and_drop_unfinished(tmp_path):
    finished = _run([0.1, 0.2, 0.3, 0.4])  # a run extended beyond the comparison's 3 epochs
    unfinished = _run([0.1, 0.2])
    no_final_test = _run([0.1, 0.2, None])  # epoch 3 logged without its evaluation
    by_name = {"a": {0: finished, 1: unfinished, 2: no_final_test, 3: []}}
    kept = runs.finished_runs(by_name, 3)
    assert list(kept["a"]) == [0] and [r["epoch"] for r in kept["a"][0]] == [1, 2, 3]
    assert runs.is_finished(finished, 3) and not runs.is_finished(unfinished, 3)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unfinished) + '{"epoch": 3, "te')
    assert runs.read_records(path) == unfinished  # a torn last line is ignored
    assert runs.read_records(tmp_path / "absent.jsonl") == []


def test_mean_curve_and_cumulative_seconds():
    seed_a = _run([0.2, 0.4, 0.6], seconds={"epoch": 3.0, "eval": 1.0})
    seed_b = [_record(1, 0.4), _record(2, None), _record(3, 0.8)]  # epoch 2 not evaluated
    epochs, values = stats.mean_curve([seed_a, seed_b])
    np.testing.assert_array_equal(epochs, [1, 3])
    np.testing.assert_allclose(values, [0.3, 0.7])
    seconds = stats.mean_cumulative_seconds([seed_a, seed_b], epochs)
    np.testing.assert_allclose(seconds, [(2.0 + 1.0) / 2, (6.0 + 3.0) / 2])  # no eval time
    assert stats.mean_curve([])[1].size == 0


def test_settled_epoch_needs_the_error_to_stay_in_the_band():
    errors = [(False, 0.9), (False, 0.8), (True, 0.7), (True, 0.52), (True, 0.6), (True, 0.47),
              (True, 0.5)]
    records = [_record(e, 0.1, mining=m, error=x) for e, (m, x) in enumerate(errors, 1)]
    assert stats.settled_epoch(records) == 6  # the records' target is 0.5
    assert stats.settled_epoch(records[:5]) is None
    assert stats.settled_epoch(records, tolerance=0.2) == 3
    assert stats.settled_epoch(_run([0.1, 0.2])) is None  # never mines


def test_time_split_means_and_selection_shares():
    random_epoch = _record(1, 0.1, seconds={"train": 4.0, "eval": 1.0, "epoch": 5.0})
    mining_epoch = _record(2, 0.2, mining=True, kappa=16.0, seconds={
        "embed": 1.0, "index": 0.5, "mine": 0.5, "train": 8.0, "eval": 2.0, "epoch": 12.0})
    split = stats.time_split([[random_epoch, mining_epoch]])
    assert split["train"] == pytest.approx(6.0) and split["embed"] == pytest.approx(0.5)
    assert split["epoch"] == pytest.approx(8.5) and split["no_eval"] == pytest.approx(7.0)
    assert split["select_share"] == pytest.approx(1.0 / 10.0)  # mining epochs only
    assert split["embed_select_share"] == pytest.approx(2.0 / 10.0)
    assert math.isnan(stats.time_split([[random_epoch]])["select_share"])
    assert stats.time_split([]) == {}


def test_compare_verdicts():
    assert stats.compare([0.5, 0.52, 0.51], [0.4, 0.41, 0.39])[2] == "held"
    assert stats.compare([0.4, 0.41, 0.39], [0.5, 0.52, 0.51])[2] == "reversed"
    assert stats.compare([0.5, 0.3, 0.7], [0.45, 0.5, 0.4])[2] == "inconclusive"
    assert stats.compare([0.5], [0.4])[2] == "single seed"
    assert stats.compare([], [0.4])[2] == "missing"
    difference, p_value, _ = stats.compare([0.5, 0.7], [0.1, 0.3])
    assert difference == pytest.approx(0.4)
    # Welch's t-test: t = 0.4 / sqrt(0.02 / 2 + 0.02 / 2) = 2.83 on 2 degrees of freedom.
    t = 0.4 / math.sqrt(2 * np.var([0.5, 0.7], ddof=1) / 2)
    assert p_value == pytest.approx(2 * student_t.sf(t, 2))
    assert stats.compare([0.5, 0.5, float("nan")], [0.4, 0.4])[1:] == (0.0, "held")
    assert stats.compare([0.5, 0.5], [0.5, 0.5])[1:] == (1.0, "inconclusive")


# ----------------------------------------------------------------------------------------------
# The report.


def _synthetic_runs():
    """smart (3 seeds), random_global (2 finished + 1 unfinished), semihard (none), peer."""
    smart = {seed: _run([0.2, 0.5, 0.6, 0.62 + 0.01 * seed], mining=True, kappa=8.0,
                        seconds={"index": 0.01, "mine": 0.02, "train": 2.0, "epoch": 3.0,
                                 "eval": 0.5}) for seed in range(3)}
    random_global = {0: _run([0.1, 0.3, 0.5, 0.55]), 1: _run([0.1, 0.3, 0.5, 0.57]),
                     2: _run([0.1, 0.2])}
    peer = {seed: _run([0.1, 0.2, 0.3, 0.4], seconds={"train": 5.0, "epoch": 5.5, "eval": 0.5},
                       miner_seconds=1.0) for seed in range(3)}
    semihard = {0: [], 1: [], 2: []}
    for records in smart.values():
        records[0]["mining"] = records[1]["mining"] = False
    return {"smart": smart, "semihard": semihard, "random_global": random_global,
            runs.PEER: peer}


def test_results_markdown_on_synthetic_records():
    text = report.results_markdown(
        _synthetic_runs(), variants=["smart", "semihard", "random_global"], seeds=[0, 1, 2],
        epochs=4, command="python -m benchmarks.compare_methods --x",
        protocol={"train_images": 100},
        peer_settings={"margin": 0.2, "distance": "squared", "optimizer": "sgd"},
        machines=[{"cpu": "CPU A", "cores": 2}, {"cpu": "CPU A", "cores": 2}],
        figures={"R@1 vs epoch": "results_r1_vs_epoch.png"})
    lines = text.splitlines()
    assert lines[0] == report.GENERATED and "do not edit" in lines[0]
    assert "`python -m benchmarks.compare_methods --x`" in text and "3 × N = 300" in text
    assert text.count("CPU A, 2 cores") == 1  # one machine listed once

    def row(name, table_start):
        start = text.index(table_start)
        return next(line for line in text[start:].splitlines()
                    if line.startswith(f"| `{name}` |")).split(" | ")

    finals = [0.62, 0.63, 0.64]
    smart = row("smart", "## Test metrics")
    assert smart[1] == "3"
    for column, scale in ((2, 1.0), (7, 1.5)):  # R@1 and MAP@R (= 1.5 × r1 in _record)
        values = np.asarray(finals) * scale
        assert smart[column].strip(" |") == (f"{100 * values.mean():.1f} ± "
                                             f"{100 * values.std(ddof=1):.1f}")
    semihard = row("semihard", "## Test metrics")
    assert semihard[1] == "0" and all(cell.strip(" |") == report.MISSING for cell in semihard[2:])
    assert row("random_global", "## Test metrics")[1] == "2"
    assert "- random_global seed 2: 2 of 4 epochs" in text
    assert "- semihard seed 0: not started" in text

    # Convergence: mean curves smart [.2, .5, .6, .63], random_global [.1, .3, .5, .56].
    convergence = row("smart", "## Convergence")
    assert convergence[1:3] == ["63.0", "3"]  # 0.6 >= 0.95 × 0.63 > 0.5
    assert row("random_global", "## Convergence")[1:4] == ["56.0", "4", "4"]


def test_results_markdown_convergence_and_time_columns():
    text = report.results_markdown(_synthetic_runs(),
                                   variants=["smart", "semihard", "random_global"],
                               seeds=[0, 1, 2], epochs=4, command="c")
    start = text.index("## Convergence")
    smart = next(line for line in text[start:].splitlines()
                 if line.startswith("| `smart` |")).split(" | ")
    # 95 % of random_global's best mean R@1 (0.56) is 0.532: smart's mean curve reaches it at
    # epoch 3, after 3 × (3.0 - 0.5) training seconds.
    assert smart[3:5] == ["3", "8"]
    assert smart[5].strip(" |") == "3, 3, 3"  # error 0.5 in every mining epoch (3 and 4)
    assert next(line for line in text[start:].splitlines()
                if line.startswith("| `random_global` |")).endswith("| — |")  # never mines
    start = text.index("## Time per epoch")
    smart_time = next(line for line in text[start:].splitlines()
                      if line.startswith("| `smart` |")).split(" | ")
    assert smart_time[6] == "3.00" and smart_time[7] == "2.50"
    assert smart_time[8] == f"{100 * 0.03 / 2.5:.2f} %"
    # The peer's epoch without evaluation is 5.0 s, smart's 2.5 s; semihard did not run.
    assert "`pml_peer` / `smart`: 2.00" in text and "`pml_peer` / `semihard`: —" in text
    assert "takes 1.00 s an epoch (20.00 %" in text
    assert "Smart Mining beats semi-hard (R@1, `smart` − `semihard`): —: **missing**" in text


def test_results_markdown_with_no_runs_at_all():
    text = report.results_markdown({"smart": {0: []}}, variants=["smart"], seeds=[0], epochs=20,
                               command="c")
    assert "| `smart` | 0 | — | — | — | — | — | — |" in text
    assert "- smart seed 0: not started" in text
    assert "(no run has started yet)" in text


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == (
        b"\x89PNG\r\n\x1a\n")


def test_figures_from_synthetic_records(tmp_path):
    finished = runs.finished_runs(_synthetic_runs(), 4)
    names = ["smart", "semihard", "random_global", runs.PEER]
    plots.plot_recall_curves(finished, names, tmp_path / "a.png", tmp_path / "b.png")
    plots.plot_controller(finished, tmp_path / "c.png")
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8, 1), dtype=np.uint8)
    plots.plot_triplet_montage([("epoch 3 (mined)", images), ("epoch 9", images)],
                            tmp_path / "d.png", "title")
    plots.plot_recall_curves({}, names, tmp_path / "e.png", tmp_path / "f.png")  # nothing yet
    plots.plot_controller({}, tmp_path / "g.png")
    plots.plot_triplet_montage([], tmp_path / "h.png")
    for name in "abcdefgh":
        assert _is_png(tmp_path / f"{name}.png"), name


def test_choose_triplets_draws_each_epochs_mined_triplets_uniformly():
    def epoch(anchors, mined):
        anchors = np.asarray(anchors)
        return {"anchor": anchors, "positive": anchors + 100, "negative": anchors + 200,
                "mined": np.asarray(mined, bool)}

    triplets = {1: epoch([0, 1, 2, 3], [0, 0, 0, 0]), 3: epoch([0, 1, 2, 3], [1, 1, 0, 0]),
                5: epoch([3, 2, 1, 0], [0, 1, 1, 1])}
    chosen = plots.choose_triplets(triplets, num_anchors=5)
    assert [(e, mined) for e, _, mined in chosen] == [(3, True), (5, True)]
    np.testing.assert_array_equal(chosen[0][1], [[0, 100, 200], [1, 101, 201]])
    np.testing.assert_array_equal(chosen[1][1][:, 0], [2, 1, 0])  # every mined row, in order
    unmined = {1: epoch([0, 1], [0, 0]), 2: epoch([1, 5], [0, 0])}
    (first, rows_1, mined_1), (last, rows_2, _) = plots.choose_triplets(unmined, 3)
    assert (first, last, mined_1) == (1, 2, False) and rows_1.shape == (2, 3)
    # Mining only in the last epoch: the first epoch (random) against the last (mined).
    late = {1: epoch([0, 1, 2], [0, 0, 0]), 2: epoch([0, 1, 2], [0, 0, 0]),
            3: epoch([2, 0, 1], [1, 0, 1])}
    chosen = plots.choose_triplets(late, 5)
    assert [(e, mined) for e, _, mined in chosen] == [(1, False), (3, True)]
    np.testing.assert_array_equal(chosen[1][1][:, 0], [2, 1])
    assert plots.choose_triplets({}, 3) == []
    # A fair sample: over many draws every mined row is shown about equally often, never the
    # unmined ones (the first rows of an epoch are not favoured).
    many = {1: epoch(np.arange(100), np.arange(100) % 2 == 1)}
    counts = np.zeros(100)
    for seed in range(400):
        for _, rows, _ in plots.choose_triplets(many, 5, seed=seed):
            counts[rows[:, 0]] += 1
    assert counts[::2].sum() == 0
    expected = 400 * 5 / 50
    assert np.all(np.abs(counts[1::2] - expected) < 5 * np.sqrt(expected))


def test_parse_shard_and_the_shared_machine_note():
    assert runs.parse_shard(None) == (0, 1) and runs.parse_shard("1/2") == (1, 2)
    for text in ("2/2", "-1/2", "a/b", "1"):
        with pytest.raises(ValueError, match="^--shard"):
            runs.parse_shard(text)
    assert not any("two at a time" in line for line in report.command_lines(["python x.py"]))
    lines = report.command_lines(["python x.py --shard 0/2", "python x.py --shard 1/2"])
    assert any("two at a time" in line for line in lines)


def test_controller_signal_settling_bounds_and_model_selection():
    new = _record(3, 0.5, mining=True, kappa=4.0, controller_error=0.7, controller_target=0.7)
    assert stats.controller_signal(new) == (0.7, 0.7)
    assert math.isnan(stats.controller_signal({**new, "controller_error": None})[0])
    records = [_record(e, 0.5, mining=e > 2, kappa=k, controller_error=x, controller_target=0.6)
               for e, k, x in ((1, None, 0.1), (2, None, 0.1), (3, 64.0, None), (4, 8.0, 0.9),
                               (5, 9.0, 0.62), (6, 9.5, 0.58), (7, 1.0, 0.6))]
    assert stats.settled_epoch(records) == 5
    assert stats.kappa_off_bounds(records, 4) is False  # κ = 1 at epoch 7
    assert stats.kappa_off_bounds(records[:6], 4) is True
    assert stats.kappa_off_bounds(records[:2], 4) is None
    for record, val in zip(records, (0.5, 0.8, 0.7, 0.8, 0.6, 0.1, 0.2), strict=True):
        record["val"] = {"recall@1": val}
    chosen = stats.best_val_test(records)
    assert chosen["epoch"] == 2 and chosen["recall@1"] == records[1]["test"]["recall@1"]
    assert stats.best_val_test(records[:0]) == {}


def test_targets_and_frozen_v1_sections(tmp_path):
    def finals(r1s, **extra):
        return {seed: [_record(e, r1 * (e / 6), mining=e > 2, kappa=8.0 if e > 2 else None,
                               controller_error=0.6, controller_target=0.6, **extra)
                       for e in range(1, 7)] for seed, r1 in enumerate(r1s)}

    finished = {"smart": finals([0.80, 0.81, 0.82]),
                "random_global": finals([0.70, 0.71, 0.72]),
                "index_no_global": finals([0.79, 0.80, 0.81]),
                "smart_manual": finals([0.60, 0.61, 0.62])}
    text = "\n".join(report.targets_markdown(finished))
    assert "`smart` − `random_global` = +10.0 points" in text and "**met**" in text
    assert "within 5 epochs: mean curve 6 (per seed 6, 6, 6): **missed**" in text
    assert "settled from epoch 3, 3, 3" in text
    assert "`smart` − `smart_manual` (the controller): R@1 +20.0 (p = " in text
    frozen = tmp_path / "RESULTS_v1.md"
    frozen.write_text("# x\n\n## Test metrics after 20 epochs\n\n| method | n |\n|---|---|\n"
                      "| `smart` | 3 |\n| `semihard` | 3 |\n\n## Convergence\n| `smart` | 9 |\n")
    section = report.v1_markdown(frozen)
    assert "| `smart (v1)` | 3 |" in section and "| `semihard (v1)` | 3 |" in section
    assert "| `smart` | 9 |" not in section and section[0].startswith("## v1 rows")
    assert report.v1_markdown(tmp_path / "absent.md") == []


def test_run_commands():
    command = runs.train_command("semihard", 2, workdir=Path("/r/semihard/seed2"), epochs=7,
                                 data_dir=Path("/d"), smoke=True, overrides=["mining.k=5"])
    assert command[1:] == [
        "-m", "experiments.omniglot", "--config=experiments/configs/omniglot.py:smoke,semihard",
        "--workdir=/r/semihard/seed2", "--config.seed=2", "--config.train.epochs=7",
        "--config.train.eval_every=1", "--config.train.progress=False",
        "--config.data.dir=/d", "--config.mining.k=5"]
    peer = runs.train_command(runs.PEER, 0, workdir=Path("/w"), epochs=20, data_dir=Path("/d"))
    assert peer[1:4] == ["-m", "benchmarks.pml_peer", "--config=experiments/configs/omniglot.py"]
    assert "--config.train.eval_every=2" in runs.train_command(
        "smart", 0, workdir=Path("/w"), epochs=8, data_dir=Path("/d"), eval_every=2)
    assert pml_peer.steps_per_epoch(19_280, 128) == 452  # ⌈3 × 19,280 / 128⌉


def test_report_covers_every_run_on_disk_and_every_command(tmp_path):
    # Runs trained by earlier invocations (other variants, seeds, the peer) stay in the report.
    for name, seed in (("semihard", 0), ("smart", 3), (runs.PEER, 1)):
        (tmp_path / name / f"seed{seed}").mkdir(parents=True)
    (tmp_path / "smart" / "notes").mkdir()  # not a seed folder
    (tmp_path / "unknown_variant" / "seed0").mkdir(parents=True)
    names, seeds = runs.reported_runs(tmp_path, ["lifted"], [0])
    assert names == ["smart", "semihard", "lifted", runs.PEER]  # VARIANTS order, the peer last
    assert seeds == [0, 1, 3]
    assert runs.reported_runs(tmp_path / "empty", ["smart"], [2]) == (["smart"], [2])

    history = tmp_path / "commands.jsonl"
    assert runs.distinct_commands(history, "now") == ["now"]
    history.write_text("".join(json.dumps({"command": c}) + "\n" for c in "abab"))
    assert runs.distinct_commands(history, "now") == ["a", "b"]
    text = report.results_markdown({"smart": {0: []}}, variants=["smart"], seeds=[0], epochs=2,
                               command=["a", "b"])
    assert "  - `a`\n  - `b`" in text and "- Command: " not in text
    assert "- Command: `a`" in report.results_markdown({"smart": {0: []}}, variants=["smart"],
                                                   seeds=[0], epochs=2, command=["a"])


# ----------------------------------------------------------------------------------------------
# End to end and the peer.


def _has_peer_dependencies() -> bool:
    return not pml_peer.missing_dependencies()


@pytest.mark.slow
def test_smoke_comparison_end_to_end_then_skips_finished_runs(tmp_path):
    data_dir = make_omniglot_folder(tmp_path / "omniglot", num_classes=16)
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "SMINE_JAX_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "benchmarks.compare_methods", "--smoke",
               f"--data-dir={data_dir}", f"--runs-dir={runs_dir}",
               *(["--peer"] if _has_peer_dependencies() else [])]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    text = (runs_dir / "RESULTS.md").read_text()
    assert text.startswith(report.GENERATED)
    names = ["smart", "semihard", *([runs.PEER] if _has_peer_dependencies() else [])]
    for name in names:
        assert f"| `{name}` | 1 |" in text
        assert runs.is_finished(runs.run_records(runs_dir, name, 0), cm.SMOKE_EPOCHS)
    for figure in plots.FIGURES.values():
        assert _is_png(runs_dir / figure) and f"]({figure})" in text

    logs = {name: (runs_dir / name / "seed0" / "metrics.jsonl").stat() for name in names}
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("finished, skipped") == len(names)
    for name in names:
        after = (runs_dir / name / "seed0" / "metrics.jsonl").stat()
        assert (after.st_mtime_ns, after.st_size) == (logs[name].st_mtime_ns,
                                                      logs[name].st_size)
    assert (runs_dir / "RESULTS.md").read_text().count("| `smart` | 1 |") == 1


_BLOCK_PEER_DEPENDENCIES = ("import runpy, sys; sys.modules['torch'] = None; "
                            "sys.modules['pytorch_metric_learning'] = None; "
                            "sys.argv = [sys.argv[1], *sys.argv[2:]]; "
                            "runpy.run_module(sys.argv[0], run_name='__main__', "
                            "alter_sys=True)")


def test_missing_peer_dependencies_exit_2_with_the_pip_command(tmp_path):
    peer = subprocess.run([sys.executable, "-c", _BLOCK_PEER_DEPENDENCIES,
                           "benchmarks.pml_peer", f"--workdir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert peer.returncode == 2
    assert pml_peer.INSTALL_HINT in peer.stderr and "torch" in peer.stderr
    assert "pip install torch==2.13.0 pytorch-metric-learning" in peer.stderr
    compare = subprocess.run([sys.executable, "-c", _BLOCK_PEER_DEPENDENCIES,
                              "benchmarks.compare_methods", "--peer",
                              f"--data-dir={tmp_path}", f"--runs-dir={tmp_path / 'runs'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert compare.returncode == 2 and pml_peer.INSTALL_HINT in compare.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_peer_net_has_the_flax_models_parameters():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    import jax
    import jax.numpy as jnp

    from smine_jax import models
    from smine_jax.configs import omniglot

    config = omniglot.get_config()
    model = models.build_model(config.model)
    shapes = jax.eval_shape(lambda key: model.init(key, jnp.zeros((2, 28, 28, 1)), train=False),
                            jax.random.PRNGKey(0))
    flax_sizes = sorted(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    torch.manual_seed(0)
    net = pml_peer.build_net(64, 4, 64, 1)
    torch_sizes = sorted([p.numel() for p in net.parameters()]
                         + [b.numel() for n, b in net.named_buffers() if "running" in n])
    assert torch_sizes == flax_sizes
    net.eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    with torch.no_grad():
        out = net(pml_peer.to_tensor(images, (0.92,), (0.22,))).numpy()
    assert out.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    expected = (images.transpose(0, 3, 1, 2) / 255.0 - 0.92) / 0.22
    np.testing.assert_allclose(pml_peer.to_tensor(images, (0.92,), (0.22,)).numpy(), expected,
                               rtol=1e-6, atol=1e-6)
