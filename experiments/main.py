"""The shared command line of experiments/cub.py, cars196.py and omniglot.py.

    python -m experiments.omniglot --config=experiments/configs/omniglot.py[:VARIANT,...] \
        --workdir=DIR [--config.section.field=VALUE ...]

`--config` is an ml_collections config file whose `get_config(arg)` takes the text after the
colon (variants); `--config.a.b=v` overrides a field. Rerunning the same command resumes from
the workdir's latest checkpoint. A bad flag or setting ends with one line `error: ...` naming
the flag, exit status 2 (no traceback); SIGTERM saves a checkpoint and exits with status 143,
Ctrl-C (SIGINT) the same with status 130.

Several processes (README "Several hosts"): `--coordinator_address=HOST:PORT --num_processes=P
--process_id=I` on every process, or `--distributed` where JAX finds them itself; all of them
with the same `--workdir` on a shared filesystem. `--notune_malloc` leaves glibc's allocator
alone (smine_jax.hostmem).
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import sys
import traceback
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from smine_jax import hostmem

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config), variants after a colon.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
# Several processes (jax.distributed): the three flags together, or --distributed alone where
# JAX detects them itself (Cloud TPU, SLURM, Open MPI, Kubernetes).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (several processes).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "jax.distributed.initialize() with the cluster's own settings "
    "(Cloud TPU, SLURM, Open MPI); implied by --coordinator_address.")
_TUNE_MALLOC = flags.DEFINE_bool(
    "tune_malloc", True, "One malloc arena, no mmap / trim of large blocks (smine_jax.hostmem: "
    "~20 percent faster train steps with XLA on CPU; freed memory stays with the process).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 60, "Seconds without a heartbeat after which the run counts a process "
    "as lost and every other process stops (several processes).")

_SECTIONS = ("data.", "model.", "train.", "optimizer.", "loss.", "mining.", "controller.",
             "subset.")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + 2  # Ctrl-C (SIGINT); a checkpointed stop exits 128 + its signal


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _flag_message(message: str) -> str:
    """Names the flag: 'data.dir=…' and 'config.data.dir=…' become '--config.data.dir=…'."""
    message = _one_line(message)
    if message.startswith("config."):
        return "--" + message
    if message.startswith(_SECTIONS):
        return "--config." + message
    return message


def _usage_error(message: str) -> None:
    _fail(_flag_message(message), EXIT_USAGE)


def _flag_error_text(error: Exception) -> str:
    """The useful part of a flag error: config_flags wraps an exception raised by get_config
    (an unknown variant) in a message that embeds the traceback; keep its last exception."""
    text = str(error)
    if "Traceback" in text:
        text = text.rsplit("Error: ", 1)[-1]
    return text


def _unknown_field_text(error: Exception, argv: list[str]) -> str:
    """ml_collections reports an override of a field that does not exist as an AttributeError /
    KeyError holding the field name (quoted, escaped once or twice) and, for a near miss, a
    hint 'Did you mean "epochs" instead of "epochz"?': name the flag and keep the hint."""
    text = str(error).replace("\\", "")
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    names = [hint.group(2)] if hint else re.findall(r"'([A-Za-z0-9_.]+)'", text)
    suggestion = f' (did you mean "{hint.group(1)}"?)' if hint else ""
    for arg in argv[1:]:
        flag = arg.split("=", 1)[0]
        if names and flag.startswith("--config.") and names[-1] in flag.split("."):
            return f"{flag}: no such field in the config{suggestion}"
    return f"--config: no such field {names[-1] if names else _one_line(str(error))}{suggestion}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors instead of usage text or tracebacks."""
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.keys()  # config files load lazily: surface their errors here
        return remaining
    except OSError as error:
        reason = str(error).strip().splitlines()[-1].strip()
        _usage_error(f"--config: cannot load the config file ({reason})")
    except (AttributeError, KeyError) as error:
        _usage_error(_unknown_field_text(error, argv))
    except (flags.Error, ValueError, TypeError) as error:
        _usage_error(_flag_error_text(error))
    raise AssertionError("unreachable")


class _QuietLibraries:
    """Drops the INFO chatter of orbax (tens of lines per checkpoint) from the absl log,
    orbax's own tracebacks of a write that found the disk full (the run says so in one line:
    train.DiskFull), and jax's note that no TPU is there (unless JAX_PLATFORMS asks for one)."""

    def filter(self, record) -> bool:
        if "xla_bridge" in record.pathname and "Unable to initialize backend 'tpu'" in str(
                record.msg) and "tpu" not in os.environ.get("JAX_PLATFORMS", ""):
            return False  # every start on a machine without a TPU says so; not an error
        if "orbax" not in record.pathname:
            return True
        if record.levelno < std_logging.WARNING:
            return False
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return "No space left on device" not in text and "Finalize thread" not in text


