"""benchmarks.smart_study: the screen's plan, its validation-only choice and its report, on
synthetic records (the runs themselves are the trainer's, tested elsewhere)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import smart_study as study


def _records(val_r1: float, *, test_r1: float = 0.5, epochs: int = 8) -> list[dict]:
    records = []
    for epoch in range(1, epochs + 1):
        mining = epoch > 2
        record = {"epoch": epoch, "mining": mining, "training_error": 0.4,
                  "kappa": 4.0 if mining else None, "mined_fraction": 0.5 if mining else 0.0}
        if mining:
            record.update(controller_error=0.62, controller_target=0.6, anchors=100,
                          fallbacks={"lists_inside_boundary": 7})
        if epoch % 2 == 0:
            scale = epoch / epochs
            record["val"] = {"recall@1": val_r1 * scale, "nmi": 0.8, "map@r": 0.3}
            record["test"] = {"recall@1": test_r1 * scale}
        records.append(record)
    return records


def test_stage_one_is_a_fixed_grid_from_smart_v1():
    settings = study.stage_one()
    names = [s.name for s in settings]
    assert len(names) == len(set(names)) == 14
    assert {"v1", "v1_auto", "random_global", "semihard"} <= set(names)
    mined = [s for s in settings if s.name.startswith("mined_")]
    assert len(mined) == 7 and all(s.overrides["controller.error_on"] == "mined" for s in mined)
    assert {s.overrides["controller.target_error"] for s in mined} == {0.5, 0.6, 0.75}
    assert {s.overrides["mining.mined_fraction"] for s in mined} == {0.5, 1.0}
    long_lists = [s for s in settings if s.name.endswith("_k160")]
    assert len(long_lists) == 2 and all(s.overrides["mining.k"] == 160 for s in long_lists)
    assert all(s.variant == "smart_v1" for s in settings if s.name not in study.REFERENCES)


def test_stage_two_changes_one_option_of_the_leader():
    leader = study.stage_one()[4]  # mined_t0.5_p0.5: κ₀ calibrated
    variations = study.stage_two(leader)
    assert {s.name.split("+")[1] for s in variations} == {"k160", "T4", "trust2", "q0.25",
                                                          "q0.75"}
    for setting in variations:
        changed = {k: v for k, v in setting.overrides.items()
                   if leader.overrides.get(k, "<absent>") != v}
        assert len(changed) == 1 and setting.stage == 2
    v1 = study.stage_one()[0]  # numeric κ₀: no calibration share to vary
    assert {s.name for s in study.stage_two(v1)} == {"v1+k160", "v1+T4", "v1+trust2"}
    long_list = next(s for s in study.stage_one() if s.name.endswith("_k160"))
    assert not any(s.name.endswith("+k160") for s in study.stage_two(long_list))


def test_plan_grows_stage_two_once_stage_one_is_scored_and_ignores_references():
    settings, winner = study.plan({})
    assert len(settings) == 14 and winner is None
    scores = {s.name: 0.5 for s in settings}
    scores.update({"semihard": 0.99, "mined_t0.6_p1.0": 0.7})  # the reference never wins
    settings, winner = study.plan(scores)
    assert len(settings) == 19 and winner is None  # stage 2 not scored yet
    assert all(s.name.startswith("mined_t0.6_p1.0+") for s in settings[14:])
    scores.update({s.name: 0.6 for s in settings[14:]})
    scores["mined_t0.6_p1.0+k160"] = 0.75
    assert study.plan(scores)[1].name == "mined_t0.6_p1.0+k160"


def test_commands_carry_the_overrides_as_flags(tmp_path):
    setting = study.stage_one()[4]
    command = study.command(setting, tmp_path / "w", epochs=8, data_dir=Path("/d"))
    assert command[1:4] == ["-m", "experiments.omniglot",
                            "--config=experiments/configs/omniglot.py:smart_v1"]
    assert "--config.controller.kappa_random=None" in command
    assert "--config.controller.kappa_init=auto" in command
    assert "--config.mining.mined_fraction=0.5" in command
    assert "--config.train.epochs=8" in command and "--config.data.dir=/d" in command


def test_the_choice_reads_validation_never_test():
    settings, _ = study.plan({})
    # Test metrics say the opposite of validation: the choice must follow validation.
    runs = {s.name: _records(0.5, test_r1=0.9) for s in settings}
    runs["v1_auto"] = _records(0.8, test_r1=0.1)
    scores = {name: study.val_score(records, 8) for name, records in runs.items()}
    assert scores["v1_auto"] == pytest.approx(0.8)
    settings, _ = study.plan(scores)
    assert all(s.name.startswith("v1_auto+") for s in settings[14:])
    for setting in settings[14:]:
        runs[setting.name] = _records(0.7, test_r1=0.95)
    scores = {s.name: study.val_score(runs[s.name], 8) for s in settings}
    settings, winner = study.plan(scores)
    assert winner.name == "v1_auto"
    text = study.study_markdown(settings, runs, epochs=8, winner=winner, commands=["c"],
                                data_dir=Path("/d"), revisions=["abc"])
    assert text.splitlines()[0] == study.GENERATED
    assert "Winner by validation R@1 after epoch 8: **`v1_auto`** (80.0 %)" in text
    table = text[text.index("## Every screened setting"):].splitlines()
    first = next(line for line in table if line.startswith("| `"))
    assert first.startswith("| `v1_auto` | 1 | `smart_v1` |")
    assert "| 4.0, 4.0, 4.0, 4.0, 4.0, 4.0 | 0.62, 0.62" in first
    assert first.endswith("| 7, 7, 7, 7, 7, 7 |")
    assert "95" not in first  # no test number in the table
    assert "commit `abc`" in text


def test_unfinished_study_has_no_winner():
    settings, _ = study.plan({})
    runs = {s.name: _records(0.5, epochs=4) for s in settings}  # 4 of 8 epochs
    assert math.isnan(study.val_score(runs["v1"], 8))
    text = study.study_markdown(settings, runs, epochs=8, winner=None, commands=["c"],
                                data_dir=Path("/d"))
    assert "The study is not complete yet" in text and "- v1: 4 of 8 epochs" in text


def test_stage_one_only_makes_its_leader_the_winner_and_says_stage_two_was_not_run():
    settings, winner = study.plan({}, stages=1)
    assert len(settings) == 14 and winner is None
    scores = {s.name: 0.5 for s in settings}
    scores["all_t0.6_p1.0"] = 0.7
    settings, winner = study.plan(scores, stages=1)
    assert len(settings) == 14 and winner.name == "all_t0.6_p1.0"
    runs = {s.name: _records(scores[s.name]) for s in settings}
    text = study.study_markdown(settings, runs, epochs=8, winner=winner, commands=["c"],
                                data_dir=Path("/d"), stages=1)
    assert "Stage 1 only (`--stages 1`)" in text and "`k160`" in text and "was not run" in text
    assert "Winner by validation R@1 after epoch 8: **`all_t0.6_p1.0`** (70.0 %)" in text
    assert "Tied with it" not in text
    scores["mined_t0.75_p1.0"] = scores["all_t0.5_p1.0"] = 0.7  # ties go to the grid's order
    winner = study.plan(scores, stages=1)[1]
    runs = {s.name: _records(scores[s.name]) for s in settings}
    text = study.study_markdown(settings, runs, epochs=8, winner=winner, commands=["c"],
                                data_dir=Path("/d"), stages=1)
    assert winner.name == "mined_t0.75_p1.0"
    assert "Tied with it (the same score): `all_t0.5_p1.0`, `all_t0.6_p1.0`;" in text
