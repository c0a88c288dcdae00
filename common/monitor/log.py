"""densenetsmi.txt: comment lines naming the run's GPUs and every column with its unit, then CSV, one row per
sample and GPU (columns: common/artifacts.py). Also the console lines, and the messages that go to both."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from common.artifacts import GPU_LOG_COLUMNS
from common.monitor.devices import GpuInfo, Reading
from common.monitor.summary import Statistics, ordered_phases


class GpuLog:
    """The log file, written as the samples come; rows are flushed one sample at a time."""

    def __init__(self, path: Path, console_every: int, print_fn: Callable[[str], None]) -> None:
        self.path = path
        self.file: TextIO | None = None  # open between open() and close()
        self._writer: Any = None
        self._t0_s = time.monotonic()  # what elapsed_s counts from: reset by write_header()
        self._console_every = console_every  # 0: no console lines
        self._print = print_fn

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w", encoding="utf-8", newline="")
        self.file.write(f"# {self.path.name}: GPU samples from NVML (nvidia-ml-py), pid {os.getpid()}\n")

    def announce(self, message: str) -> None:
        """Print `message` and write it into the file as a comment, where the file can still be written."""
        self._print(message)
        if self.file is not None:
            try:
                self.file.write(f"# {message}\n")
                self.file.flush()
            except OSError:  # a full disk: the printed line must do
                pass

    def write_off(self, reason: str) -> None:
        """Monitoring did not start: the reason, then the column names so that readers find an empty table."""
        self.announce(f"GPU monitoring off: {reason}")
        assert self.file is not None
        self.file.write(",".join(name for name, _ in GPU_LOG_COLUMNS) + "\n")
        self.file.flush()

    def write_header(self, interval_s: float, gpus: Sequence[GpuInfo]) -> None:
        assert self.file is not None
        f = self.file
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        f.write(f"# started {started}, one row per sample and GPU, every {interval_s:g} s\n")
        f.write(f"# CUDA_VISIBLE_DEVICES={'<unset>' if visible is None else visible}\n")
        for g in gpus:
            f.write(f"# {g.label} = NVML index {g.nvml_index}, {g.name}, {g.uuid}, {g.memory_total_mib:,.0f} MiB\n")
        f.write("# columns:\n")
        width = max(len(name) for name, _ in GPU_LOG_COLUMNS)
        for name, meaning in GPU_LOG_COLUMNS:
            f.write(f"#   {name:<{width}}  {meaning}\n")
        f.write("# lines starting with '#' are comments; the others are CSV with a header row\n")
        self._writer = csv.writer(f, lineterminator="\n")
        self._writer.writerow([name for name, _ in GPU_LOG_COLUMNS])
        f.flush()
        self._t0_s = time.monotonic()

    def stamp(self) -> tuple[str, float]:
        """The `time` and `elapsed_s` of a sample taken now."""
        elapsed_s = time.monotonic() - self._t0_s
        return datetime.now().astimezone().isoformat(timespec="milliseconds"), elapsed_s

    def write_sample(
        self, time_iso: str, elapsed_s: float, phase: str, gpus: Sequence[GpuInfo], readings: Sequence[Reading]
    ) -> None:
        assert self.file is not None
        for g, r in zip(gpus, readings):
            self._writer.writerow(
                [
                    time_iso,
                    f"{elapsed_s:.3f}",
                    phase,
                    g.index,
                    g.nvml_index,
                    g.name,
                    f"{r.used_mib:.1f}",
                    f"{r.total_mib:.1f}",
                    f"{100 * r.used_mib / r.total_mib:.1f}",
                    r.gpu_util_pct,
                    r.memctl_util_pct,
                    "" if r.power_w is None else f"{r.power_w:.1f}",
                    "" if r.proc_used_mib is None else f"{r.proc_used_mib:.1f}",
                ]
            )
        self.file.flush()

    def print_console(
        self, sample_no: int, phase: str, elapsed_s: float, gpus: Sequence[GpuInfo], readings: Sequence[Reading]
    ) -> None:
        """A line for sample 1 and every `console_every` samples after it."""
        if self._console_every <= 0 or (sample_no - 1) % self._console_every:
            return
        parts = [
            f"{g.label} {r.used_mib:,.0f} / {r.total_mib:,.0f} MiB ({100 * r.used_mib / r.total_mib:.0f}%) "
            f"util {r.gpu_util_pct}%"
            for g, r in zip(gpus, readings)
        ]
        self._print(f"[gpu {phase} {elapsed_s:.0f}s] " + "  |  ".join(parts))

    def close(self, stats: Statistics | None) -> None:
        """Write the footer from `stats` (None: no footer) and close the file; a no-op once closed."""
        if self.file is None:
            return
        if stats is not None:
            self._write_footer(stats)
        self.file.close()
        self.file = None

    def _write_footer(self, stats: Statistics) -> None:
        assert self.file is not None
        ended = datetime.now().astimezone().isoformat(timespec="seconds")
        elapsed_s = time.monotonic() - self._t0_s
        n = stats.samples
        cost = f", sampler {1000 * stats.cost_s_sum / n:.2f} ms/sample" if n else ""
        self.file.write(f"# ended {ended} after {elapsed_s:.1f} s, {n} samples{cost}\n")
        for phase in ordered_phases(stats.phases):
            for label, gpu_stats in stats.phases[phase].items():
                s = gpu_stats.as_dict()
                self.file.write(
                    f"# {phase} {label}: peak {s['peak_used_mib']:,.0f} MiB, mean {s['mean_used_mib']:,.0f} MiB, "
                    f"{s['samples']} samples\n"
                )
