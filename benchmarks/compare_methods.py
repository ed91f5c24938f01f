"""The paper's comparison on Omniglot: every variant × seeds, then RESULTS.md + figures.

    python -m benchmarks.compare_methods --peer          # every variant × 3 seeds + PyTorch peer
    python -m benchmarks.compare_methods --smoke         # smart + semihard, seed 0, tiny subset
    python -m benchmarks.compare_methods --report-only   # rewrite the report from the runs

(from the repository root). Each run is a subprocess, from the repository root,

    python -m experiments.omniglot --config=experiments/configs/omniglot.py:VARIANT \
        --workdir=RUNS/VARIANT/seedS --config.seed=S --config.train.epochs=E \
        --config.train.eval_every=1 --config.train.progress=False --config.data.dir=DATA

(`omniglot.py:smoke,VARIANT` with --smoke; `python -m benchmarks.pml_peer` with the same flags
for the peer, workdir RUNS/pml_peer/seedS). The workdirs are the cache (`runs.run_all`): a run
whose metrics.jsonl has the test metrics of epoch E is skipped, an unfinished one resumes from
its checkpoints, so a killed comparison (Ctrl-C, SIGTERM: forwarded to the running child, which
checkpoints) goes on where it stopped when the same command is rerun, in this session or a later
one. Runs go seed by seed (every variant of seed 0 first), so a partial comparison already
covers every variant. The test set is evaluated every epoch (`train.eval_every=1`) so that every
curve has a point per epoch; that evaluation time is reported apart and left out of the
wall-clock axis.

The report (`--results`, default benchmarks/RESULTS.md; with --smoke RUNS/RESULTS.md) and its
PNGs (written next to it) cover every run in RUNS, whichever invocation or session trained it
(a narrower `--variants` / `--seeds` trains less, never reports less), and come from pure
functions of the runs' metrics.jsonl records (`report.results_markdown`, `plots.write_figures`);
runs that are missing or unfinished leave "—" cells and are listed. Figures: R@1 vs epoch and
vs wall-clock seconds (all variants + peer), κ and the controller's signal per epoch of smart vs
smart_v1 (the paper's Figs. 3–4), a montage of mined triplets at two epochs (Fig. 10).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from smine_jax.configs import omniglot

from . import plots, report, runs
from .runs import PEER, VARIANTS

DEFAULT_RUNS = runs.REPO / "benchmarks" / "runs"
DEFAULT_RESULTS = runs.REPO / "benchmarks" / "RESULTS.md"
SMOKE_VARIANTS = ("smart", "semihard")
# The smoke config's 3 epochs: epochs 1-2 are random-only, the third is the first mining epoch.
SMOKE_EPOCHS = int(omniglot.get_config("smoke").train.epochs)


def write_report(args, names: Sequence[str], seeds: Sequence[int],
                 commands: Sequence[str]) -> Path:
    """RESULTS.md and its figures from the runs in args.runs_dir."""
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    records = runs.load_runs(args.runs_dir, names, seeds)
    machines, protocol, peer = runs.run_settings(args.runs_dir, names, seeds)
    figures = plots.write_figures(runs.finished_runs(records, args.epochs), names,
                                  args.runs_dir, results.parent)
    text = report.results_markdown(
        records, variants=[n for n in names if n != PEER], seeds=seeds, epochs=args.epochs,
        command=commands, machines=machines, protocol=protocol, peer_settings=peer,
        figures=figures)
    from smine_jax import fileio

    fileio.write_text_atomically(results, text)
    return results


def _parse_args(argv=None):
    """The flags, checked and resolved (defaults of --smoke, absolute paths, --tuned read)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated (default: all {len(VARIANTS)}; --smoke: "
                             f"{','.join(SMOKE_VARIANTS)})")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; "
                        "--smoke: 0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of every run (default: the config's 20; --smoke: "
                             f"{SMOKE_EPOCHS})")
    parser.add_argument("--data-dir", default=str(runs.DEFAULT_DATA),
                        help="the Omniglot folder (images_background/, images_evaluation/)")
    parser.add_argument("--runs-dir", default=None,
                        help="the workdirs (default benchmarks/runs, --smoke: "
                             "benchmarks/runs/smoke)")
    parser.add_argument("--results", default=None,
                        help="the report (default benchmarks/RESULTS.md; --smoke: "
                             "RUNS/RESULTS.md); figures go next to it")
    parser.add_argument("--peer", action="store_true",
                        help="also run the PyTorch peer, benchmarks.pml_peer (needs torch and "
                             "pytorch-metric-learning)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny runs: the config's smoke variant (subset, small net)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the existing runs, train nothing")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only every N-th run from the I-th (e.g. two invocations "
                             "'taskset -c 0 ... --shard 0/2' and 'taskset -c 1 ... --shard 1/2'"
                             " train two runs at a time, one core each; their times then "
                             "come from a shared machine)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every run, e.g. --set "
                             "train.batch_size=64 (repeatable)")
    parser.add_argument("--tuned", default=None, metavar="JSON",
                        help="per-variant overrides {variant: {field: value}} from "
                             "benchmarks.tuning_sweep (benchmarks/tuned.json): each "
                             "variant's runs get its own (use a separate --runs-dir)")
    args = parser.parse_args(argv)
    args.variants = [v for v in (args.variants or ",".join(
        SMOKE_VARIANTS if args.smoke else VARIANTS)).split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {','.join(VARIANTS)}")
    try:
        args.seeds = [int(s) for s in (args.seeds or ("0" if args.smoke else "0,1,2")).split(
            ",") if s]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    args.epochs = args.epochs or (SMOKE_EPOCHS if args.smoke
                                  else int(omniglot.get_config().train.epochs))
    if args.epochs < 1 or not args.seeds:
        parser.error("--epochs must be >= 1 and --seeds non-empty")
    args.runs_dir = Path(args.runs_dir or (DEFAULT_RUNS / "smoke" if args.smoke
                                           else DEFAULT_RUNS)).absolute()
    args.results = Path(args.results or (args.runs_dir / "RESULTS.md" if args.smoke
                                         else DEFAULT_RESULTS)).absolute()
    args.data_dir = Path(args.data_dir).absolute()
    try:
        args.shard = runs.parse_shard(args.shard)
    except ValueError as error:
        parser.error(str(error))
    if any("=" not in item for item in args.set):
        parser.error("--set: expected FIELD=VALUE, e.g. train.batch_size=64")
    try:
        args.tuned = load_tuned(args.tuned)
    except ValueError as error:
        parser.error(str(error))
    if not args.report_only and not args.data_dir.is_dir():
        parser.error(f"--data-dir: {args.data_dir} is not a folder (Omniglot with "
                     "images_background/ and images_evaluation/)")
    if args.peer and not args.report_only:
        from . import pml_peer

        missing = pml_peer.missing_dependencies()
        if missing:
            print(pml_peer.missing_message(missing), file=sys.stderr)
            sys.exit(2)
    return args


def load_tuned(path: str | None) -> dict[str, dict]:
    """{variant: {field: value}} of a `tuning_sweep` choice file ({} without one)."""
    if path is None:
        return {}
    try:
        tuned = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--tuned: cannot read {path}: {error}") from None
    if not isinstance(tuned, dict) or not all(
            isinstance(v, dict) and all(isinstance(f, str) and "." in f for f in v)
            for v in tuned.values()):
        raise ValueError(f"--tuned: {path} must hold {{variant: {{section.field: value}}}}")
    unknown = sorted(set(tuned) - {*VARIANTS, PEER})
    if unknown:
        raise ValueError(f"--tuned: {path} names unknown variants {unknown}")
    return tuned


def main(argv=None) -> None:
    """Trains the unfinished runs asked for (none with --report-only), then writes the report
    of every run in the runs dir."""
    args = _parse_args(argv)
    names = [*args.variants, *([PEER] if args.peer else [])]
    command, history = runs.record_invocation("benchmarks.compare_methods", argv,
                                              args.runs_dir, report_only=args.report_only)
    failures, stopped = [], False
    if not args.report_only:
        index, count = args.shard
        jobs = [(name, seed) for seed in args.seeds for name in names][index::count]
        failures, stopped = runs.run_all(
            jobs, runs_dir=args.runs_dir, epochs=args.epochs,
            command_for=lambda name, seed, workdir: runs.train_command(
                name, seed, workdir=workdir, epochs=args.epochs, data_dir=args.data_dir,
                smoke=args.smoke, overrides=[*args.set, *(
                    f"{field}={value}" for field, value in args.tuned.get(name, {}).items())]))
    # The report covers every run in the cache, whichever invocation (or session) trained it.
    names, seeds = runs.reported_runs(args.runs_dir, names, args.seeds)
    commands = runs.distinct_commands(history, command)
    results = write_report(args, names, seeds, commands)
    print(f"report: {results}")
    runs.exit_for(failures, stopped)


if __name__ == "__main__":
    main()