def _check_workdir(workdir: str) -> None:
    """One usage error naming --workdir unless it is (or can become) a folder this process can
    write in: not a file, not under one, not on a read-only file system."""
    path = Path(workdir)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            where = "is" if folder == path else f"lies under {folder}, which is"
            _usage_error(f"--workdir={workdir}: {where} a file; expected a folder")
        if folder.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        _usage_error(f"--workdir={workdir}: cannot write there ({error.strerror or error}); "
                     "choose a writable folder")


def _several_processes() -> bool:
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def _fail(message: str, status: int) -> None:
    """One line `error: ...` and exit `status`. With several processes the exit skips JAX's
    shutdown barrier, which would wait (then abort with a C++ trace) for the processes that
    are still running; they see this one gone at their next collective and stop too."""
    print(f"error: {_one_line(message)}", file=sys.stderr)
    if _several_processes():
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _start_processes() -> None:
    """jax.distributed.initialize() from the flags, before anything touches a device: with
    --coordinator_address all three flags are required; --distributed alone lets JAX find them
    (Cloud TPU, SLURM, Open MPI); neither: one process."""
    given = {"--coordinator_address": _COORDINATOR.value, "--num_processes": _NUM_PROCESSES.value,
             "--process_id": _PROCESS_ID.value}
    if not any(value is not None for value in given.values()) and not _DISTRIBUTED.value:
        return
    missing = [name for name, value in given.items() if value is None]
    if missing and len(missing) < len(given):
        present = ", ".join(name for name in given if name not in missing)
        _usage_error(f"{missing[0]}: required with {present} (set all three, or --distributed "
                     "alone on a cluster JAX detects)")
    if _NUM_PROCESSES.value is not None and _NUM_PROCESSES.value < 1:
        _usage_error(f"--num_processes={_NUM_PROCESSES.value}: expected an integer >= 1")
    if _PROCESS_ID.value is not None and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
        _usage_error(f"--process_id={_PROCESS_ID.value}: expected 0 <= id < --num_processes="
                     f"{_NUM_PROCESSES.value}")
    import jax

    try:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   heartbeat_timeout_seconds=_HEARTBEAT.value)
    except (RuntimeError, ValueError) as error:
        _fail(f"jax.distributed.initialize failed: {error}", 1)


def _main(dataset: str, argv: list[str]) -> None:
    del argv
    if _TUNE_MALLOC.value:  # before jax starts its threads and allocates anything
        hostmem.tune_malloc()
    _start_processes()
    from smine_jax import data, train

    logging.get_absl_handler().addFilter(_QuietLibraries())

    config = _CONFIG.value
    if config is None:
        _usage_error("--config: required (e.g. --config=experiments/configs/omniglot.py)")
    if not _WORKDIR.value:
        _usage_error("--workdir: required (checkpoints, logs and metrics go there)")
    if config.data.name != dataset:
        _usage_error(f"--config: experiments.{dataset} needs a {dataset} config, got "
                     f"data.name={config.data.name!r}")
    _check_workdir(_WORKDIR.value)
    try:
        results = train.train_and_evaluate(config, _WORKDIR.value)
    except ValueError as error:
        _usage_error(str(error))
    except (data.ImageReadError, data.DownloadError, train.Diverged, train.CheckpointError,
            train.DiskFull, train.SharedWorkdirError) as error:
        _fail(str(error), 1)
    except train.Preempted as error:  # every process stops at the same step: a clean exit
        logging.warning("%s", error)
        sys.exit(128 + error.signum)
    except KeyboardInterrupt:  # Ctrl-C before the training loop: nothing to save yet
        _fail("interrupted (Ctrl-C) before training started; nothing was saved, rerun the "
              "same command", EXIT_INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - several processes: never wait at the exit
        if not _several_processes():
            raise
        import jax

        if isinstance(error, jax.errors.JaxRuntimeError):
            _fail("another process of the run stopped or cannot be reached (JAX: "
                  f"{str(error).splitlines()[0][:200]}); start every process again with the "
                  "same command: the run resumes from its last checkpoint", 1)
        traceback.print_exc()
        _fail(f"{type(error).__name__}: {error}", 1)
    print(json.dumps({"final_test_metrics": results}, sort_keys=True))


def run(dataset: str, argv: list[str] | None = None) -> None:
    """The main of `python -m experiments.<dataset>`; `--config` defaults to its config file."""
    argv = list(argv or sys.argv)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        default = os.path.join(os.path.dirname(__file__), "configs", f"{dataset}.py")
        argv.insert(1, f"--config={default}")
    app.run(lambda args: _main(dataset, args), argv=argv, flags_parser=_parse_flags)
