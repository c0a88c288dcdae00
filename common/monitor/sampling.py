"""Taking samples: the first at start, then one every `interval_s` in a daemon thread, and any asked for; each
is read from NVML, written to the log and counted in the statistics. An error stops sampling, never the run."""

from __future__ import annotations

import threading
import time
from typing import Any

from common.monitor.devices import NvmlGpus
from common.monitor.log import GpuLog
from common.monitor.summary import Statistics


class Sampler:
    def __init__(self, nvml: NvmlGpus, log: GpuLog, interval_s: float, phase: str) -> None:
        self.interval_s = interval_s
        self.phase = phase  # the label of the next sample
        self.error: str | None = None  # what stopped sampling mid-run
        self.stats = Statistics()
        self.thread: threading.Thread | None = None
        self._nvml = nvml
        self._log = log
        self._lock = threading.Lock()  # one sample at a time; summary and close wait for it
        self._stop = threading.Event()

    def start(self) -> None:
        """Write the log's header, take the first sample, and start the thread unless that sample failed."""
        self._log.write_header(self.interval_s, self._nvml.gpus)
        # First sample synchronously: short blocks get one, and a broken NVML shows up here.
        self.sample()
        if self.error is None:
            self.thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
            self.thread.start()

    def sample(self) -> None:
        """One sample now; skipped where the thread has been stuck in an NVML call for 1 s (it holds the lock)."""
        if self._lock.acquire(timeout=1.0):
            try:
                self._sample_locked()
            finally:
                self._lock.release()

    def change_phase(self, phase: str, sample: bool) -> None:
        """With `sample`, take the ending phase's last reading now; then label the following samples `phase`. A
        phase shorter than interval_s keeps a reading of its own, and the new phase's rows start with its own memory."""
        # Bounded wait: a sampler stuck in an NVML call (holding the lock) must not stop the run at a phase change.
        locked = self._lock.acquire(timeout=1.0)
        try:
            if locked and sample:
                self._sample_locked()
            self.phase = phase  # under the lock: no sample of the old phase's can come after this
        finally:
            if locked:
                self._lock.release()

    def _sample_locked(self) -> None:
        """One sample, read, written and counted; the caller holds the lock, so rows never interleave."""
        if self._log.file is None or self.error is not None:
            return
        started_s = time.perf_counter()
        phase = self.phase
        time_iso, elapsed_s = self._log.stamp()
        try:
            readings = self._nvml.read_all()
            gpus = self._nvml.gpus
            self._log.write_sample(time_iso, elapsed_s, phase, gpus, readings)
            sample_no = self.stats.add(phase, gpus, readings)
            self._log.print_console(sample_no, phase, elapsed_s, gpus, readings)
        except Exception as e:  # noqa: BLE001 - NVML, the log's disk, anything: never take the training down
            self._fail(f"{type(e).__name__} at {elapsed_s:.1f} s: {e}")
            return
        self.stats.add_cost(time.perf_counter() - started_s)

    def _fail(self, error: str) -> None:
        """Called with the lock held: log once, stop sampling."""
        self.error = error
        self._stop.set()
        self._log.announce(f"GPU monitoring stopped: {error}")

    def _run(self) -> None:
        next_s = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_s - time.monotonic())):
            self.sample()
            if self.error is not None:
                return
            next_s += self.interval_s
            now_s = time.monotonic()
            if next_s < now_s:  # fell behind (slow NVML call): skip ahead rather than burst
                next_s = now_s + self.interval_s

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            # A hung NVML call must not hang the end of the run: the thread is a daemon.
            self.thread.join(timeout=5.0)

    @property
    def running(self) -> bool:
        """Whether the thread is alive; after stop(), True means it is stuck in an NVML call."""
        return self.thread is not None and self.thread.is_alive()

    def statistics(self) -> dict[str, Any]:
        """Statistics.as_dict(), consistent between samples."""
        # Bounded wait: a sampler stuck in an NVML call (holding the lock) must not hang the caller.
        locked = self._lock.acquire(timeout=1.0)
        try:
            return self.stats.as_dict()
        finally:
            if locked:
                self._lock.release()

    def close_log(self, footer: bool) -> bool:
        """Close the log, with the footer if `footer`; False if a stuck sample holds it (then it stays open)."""
        if not self._lock.acquire(timeout=1.0):
            return False
        try:
            self._log.close(self.stats if footer else None)
        finally:
            self._lock.release()
        return True
