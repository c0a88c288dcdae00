"""The optional `nvidia-smi pmon` subprocess (per-process detail into pmon.txt), and stopping it for sure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from common.monitor.devices import GpuInfo

PMON_STOP_TIMEOUT_S = 5.0  # SIGTERM, then this long, then SIGKILL


def default_command(interval_s: float, gpus: Sequence[GpuInfo]) -> list[str]:
    delay_s = str(max(1, min(10, round(interval_s))))  # pmon takes whole seconds, 1..10
    cmd = ["nvidia-smi", "pmon", "-d", delay_s, "-s", "um", "-o", "DT"]
    if len(gpus) == 1:
        cmd += ["-i", str(gpus[0].nvml_index)]
    return cmd


class Pmon:
    """Runs `cmd` (None: nvidia-smi pmon for the monitored GPUs) with its output in a file, until stop()."""

    def __init__(self, cmd: Sequence[str] | None) -> None:
        self.pid: int | None = None  # kept after stop()
        self._cmd = list(cmd) if cmd is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._file: TextIO | None = None

    def start(self, path: Path, interval_s: float, gpus: Sequence[GpuInfo], print_fn: Callable[[str], None]) -> None:
        """Start the command writing into `path`; if it cannot start, say so and carry on without it."""
        cmd = self._cmd if self._cmd is not None else default_command(interval_s, gpus)
        f = path.open("w", encoding="utf-8")
        f.write(
            f"# {' '.join(cmd)}\n# pmon's 'mem' column is the % of time the memory controller was busy, "
            "not memory in use; 'fb' is the process's memory, MiB\n"
        )
        f.flush()  # the child appends to the same file descriptor
        try:
            # Own session: Ctrl-C in the terminal reaches only us, and we can kill its whole group.
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as e:
            f.write(f"# did not start: {e}\n")
            f.close()
            print_fn(f"nvidia-smi pmon off: {e}")
            return
        self._proc, self._file, self.pid = proc, f, proc.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after PMON_STOP_TIMEOUT_S; closes the file. Idempotent."""
        proc, f = self._proc, self._file
        self._proc = self._file = None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=PMON_STOP_TIMEOUT_S)
        finally:
            # Also reaches children the command left behind; a no-op once the group is empty.
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=PMON_STOP_TIMEOUT_S)
            if f is not None:
                f.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
