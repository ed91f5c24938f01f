"""Runs of the study scripts: their commands, workdirs and records, and the resumable loop.

A run is one subprocess (`python -m experiments.omniglot`, or the PyTorch peer) with its own
workdir RUNS/NAME/seedS. The workdirs are the cache of compare_methods, smart_study and
tuning_sweep: a run whose metrics.jsonl has the test metrics of its last epoch is finished and
skipped, an unfinished one resumes from its checkpoints. Each launch appends the machine to the
workdir's machine.jsonl, each training invocation itself to RUNS/commands.jsonl, so that the
reports can name the machines and every command that trained their runs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from smine_jax.configs import common, omniglot

REPO = Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/omniglot.py"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "omniglot"
VARIANTS = tuple(common.VARIANTS)  # the paper's rows, in the config's order
PEER = "pml_peer"
# Variants that train on index-mined / random triplets (they save triplets, have κ).
TRIPLET_VARIANTS = tuple(name for name in VARIANTS
                         if omniglot.get_config(name).mining.kind == "smart")


def train_command(name: str, seed: int, *, workdir: Path, epochs: int, data_dir: Path,
                  eval_every: int = 1, smoke: bool = False,
                  overrides: Sequence[str] = ()) -> list[str]:
    """The subprocess command of one run, to run from the repository root: variant `name` of
    CONFIG (its smoke version with `smoke`), or the PyTorch peer with the same flags for PEER;
    `overrides`: FIELD=VALUE config overrides."""
    flags = [f"--workdir={workdir}", f"--config.seed={seed}", f"--config.train.epochs={epochs}",
             f"--config.train.eval_every={eval_every}", "--config.train.progress=False",
             f"--config.data.dir={data_dir}", *(f"--config.{item}" for item in overrides)]
    if name == PEER:
        config = CONFIG + (":smoke" if smoke else "")
        return [sys.executable, "-m", "benchmarks.pml_peer", f"--config={config}", *flags]
    config = f"{CONFIG}:{'smoke,' if smoke else ''}{name}"
    return [sys.executable, "-m", "experiments.omniglot", f"--config={config}", *flags]


def run_dir(runs_dir: Path, name: str, seed: int) -> Path:
    """The workdir of one run: RUNS/name/seedS."""
    return runs_dir / name / f"seed{seed}"


def read_records(path: Path) -> list[dict]:
    """The JSON records of a .jsonl file (none when absent; a torn last line is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run_records(runs_dir: Path, name: str, seed: int, file: str = "metrics.jsonl"
                ) -> list[dict]:
    """The records of one run's metrics.jsonl (or of its `file`, e.g. machine.jsonl)."""
    return read_records(run_dir(runs_dir, name, seed) / file)


def load_runs(runs_dir: Path, names: Sequence[str],
              seeds: Sequence[int]) -> dict[str, dict[int, list[dict]]]:
    """{name: {seed: metrics.jsonl records}} of RUNS/name/seedS (empty list: not started)."""
    return {name: {seed: run_records(runs_dir, name, seed) for seed in seeds}
            for name in names}


def is_finished(records: Sequence[Mapping], epochs: int) -> bool:
    """True when the run has the test metrics of epoch `epochs`."""
    return any(record.get("epoch") == epochs and "test" in record for record in records)


def finished_runs(runs: Mapping[str, Mapping[int, list]],
                  epochs: int) -> dict[str, dict[int, list[dict]]]:
    """The finished runs only, each cut to its records of epochs 1..`epochs`."""
    return {name: {seed: sorted((r for r in records if r.get("epoch", 0) <= epochs),
                                key=lambda r: r["epoch"])
                   for seed, records in by_seed.items() if is_finished(records, epochs)}
            for name, by_seed in runs.items()}


def reported_runs(runs_dir: Path, names: Sequence[str], seeds: Sequence[int]):
    """(names, seeds) of the comparison's report: those asked for plus every variant / peer and
    seed that has a workdir in `runs_dir` (in the order of VARIANTS, the peer last)."""
    def on_disk(name):
        folder = runs_dir / name
        seeds = [p.name.removeprefix("seed") for p in folder.glob("seed*") if p.is_dir()]
        return sorted(int(seed) for seed in seeds if seed.isdigit())

    found = {name: on_disk(name) for name in (*VARIANTS, PEER)}
    wanted = set(names) | {name for name, found_seeds in found.items() if found_seeds}
    ordered = [name for name in (*VARIANTS, PEER) if name in wanted]
    all_seeds = sorted(set(seeds).union(*(found[name] for name in ordered)))
    return ordered, all_seeds


def run_settings(runs_dir: Path, names: Sequence[str], seeds: Sequence[int]):
    """(machines (machine.jsonl), protocol (N and the in-batch batches), peer settings) from
    the runs' workdirs."""
    machines, protocol, peer = [], {}, None
    for name in names:
        for seed in seeds:
            machines += run_records(runs_dir, name, seed, "machine.jsonl")
            path = run_dir(runs_dir, name, seed) / "config.json"
            if not path.is_file():
                continue
            saved = json.loads(path.read_text())
            config = saved["config"]
            protocol.setdefault("train_images", ((saved.get("dataset") or {}).get("train")
                                                 or {}).get("images"))
            if name != "npairs":
                protocol.setdefault("batch_images", config["train"]["inbatch_images"]
                                    or 3 * config["train"]["batch_size"])
                protocol.setdefault("samples_per_class", config["train"]["samples_per_class"])
            if name == PEER:
                peer = peer or config.get("peer")
    return machines, protocol, peer


def machine_info() -> dict:
    """CPU model, cores, accelerator and package versions of this machine, and the date."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    for package in ("jax", "jaxlib", "torch", "pytorch-metric-learning"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    # In a child process: initialising a GPU backend here would hold device memory that the
    # runs need.
    probe = ("import jax; d = jax.devices(); "
             "print(f'{jax.default_backend()} × {len(d)} ({d[0].device_kind})')")
    try:
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                               timeout=120, check=True)
        info["accelerator"] = child.stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError) as error:
        info["accelerator"] = f"unknown ({type(error).__name__})"
    return info


def _append_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps(value, sort_keys=True) + "\n")


def record_invocation(module: str, argv, runs_dir: Path, *, report_only: bool
                      ) -> tuple[str, Path]:
    """(this invocation of `python -m module` as a shell line, RUNS/commands.jsonl); a training
    invocation is appended to that history with its date, so the report can list every command
    that trained."""
    invocation = shlex.join(["python", "-m", module,
                             *(sys.argv[1:] if argv is None else argv)])
    history = runs_dir / "commands.jsonl"
    if not report_only:
        _append_json(history, {"command": invocation,
                               "date": datetime.datetime.now().isoformat(timespec="seconds")})
    return invocation, history


def distinct_commands(history: Path, current: str) -> list[str]:
    """The commands that trained the runs (commands.jsonl, first occurrence order), or the
    current one where there is no history."""
    commands = [record["command"] for record in read_records(history)]
    return list(dict.fromkeys(commands or [current]))


def parse_shard(text: str | None) -> tuple[int, int]:
    """"I/N" -> (I, N), 0 <= I < N: this invocation runs every N-th job from the I-th (two
    invocations pinned to one core each run two jobs at a time); None -> (0, 1). ValueError
    for anything else."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected I/N, e.g. 0/2, got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard: expected 0 <= I < N, got {text!r}")
    return index, count


