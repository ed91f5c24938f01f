"""benchmarks.tuning_sweep: the equal grid of every variant, the validation-only choice and
its hand-over to compare_methods --tuned, on synthetic records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import compare_methods as cm
from benchmarks import runs
from benchmarks import tuning_sweep as sweep


def _records(val_r1: float, epochs: int = 8) -> list[dict]:
    return [{"epoch": e, **({"val": {"recall@1": val_r1 * e / epochs, "map@r": 0.3},
                             "test": {"recall@1": 0.99}} if e % 2 == 0 else {})}
            for e in range(1, epochs + 1)]


def test_every_variant_gets_the_same_grid_on_its_own_margin():
    for variant in ("smart", "semihard", "smart_batches"):
        cells = sweep.grid(variant)
        assert len(cells) == len(sweep.LEARNING_RATES) * len(sweep.MARGIN_FACTORS)
        assert set(cells[0].overrides) == {"optimizer.learning_rate", "loss.margin"}
        # The variant's own defaults come first (they win ties).
        assert cells[0].overrides == {"optimizer.learning_rate": 0.1, "loss.margin": 0.2}
        assert {c.overrides["loss.margin"] for c in cells} == {0.1, 0.2, 0.4}
        assert all(c.variant == variant for c in cells)
    lifted = sweep.grid("lifted")
    assert {c.overrides["loss.lifted_margin"] for c in lifted} == {0.5, 1.0, 2.0}
    npairs = sweep.grid("npairs", learning_rates=(0.01, 0.1))
    assert [c.overrides for c in npairs] == [{"optimizer.learning_rate": 0.1},
                                             {"optimizer.learning_rate": 0.01}]
    names = [c.name for v in runs.VARIANTS for c in sweep.grid(v)]
    assert len(names) == len(set(names))


def test_the_choice_reads_validation_only_and_waits_for_the_whole_grid():
    cells = sweep.grid("semihard", learning_rates=(0.03, 0.1), margin_factors=(1.0,))
    runs = {cells[0].name: _records(0.9), cells[1].name: _records(0.95)}
    runs[cells[1].name][-1]["test"]["recall@1"] = 0.0  # test is never read
    text, tuned = sweep.tuning_markdown({"semihard": cells}, runs, epochs=8, commands=[],
                                        data_dir=Path("/data"))
    assert tuned == {"semihard": dict(cells[1].overrides)}
    assert "**yes**" in text and "95.0" in text
    # A tie goes to the variant's defaults (first in the grid).
    assert sweep.choose(cells, {cells[0].name: 0.9, cells[1].name: 0.9}) == cells[0]
    # An unfinished cell: no choice yet.
    del runs[cells[1].name][-1]
    text, tuned = sweep.tuning_markdown({"semihard": cells}, runs, epochs=8, commands=[],
                                        data_dir=Path("/data"))
    assert tuned == {} and "sweep not complete" in text
    assert sweep.choose(cells, {cells[0].name: 0.9, cells[1].name: math.nan}) is None


def test_report_only_writes_the_report_and_the_tuned_file(tmp_path):
    cells = sweep.grid("npairs", learning_rates=(0.01, 0.03))
    for value, cell in zip((0.5, 0.7), cells, strict=True):
        path = runs.run_dir(tmp_path / "runs", cell.name, 0) / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in _records(value)))
    tuned_path = tmp_path / "tuned.json"
    # Another sweep's choice stays; this sweep's stale choice of npairs is replaced.
    tuned_path.write_text(json.dumps({"semihard": {"optimizer.learning_rate": 0.03},
                                      "npairs": {"optimizer.learning_rate": 0.1}}))
    sweep.main(["--report-only", "--variants", "npairs", "--learning-rates", "0.01,0.03",
                "--runs-dir", str(tmp_path / "runs"), "--report", str(tmp_path / "T.md"),
                "--tuned", str(tuned_path)])
    tuned = json.loads(tuned_path.read_text())
    assert tuned == {"npairs": {"optimizer.learning_rate": 0.03},
                     "semihard": {"optimizer.learning_rate": 0.03}}
    assert cm.load_tuned(str(tuned_path)) == tuned
    assert (tmp_path / "T.md").read_text().startswith(sweep.GENERATED)


def test_bad_flags_and_tuned_files_name_what_is_wrong(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--report-only", "--variants", "fancy"])
    assert "--variants" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--report-only", "--learning-rates", "0.1,-1"])
    assert "--learning-rates" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fancy": {"optimizer.learning_rate": 0.1}}))
    with pytest.raises(ValueError, match="unknown variants"):
        cm.load_tuned(str(bad))
    bad.write_text("[1]")
    with pytest.raises(ValueError, match="must hold"):
        cm.load_tuned(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        cm.load_tuned(str(tmp_path / "missing.json"))
