"""benchmarks.batches_study: the ablation settings of index-built batches, their report and the
target check, on synthetic records (validation only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import batches_study as bs
from benchmarks import runs
from smine_jax.configs import omniglot


def _records(val_r1: float, map_r: float = 0.8, *, index: bool = True,
             epochs: int = 8) -> list[dict]:
    records = []
    for epoch in range(1, epochs + 1):
        mining = index and epoch > 2
        record = {"epoch": epoch, "mining": mining, "kappa": 1.5 if mining else None,
                  "controller_error": 0.4, "controller_target": 0.6,
                  "seconds": {"embed": 2.0 if mining else 0.0, "index": 1.0 if mining else 0.0,
                              "mine": 0.5 if mining else 0.0, "train": 100.0,
                              "eval": 5.0 if epoch % 2 == 0 else 0.0, "epoch": 110.0}}
        if mining:
            record.update(anchors=200, index_batches={
                "smart_pairs_per_batch": 7.5, "random_classes_per_batch": 17.0,
                "seeds_available": 150})
        if epoch % 2 == 0:
            record["val"] = {"recall@1": val_r1 * epoch / epochs, "map@r": map_r}
            record["test"] = {"recall@1": 0.0, "map@r": 0.0}  # never read
        records.append(record)
    return records


def test_every_setting_is_a_valid_config_and_each_control_is_one_of_them():
    settings = bs.settings()
    names = [s.name for s in settings]
    assert len(names) == len(set(names)) and bs.BASELINE in names
    assert set(bs.CONTROLS) | set(bs.CONTROLS.values()) <= set(names)
    for setting in settings:
        config = omniglot.get_config(setting.variant)
        for field, value in setting.overrides.items():
            section, name = field.split(".")
            assert name in config[section], field
            config[section][name] = value
        # Only the smart_batches variants build their batches from the index.
        assert (config.mining.batches == "index") == bs.uses_index_batches(setting)
    no_kappa = next(s for s in settings if s.name.endswith("no_inbatch_kappa"))
    assert no_kappa.overrides["mining.inbatch_kappa"] is False


def test_rows_show_what_the_index_did_and_what_it_cost():
    setting = next(s for s in bs.settings() if s.name == "smart_batches_dw")
    row = bs.setting_row(setting, _records(0.95), 8)
    assert row[3] == "95.0" and row[4] == "80.0"
    assert row[6] == ", ".join(["1.5"] * 6)          # κ per mining epoch
    assert row[8] == ", ".join(["7.5"] * 6)          # smart pairs per batch
    assert row[9] == ", ".join(["75"] * 6)           # 150 of 200 anchors
    assert row[10] == "3.5 / 100"                    # embed + index + batches / train
    baseline = next(s for s in bs.settings() if s.name == bs.BASELINE)
    row = bs.setting_row(baseline, _records(0.97, index=False), 8)
    assert row[6:11] == ["—"] * 5
    assert all(math.isnan(v) for v in bs.cost_split(_records(0.9, index=False)))


def test_the_gate_reads_validation_only_and_needs_both_metrics():
    settings = bs.settings()
    by_setting = {bs.BASELINE: _records(0.95, 0.80, index=False),
                  "smart_batches_dw": _records(0.97, 0.79)}
    assert bs.verdict_lines(settings, by_setting, 8) == ["The screen is not complete yet."]
    by_setting.update({s.name: _records(0.90, 0.70) for s in settings
                       if s.name not in by_setting})
    text = " ".join(bs.verdict_lines(settings, by_setting, 8))
    assert "`smart_batches_dw`" in text and "R@1 +2.0" in text and "**not passed**" in text
    by_setting["smart_batches_dw"] = _records(0.951, 0.85)
    assert "**passed**" in " ".join(bs.verdict_lines(settings, by_setting, 8))
    lines = bs.comparison_lines(by_setting, 8)
    assert "- `smart_batches_dw` − `distance_weighted`: R@1 +0.1, MAP@R +5.0" in lines


def test_report_only_writes_the_report_and_its_figure(tmp_path):
    for setting in bs.settings()[:3]:
        path = runs.run_dir(tmp_path / "runs", setting.name, 0) / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in _records(
            0.9, index=bs.uses_index_batches(setting))))
    report = tmp_path / "B.md"
    bs.main(["--report-only", "--runs-dir", str(tmp_path / "runs"), "--report", str(report)])
    text = report.read_text()
    assert text.startswith(bs.GENERATED) and "not both finished yet" in text
    assert "The screen is not complete yet." in text
    assert (tmp_path / bs.FIGURE).stat().st_size > 0


def test_bad_flags_name_what_is_wrong(capsys, tmp_path):
    with pytest.raises(SystemExit):
        bs.main(["--epochs", "0", "--report-only"])
    assert "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bs.main(["--data-dir", str(Path(tmp_path) / "missing")])
    assert "--data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bs.main(["--report-only", "--shard", "3/2"])
    assert "--shard" in capsys.readouterr().err
