"""The entry point of baseline.py and modified.py: the command line is read before torch and transformers are
imported (seconds), so `--help` and a mistyped option answer at once; whatever stops the run afterwards (Ctrl-C at
any moment, an operating-system error, a diverging loss) ends in one line, not a traceback.
"""

from __future__ import annotations

import sys


def _interrupted_in_one_line(kind, value, traceback):
    """Ctrl-C while the modules below are still importing, before main() can catch it: one line, not a traceback."""
    if issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, traceback)


if sys.excepthook is sys.__excepthook__:  # first, so that it covers the imports; a debugger's hook stays
    sys.excepthook = _interrupted_in_one_line

import errno
import os
import signal

from common.config import ConfigError, Profile, parse_arguments

# What to do about the operating-system errors a user can meet, by errno.
OS_ERROR_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, or pass --output-dir on a larger disk",
    errno.EDQUOT: "the disk quota is used up: free some space, or pass --output-dir on another disk",
    errno.EROFS: "the file system is read-only: pass --output-dir on a writable one",
    errno.EACCES: "no permission: pass --output-dir where you may write, or fix the permissions",
    errno.EPERM: "not permitted: pass --output-dir where you may write, or fix the permissions",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "a directory where a file was expected",
}


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


class _DeferredInterrupt:
    """SIGINT noted, not raised, while torch and transformers import (seconds): raised inside their C++ start-up, a
    KeyboardInterrupt aborts the process (pybind11's terminate) or breaks numpy's import. Raised once they are in,
    or at once on a second Ctrl-C."""

    def __init__(self) -> None:
        self.received = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.received:
            raise KeyboardInterrupt()
        self.received = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)
        if self.received and exc[0] is None:
            raise KeyboardInterrupt()


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # as common.distributed says it, without importing torch


def describe_os_error(err: OSError) -> str:
    """`path: No space left on device (what to do)`: the one line an operating-system error becomes."""
    where = f"{err.filename}: " if err.filename else ""
    advice = OS_ERROR_ADVICE.get(err.errno)
    return f"{where}{err.strerror or err}" + (f" ({advice})" if advice else "")


def out_of_memory_advice(err: Exception) -> str:
    """One line for a run that ran out of GPU memory despite the memory plan (common/memory_plan.py)."""
    first = str(err).split(". ")[0]
    return (f"out of GPU memory ({first}): the memory plan (its line at the start of this log) estimated too little "
            "for this card; run again with --gpu-memory-gib 2 below what it planned for, or with more "
            "--gradient-accumulation-steps, --activation-budget-gib 0 and --eval-batch-size 16")


def main(profile: Profile, argv: list[str] | None = None) -> int:
    """Parse, then import and run the experiment (common/run.py); returns the process exit code."""
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C must stop the run cleanly even when a parent shell started it with SIGINT ignored (`cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = False
    try:
        try:
            parsed = parse_arguments(argv, profile=profile)
        except ConfigError as err:
            if _is_main_process():
                print(f"error: {err}", file=sys.stderr)
            return 2
        with _DeferredInterrupt():  # Ctrl-C now stops the run once the imports are done
            import torch

            from common.divergence import TrainingDiverged  # transformers and torch: seconds
            from common.run import run

        started = True
        try:
            return run(profile, argv, parsed)
        except TrainingDiverged as err:  # metrics.json already says "failed"
            if _is_main_process():
                print(f"\nerror: {err}", file=sys.stderr)  # below the progress bar's unfinished line
            return 1
        except torch.OutOfMemoryError as err:  # metrics.json already says "failed"
            print(f"\nerror: {out_of_memory_advice(err)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("\ninterrupted" + ("" if started else " while starting: nothing was written"), file=sys.stderr)
        return 130
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return 1
