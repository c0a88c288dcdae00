"""GPU memory monitor: NVML sampled in a background thread into `densenetsmi.txt`.

Memory *in use* comes from nvmlDeviceGetMemoryInfo. `nvidia-smi pmon`'s `mem` column, which the
seed read as memory, is the share of time the memory controller was busy; here it is the
`memctl_util_pct` column, next to the real thing. NVML's used memory is the whole device: it is
larger than torch's `max_memory_reserved` by each process's CUDA context (driver state and the
libraries' kernels), other processes and what the driver keeps. See docs/monitoring.md for how to
read the numbers.

GpuMonitor puts together the parts: devices.py (NVML, the visible GPUs, one reading), sampling.py
(the thread), log.py (the file and console lines), pmon.py (`nvidia-smi pmon`), summary.py
(per-phase statistics, the end-of-run lines beside torch's peaks, which common/memory.py measures).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from common.artifacts import MONITOR_PHASES, PMON_LOG
from common.monitor.devices import MIB, GpuInfo, MonitorOff, NvmlGpus, map_visible_devices
from common.monitor.log import GpuLog
from common.monitor.pmon import Pmon
from common.monitor.sampling import Sampler
from common.monitor.summary import format_summary

__all__ = ["MIB", "GpuInfo", "GpuMonitor", "format_summary", "map_visible_devices"]


class GpuMonitor:
    """Samples NVML every `interval_s` seconds in a daemon thread while the `with` block runs.

    Writes `log_path` (comment lines, then CSV), prints a console line every `console_every`
    samples (0: never), and keeps per-phase peaks and means for `summary()`. Never raises
    because of the GPU or NVML: it turns itself off with a one-line reason instead.
    Under torchrun only LOCAL_RANK 0 (or a process without LOCAL_RANK) monitors and writes.
    Phases are the run's MONITOR_PHASES (common/artifacts.py); `phases=None` accepts any word.
    """

    def __init__(
        self,
        log_path: Path,
        interval_s: float = 1.0,
        console_every: int = 10,
        pmon: bool = False,
        nvml_module: Any = None,
        print_fn: Callable[[str], None] = print,
        phase: str = "train",
        pmon_cmd: Sequence[str] | None = None,
        phases: Sequence[str] | None = MONITOR_PHASES,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._phases = None if phases is None else tuple(phases)  # None: any word (the benchmark's row names)
        self._check_phase(phase)
        self.enabled = False  # NVML started and the log has its header
        self.disabled_reason: str | None = None
        self._print = print_fn
        self._nvml = NvmlGpus(nvml_module)
        self._log = GpuLog(Path(log_path), console_every, print_fn)
        self._sampler = Sampler(self._nvml, self._log, float(interval_s), phase)
        self._pmon = Pmon(pmon_cmd) if pmon else None
        self._state = "new"  # -> "entered" -> "closed"

    @property
    def log_path(self) -> Path:
        return self._log.path

    @property
    def interval_s(self) -> float:
        return self._sampler.interval_s

    @property
    def error(self) -> str | None:
        """An NVML error that stopped sampling mid-run."""
        return self._sampler.error

    @property
    def gpus(self) -> list[GpuInfo]:
        return self._nvml.gpus

    @property
    def pmon_pid(self) -> int | None:
        return None if self._pmon is None else self._pmon.pid

    # The tests look at the sampling thread and the open log file (None once closed).
    _thread = property(lambda self: self._sampler.thread)
    _file = property(lambda self: self._log.file)

    def __enter__(self) -> GpuMonitor:  # noqa: PYI034 - typing.Self needs Python 3.11
        if self._state != "new":
            raise RuntimeError("a GpuMonitor can be entered only once")
        self._state = "entered"
        local_rank = os.environ.get("LOCAL_RANK", "").strip()
        if local_rank not in ("", "0"):
            # Quietly: local rank 0 prints and writes for the whole node.
            self.disabled_reason = (
                f"LOCAL_RANK={local_rank}: the process with LOCAL_RANK 0 monitors this node's GPUs"
            )
            return self
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def phase(self) -> str:
        """The label of the next sample."""
        return self._sampler.phase

    def set_phase(self, phase: str) -> None:
        """Label the following samples (one of `phases`); at a change, take the ending phase's last sample first, so
        that a phase shorter than `interval_s` still has a reading, and the new phase's start with its own memory."""
        self._check_phase(phase)
        if phase != self._sampler.phase:
            self._sampler.change_phase(phase, sample=self.enabled)

    def sample_now(self) -> None:
        """Take one sample at once, outside the schedule (e.g. at the end of a phase)."""
        if self.enabled:
            self._sampler.sample()

    def close(self) -> None:
        """Stop the thread and pmon, flush and close the log. Idempotent; `__exit__` calls it."""
        if self._state == "closed":
            return
        self._state = "closed"
        try:
            if self.enabled:
                self._sampler.sample()  # the last phase's closing reading, as at every phase change
            self._sampler.stop()
        finally:
            try:
                if self._pmon is not None:
                    self._pmon.stop()
            finally:
                self._close_log_and_nvml()

    def summary(self) -> dict[str, Any]:
        stats = self._sampler.statistics()
        return {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "error": self.error,
            "log_path": str(self.log_path),
            "interval_s": self.interval_s,
            "samples": stats["samples"],
            "gpus": [g.as_dict() for g in self.gpus],
            "phases": stats["phases"],
            "sampler_cost_ms_mean": stats["sampler_cost_ms_mean"],
            "sampler_cost_ms_max": stats["sampler_cost_ms_max"],
        }

    def _start(self) -> None:
        self._log.open()
        try:
            self._nvml.start(self._print)
        except MonitorOff as off:
            self.disabled_reason = str(off)
            self._log.write_off(self.disabled_reason)
            self._nvml.shutdown()
            return
        self.enabled = True
        self._sampler.start()
        if self._pmon is not None and self.error is None:
            self._pmon.start(self.log_path.parent / PMON_LOG, self.interval_s, self.gpus, self._print)

    def _close_log_and_nvml(self) -> None:
        thread_alive = self._sampler.running
        if not self._sampler.close_log(footer=self.enabled):
            self._print("GPU monitor: sampler stuck in an NVML call; log left open")
            return
        if not thread_alive:
            self._nvml.shutdown()

    def _check_phase(self, phase: str) -> None:
        if self._phases is not None and phase not in self._phases:
            raise ValueError(f"phase must be one of {', '.join(self._phases)}; got {phase!r}")
        if not phase or any(c in phase for c in ",\n\r"):  # it is a CSV field
            raise ValueError(f"phase must be a non-empty word, got {phase!r}")
