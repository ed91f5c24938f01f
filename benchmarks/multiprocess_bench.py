"""The cost of several processes on one machine: the per-phase seconds of the same Omniglot run
as 1 process with 1 device, 1 process with 2 devices, and 2 processes (jax.distributed on
127.0.0.1, one CPU device each, Gloo collectives, shards through the filesystem).

    python -m benchmarks.multiprocess_bench --data-dir OMNIGLOT_DIR
    python -m benchmarks.multiprocess_bench --data-dir DIR --epochs 3 --set train.eval_every=3

Each setting is `python -m experiments.omniglot --config=experiments/configs/omniglot.py
--workdir=RUNS/SETTING --config.train.epochs=E ...` (plus XLA_FLAGS / the process flags); the
table gives, per setting, the mean seconds per epoch of each phase (embed / index / mine / train
/ eval; embed includes writing and reading the shards) over the mining epochs, the random
epochs' train seconds, and whether the final metrics equal those of 1 process with 2 devices.
Run it on an otherwise idle machine: it reports wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("1 process, 1 device", "1 process, 2 devices", "2 processes")
PHASES = ("embed", "index", "mine", "train", "eval")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a coordinator)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def commands(setting: str, workdir: Path, flags: Sequence[str]) -> list[tuple[list, dict]]:
    """The (argv, extra environment) of each process of `setting`."""
    base = [sys.executable, "-m", "experiments.omniglot",
            "--config=experiments/configs/omniglot.py", f"--workdir={workdir}", *flags]
    if setting == SETTINGS[0]:
        return [(base, {})]
    if setting == SETTINGS[1]:
        return [(base, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})]
    port = free_port()
    return [([*base, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={index}"], {}) for index in range(2)]


def phase_seconds(records: Sequence[Mapping]) -> dict[str, float]:
    """Mean seconds per mining epoch of each phase, and the random epochs' mean train seconds."""
    mining = [r for r in records if r.get("mining")]
    result = {phase: (sum(r["seconds"][phase] for r in mining) / len(mining) if mining
                      else float("nan")) for phase in PHASES}
    random = [r for r in records if not r.get("mining")]
    result["random epoch train"] = (sum(r["seconds"]["train"] for r in random) / len(random)
                                    if random else float("nan"))
    return result


def table(results: Mapping[str, tuple[dict, dict]], reference: str = SETTINGS[1]) -> str:
    header = ["setting", *(f"{p} s" for p in PHASES), "random epoch train s",
              "final metrics = 1 process, 2 devices"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    expected = results.get(reference, ({}, {}))[1]
    for setting, (seconds, final) in results.items():
        cells = [f"{seconds[p]:.2f}" for p in (*PHASES, "random epoch train")]
        same = "yes" if final and final == expected else "no"
        lines.append("| " + " | ".join([setting, *cells, same]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--runs-dir", default=str(REPO / "benchmarks" / "runs" / "multiprocess"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    flags = [f"--config.data.dir={Path(args.data_dir).absolute()}",
             f"--config.train.epochs={args.epochs}", "--config.train.progress=False",
             *(f"--config.{item}" for item in args.set)]
    results = {}
    for setting in SETTINGS:
        workdir = Path(args.runs_dir).absolute() / setting.replace(" ", "_").replace(",", "")
        if (workdir / "metrics.jsonl").exists():
            sys.exit(f"{workdir}: exists; remove it (the benchmark times fresh runs)")
        runs = commands(setting, workdir, flags)
        print(f"{setting}: " + " & ".join(shlex.join(argv) for argv, _ in runs), flush=True)
        processes = [subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env},
                                      stdout=subprocess.PIPE, text=True) for argv, env in runs]
        outputs = [process.communicate()[0] for process in processes]
        if any(process.returncode for process in processes):
            sys.exit(f"{setting}: a process failed (exit {[p.returncode for p in processes]})")
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().split(
            "\n") if line]
        results[setting] = (phase_seconds(records),
                            json.loads(outputs[0].strip().splitlines()[-1]))
    print(table(results))


if __name__ == "__main__":
    main()