class _ChildSignals:
    """Forwards SIGTERM to the running child (which checkpoints and exits with 143) and
    remembers it, so the loop stops after that child instead of starting the next run."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.stopping = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGTERM, self._previous)
        return False


def run_all(jobs: Sequence[tuple[str, int]], *, runs_dir: Path, epochs: int,
            command_for: Callable[[str, int, Path], list[str]]) -> tuple[list[str], bool]:
    """Runs every unfinished (name, seed) in order, each as `command_for(name, seed, workdir)`
    (the workdir is RUNS/name/seedS; finished: the test metrics of epoch `epochs`); returns
    (the failed ones as text, whether SIGTERM stopped the loop). Each launch appends this
    machine's description to the workdir's machine.jsonl."""
    failures, machine = [], None
    with _ChildSignals() as signals:
        for number, (name, seed) in enumerate(jobs, 1):
            workdir = run_dir(runs_dir, name, seed)
            label = f"[{number}/{len(jobs)}] {name} seed {seed}"
            records = read_records(workdir / "metrics.jsonl")
            if is_finished(records, epochs):
                print(f"{label}: finished, skipped", flush=True)
                continue
            if signals.stopping:
                break
            command = command_for(name, seed, workdir)
            done = max((r.get("epoch", 0) for r in records), default=0)
            print(f"{label}: {'resuming after epoch ' + str(done) if done else 'starting'} "
                  f"(log: {workdir / 'run.log'})", flush=True)
            machine = machine or machine_info()
            _append_json(workdir / "machine.jsonl", {**machine, "command": shlex.join(command)})
            with open(workdir / "run.log", "a") as log:
                signals.child = subprocess.Popen(command, cwd=REPO, stdout=log,
                                                 stderr=subprocess.STDOUT)
                status = signals.child.wait()
                signals.child = None
            if signals.stopping:
                print(f"{label}: stopped by SIGTERM (exit status {status}); rerun the same "
                      "command to resume", flush=True)
            elif status:
                failures.append(f"{name} seed {seed}: exit status {status} "
                                f"(see {workdir / 'run.log'})")
                print(f"{label}: FAILED, exit status {status}", flush=True)
            else:
                print(f"{label}: done", flush=True)
            if signals.stopping:
                break
    return failures, signals.stopping


def exit_for(failures: Sequence[str], stopped: bool) -> None:
    """Exit status 1 naming the failed runs, 143 after SIGTERM, else return."""
    if failures:
        print("failed runs (rerun the same command to retry):\n  " + "\n  ".join(failures),
              file=sys.stderr)
        sys.exit(1)
    if stopped:
        sys.exit(128 + signal.SIGTERM)
