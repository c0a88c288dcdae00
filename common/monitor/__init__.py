"""GPU memory monitor: NVML sampled in a background thread into `densenetsmi.txt`.

Memory *in use* comes from nvmlDeviceGetMemoryInfo. `nvidia-smi pmon`'s `mem` column, which the
seed read as memory, is the share of time the memory controller was busy; here it is the
`memctl_util_pct` column, next to the real thing. See docs/monitoring.md for how to read the numbers.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Sequence, TextIO

from common.artifacts import GPU_LOG_COLUMNS, PMON_LOG

MIB = 1024**2
PMON_STOP_TIMEOUT_S = 5.0  # SIGTERM, then this long, then SIGKILL


@dataclass(frozen=True)
class GpuInfo:
    index: int  # CUDA index in this process
    nvml_index: int
    name: str
    uuid: str
    memory_total_mib: float

    @property
    def label(self) -> str:
        return f"GPU{self.index}"


@dataclass(frozen=True)
class _Reading:
    used_mib: float
    total_mib: float
    gpu_util_pct: int
    memctl_util_pct: int
    power_w: float | None
    proc_used_mib: float | None


class _PhaseStats:
    def __init__(self) -> None:
        self.samples = 0
        self.peak_used_mib = 0.0
        self.sum_used_mib = 0.0
        self.sum_gpu_util_pct = 0.0
        self.peak_proc_used_mib: float | None = None

    def add(self, r: _Reading) -> None:
        self.samples += 1
        self.peak_used_mib = max(self.peak_used_mib, r.used_mib)
        self.sum_used_mib += r.used_mib
        self.sum_gpu_util_pct += r.gpu_util_pct
        if r.proc_used_mib is not None:
            self.peak_proc_used_mib = max(self.peak_proc_used_mib or 0.0, r.proc_used_mib)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_used_mib": round(self.peak_used_mib, 1),
            "mean_used_mib": round(self.sum_used_mib / self.samples, 1),
            "mean_gpu_util_pct": round(self.sum_gpu_util_pct / self.samples, 1),
            "peak_proc_used_mib": None if self.peak_proc_used_mib is None else round(self.peak_proc_used_mib, 1),
            "samples": self.samples,
        }


class _MonitorOff(Exception):
    """Monitoring cannot start; the message is the reason shown to the user and written to the log."""


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns bytes in old releases, str in newer ones.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def map_visible_devices(visible: str | None, uuids: Sequence[str]) -> tuple[list[int], list[str]]:
    """NVML indices of the GPUs this process sees, in CUDA order, and the MIG entries skipped.

    `visible` is CUDA_VISIBLE_DEVICES (None: unset, every GPU); `uuids` are NVML's, by NVML index.
    Entries are GPU indices or UUIDs (`GPU-...`, or a unique prefix, with or without `GPU-`).
    Raises ValueError(reason) for an entry that names no GPU, more than one, or a GPU twice.
    """
    if visible is None:
        return list(range(len(uuids))), []
    if not visible.strip():
        raise ValueError("CUDA_VISIBLE_DEVICES is empty: this process sees no GPU")
    bare_uuids = [u.lower().removeprefix("gpu-") for u in uuids]
    indices: list[int] = []
    skipped_mig: list[str] = []
    for entry in (e.strip() for e in visible.split(",")):
        where = f"CUDA_VISIBLE_DEVICES={visible!r}: entry {entry!r}"
        if not entry:
            raise ValueError(f"{where} is empty")
        if entry.upper().startswith("MIG-"):
            skipped_mig.append(entry)
            continue
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if not 0 <= index < len(uuids):
                raise ValueError(f"{where} is not a GPU index (NVML sees {len(uuids)} GPU(s): 0..{len(uuids) - 1})")
        else:
            prefix = entry.lower().removeprefix("gpu-")
            matches = [i for i, u in enumerate(bare_uuids) if prefix and u.startswith(prefix)]
            if len(matches) != 1:
                problem = "matches no GPU UUID" if not matches else f"matches {len(matches)} GPU UUIDs"
                raise ValueError(f"{where} {problem} (NVML sees: {', '.join(uuids)})")
            index = matches[0]
        if index in indices:
            raise ValueError(f"{where} names GPU {index} a second time")
        indices.append(index)
    if not indices:
        raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r} names only MIG instances; they are not monitored")
    return indices, skipped_mig


class GpuMonitor:
    """Samples NVML every `interval_s` seconds in a daemon thread while the `with` block runs.

    Writes `log_path` (comment lines, then CSV), prints a console line every `console_every`
    samples (0: never), and keeps per-phase peaks and means for `summary()`. Never raises
    because of the GPU or NVML: it turns itself off with a one-line reason instead.
    Under torchrun only LOCAL_RANK 0 (or a process without LOCAL_RANK) monitors and writes.
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
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.log_path = Path(log_path)
        self.interval_s = float(interval_s)
        self.console_every = console_every
        self.pmon = pmon
        self.pmon_cmd = list(pmon_cmd) if pmon_cmd is not None else None
        self.print_fn = print_fn
        self.enabled = False
        self.disabled_reason: str | None = None
        self.error: str | None = None  # an NVML error that stopped sampling mid-run
        self.gpus: list[GpuInfo] = []
        self.pmon_pid: int | None = None
        self._phase = ""
        self.set_phase(phase)
        self._nvml = nvml_module
        self._nvml_up = False
        self._handles: list[Any] = []
        self._has_power: list[bool] = []
        self._has_procs: list[bool] = []
        self._pid = os.getpid()
        self._file: TextIO | None = None
        self._writer: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pmon_proc: subprocess.Popen[bytes] | None = None
        self._pmon_file: TextIO | None = None
        self._t0 = time.monotonic()
        self._stats: dict[str, dict[str, _PhaseStats]] = {}
        self._samples = 0
        self._cost_s_sum = 0.0
        self._cost_s_max = 0.0
        self._entered = False
        self._closed = False

    # ---- public API -------------------------------------------------------------------------

    def __enter__(self) -> GpuMonitor:
        if self._entered:
            raise RuntimeError("a GpuMonitor can be entered only once")
        self._entered = True
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

    def set_phase(self, phase: str) -> None:
        """Label the following samples (`train`, `eval`); takes effect from the next sample."""
        if not phase or any(c in phase for c in ",\n\r"):
            raise ValueError(f"phase must be a non-empty word, got {phase!r}")
        self._phase = phase

    def sample_now(self) -> None:
        """Take one sample at once, outside the schedule (e.g. at a phase boundary)."""
        if self.enabled:
            self._sample()

    def close(self) -> None:
        """Stop the thread and pmon, flush and close the log. Idempotent; `__exit__` calls it."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            if self._thread is not None:
                # A hung NVML call must not hang the end of the run: the thread is a daemon.
                self._thread.join(timeout=5.0)
        finally:
            try:
                self._stop_pmon()
            finally:
                self._close_log_and_nvml()

    def summary(self) -> dict[str, Any]:
        # Bounded wait: a sampler stuck in an NVML call (holding the lock) must not hang the caller.
        locked = self._lock.acquire(timeout=1.0)
        try:
            phases = {
                phase: {label: stats.as_dict() for label, stats in by_gpu.items()}
                for phase, by_gpu in self._stats.items()
            }
            samples, cost_sum, cost_max = self._samples, self._cost_s_sum, self._cost_s_max
        finally:
            if locked:
                self._lock.release()
        return {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "error": self.error,
            "log_path": str(self.log_path),
            "interval_s": self.interval_s,
            "samples": samples,
            "gpus": [
                {
                    "label": g.label,
                    "index": g.index,
                    "nvml_index": g.nvml_index,
                    "name": g.name,
                    "uuid": g.uuid,
                    "memory_total_mib": g.memory_total_mib,
                }
                for g in self.gpus
            ],
            "phases": phases,
            "sampler_cost_ms_mean": round(1000 * cost_sum / samples, 3) if samples else None,
            "sampler_cost_ms_max": round(1000 * cost_max, 3) if samples else None,
        }

    # ---- start -------------------------------------------------------------------------------

    def _start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.log_path.open("w", encoding="utf-8", newline="")
        self._file.write(f"# {self.log_path.name}: GPU samples from NVML (nvidia-ml-py), pid {self._pid}\n")
        try:
            self._start_nvml()
        except _MonitorOff as off:
            self._turn_off(str(off))
            return
        self.enabled = True
        self._write_header()
        self._t0 = time.monotonic()
        # First sample synchronously: short blocks get one, and a broken NVML shows up here.
        self._sample()
        if self.error is None:
            self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
            self._thread.start()
        if self.pmon and self.error is None:
            self._start_pmon()

    def _start_nvml(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as e:
                raise _MonitorOff(f"nvidia-ml-py (module pynvml) is not importable: {e}") from e
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise _MonitorOff(f"NVML did not start ({type(e).__name__}: {e}); no NVIDIA driver or GPU here?") from e
        self._nvml_up = True
        try:
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                raise _MonitorOff("NVML found no GPU")
            all_handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in all_handles]
            try:
                nvml_indices, skipped_mig = map_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
            except ValueError as e:
                raise _MonitorOff(str(e)) from e
            if skipped_mig:
                self.print_fn(f"GPU monitor: MIG instances not monitored: {', '.join(skipped_mig)}")
            for cuda_index, nvml_index in enumerate(nvml_indices):
                handle = all_handles[nvml_index]
                total = nvml.nvmlDeviceGetMemoryInfo(handle).total / MIB
                name = _text(nvml.nvmlDeviceGetName(handle))
                self.gpus.append(GpuInfo(cuda_index, nvml_index, name, uuids[nvml_index], round(total, 1)))
                self._handles.append(handle)
                # Optional fields: probed once, so a GPU without them is not an error every sample.
                self._has_power.append(self._probe(nvml.nvmlDeviceGetPowerUsage, handle))
                get_procs = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses", None)
                self._has_procs.append(get_procs is not None and self._probe(get_procs, handle))
        except nvml.NVMLError as e:
            raise _MonitorOff(f"NVML error while listing GPUs: {e}") from e

    def _probe(self, fn: Callable[[Any], Any], handle: Any) -> bool:
        try:
            fn(handle)
        except self._nvml.NVMLError:
            return False
        return True

    def _turn_off(self, reason: str) -> None:
        self.disabled_reason = reason
        self.print_fn(f"GPU monitoring off: {reason}")
        assert self._file is not None
        self._file.write(f"# GPU monitoring off: {reason}\n")
        self._file.write(",".join(name for name, _ in GPU_LOG_COLUMNS) + "\n")
        self._file.flush()
        self._shutdown_nvml()

    def _write_header(self) -> None:
        assert self._file is not None
        f = self._file
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        f.write(f"# started {started}, one row per sample and GPU, every {self.interval_s:g} s\n")
        f.write(f"# CUDA_VISIBLE_DEVICES={'<unset>' if visible is None else visible}\n")
        for g in self.gpus:
            f.write(f"# {g.label} = NVML index {g.nvml_index}, {g.name}, {g.uuid}, {g.memory_total_mib:,.0f} MiB\n")
        f.write("# columns:\n")
        width = max(len(name) for name, _ in GPU_LOG_COLUMNS)
        for name, meaning in GPU_LOG_COLUMNS:
            f.write(f"#   {name:<{width}}  {meaning}\n")
        f.write("# lines starting with '#' are comments; the others are CSV with a header row\n")
        self._writer = csv.writer(f, lineterminator="\n")
        self._writer.writerow([name for name, _ in GPU_LOG_COLUMNS])
        f.flush()

    # ---- sampling ----------------------------------------------------------------------------

    def _run(self) -> None:
        next_t = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            self._sample()
            if self.error is not None:
                return
            next_t += self.interval_s
            now = time.monotonic()
            if next_t < now:  # fell behind (slow NVML call): skip ahead rather than burst
                next_t = now + self.interval_s

    def _read(self, i: int) -> _Reading:
        nvml, handle = self._nvml, self._handles[i]
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        power_w = nvml.nvmlDeviceGetPowerUsage(handle) / 1000 if self._has_power[i] else None
        proc_used_mib = None
        if self._has_procs[i]:
            mine = [
                p.usedGpuMemory
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == self._pid and p.usedGpuMemory is not None
            ]
            proc_used_mib = sum(mine) / MIB if mine else None
        return _Reading(mem.used / MIB, mem.total / MIB, int(util.gpu), int(util.memory), power_w, proc_used_mib)

    def _sample(self) -> None:
        with self._lock:
            if self._file is None or self.error is not None:
                return
            started = time.perf_counter()
            elapsed_s = time.monotonic() - self._t0
            phase = self._phase
            now = datetime.now().astimezone().isoformat(timespec="milliseconds")
            try:
                readings = [self._read(i) for i in range(len(self.gpus))]
            except Exception as e:  # NVMLError or anything else: never take the training down
                self._fail(f"{type(e).__name__} at {elapsed_s:.1f} s: {e}")
                return
            by_gpu = self._stats.setdefault(phase, {})
            for g, r in zip(self.gpus, readings):
                self._writer.writerow(
                    [
                        now,
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
                by_gpu.setdefault(g.label, _PhaseStats()).add(r)
            self._file.flush()
            self._samples += 1
            if self.console_every > 0 and (self._samples - 1) % self.console_every == 0:
                self.print_fn(_console_line(phase, elapsed_s, self.gpus, readings))
            cost_s = time.perf_counter() - started
            self._cost_s_sum += cost_s
            self._cost_s_max = max(self._cost_s_max, cost_s)

    def _fail(self, error: str) -> None:
        """Called with the lock held: log once, stop sampling."""
        self.error = error
        self._stop.set()
        self.print_fn(f"GPU monitoring stopped: {error}")
        if self._file is not None:
            self._file.write(f"# GPU monitoring stopped: {error}\n")
            self._file.flush()

    # ---- pmon ------------------------------------------------------------------------------

    def _start_pmon(self) -> None:
        cmd = self.pmon_cmd
        if cmd is None:
            delay_s = str(max(1, min(10, round(self.interval_s))))  # pmon takes whole seconds, 1..10
            cmd = ["nvidia-smi", "pmon", "-d", delay_s, "-s", "um", "-o", "DT"]
            if len(self.gpus) == 1:
                cmd += ["-i", str(self.gpus[0].nvml_index)]
        path = self.log_path.parent / PMON_LOG
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
            self.print_fn(f"nvidia-smi pmon off: {e}")
            return
        self._pmon_proc, self._pmon_file, self.pmon_pid = proc, f, proc.pid

    def _stop_pmon(self) -> None:
        proc, f = self._pmon_proc, self._pmon_file
        self._pmon_proc = self._pmon_file = None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=PMON_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            # Also reaches children the command left behind; a no-op once the group is empty.
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=PMON_STOP_TIMEOUT_S)
            if f is not None:
                f.close()

    # ---- end -------------------------------------------------------------------------------

    def _close_log_and_nvml(self) -> None:
        thread_alive = self._thread is not None and self._thread.is_alive()
        if not self._lock.acquire(timeout=1.0):
            self.print_fn("GPU monitor: sampler stuck in an NVML call; log left open")
            return
        try:
            if self._file is not None:
                if self.enabled:
                    self._write_footer()
                self._file.close()
                self._file = None
        finally:
            self._lock.release()
        if not thread_alive:
            self._shutdown_nvml()

    def _write_footer(self) -> None:
        assert self._file is not None
        ended = datetime.now().astimezone().isoformat(timespec="seconds")
        elapsed_s = time.monotonic() - self._t0
        cost = f", sampler {1000 * self._cost_s_sum / self._samples:.2f} ms/sample" if self._samples else ""
        self._file.write(f"# ended {ended} after {elapsed_s:.1f} s, {self._samples} samples{cost}\n")
        for phase, by_gpu in self._stats.items():
            for label, stats in by_gpu.items():
                s = stats.as_dict()
                self._file.write(
                    f"# {phase} {label}: peak {s['peak_used_mib']:,.0f} MiB, mean {s['mean_used_mib']:,.0f} MiB, "
                    f"{s['samples']} samples\n"
                )

    def _shutdown_nvml(self) -> None:
        if self._nvml_up:
            self._nvml_up = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _console_line(phase: str, elapsed_s: float, gpus: Sequence[GpuInfo], readings: Sequence[_Reading]) -> str:
    parts = [
        f"{g.label} {r.used_mib:,.0f} / {r.total_mib:,.0f} MiB ({100 * r.used_mib / r.total_mib:.0f}%) "
        f"util {r.gpu_util_pct}%"
        for g, r in zip(gpus, readings)
    ]
    return f"[gpu {phase} {elapsed_s:.0f}s] " + "  |  ".join(parts)


@contextlib.contextmanager
def torch_peak_memory(
    phase: str, into: dict[str, Any], device: int | None = None, empty_cache: bool = False
) -> Iterator[None]:
    """Record torch's allocator peaks for the block: `into[phase] = {max_allocated_mib, max_reserved_mib}`.

    Resets the peaks on entry, so train and eval get their own. A reset sets each peak to the
    current value, and blocks cached by an earlier phase still count as reserved: pass
    `empty_cache=True` to hand them back first. Values are None without CUDA. Per process and
    device: under torchrun each rank sees only its own device's allocator.
    """
    import torch

    if not torch.cuda.is_available():
        into[phase] = {"max_allocated_mib": None, "max_reserved_mib": None}
        yield
        return
    if empty_cache:
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        try:
            into[phase] = {
                "max_allocated_mib": round(torch.cuda.max_memory_allocated(device) / MIB, 1),
                "max_reserved_mib": round(torch.cuda.max_memory_reserved(device) / MIB, 1),
            }
        except RuntimeError:  # a broken CUDA context must not hide the block's own exception
            into[phase] = {"max_allocated_mib": None, "max_reserved_mib": None}


def format_summary(summary: dict[str, Any], torch_peaks: dict[str, Any]) -> str:
    """Human-readable lines for the end of a run."""
    lines: list[str] = []
    if not summary.get("enabled"):
        lines.append(f"GPU monitoring off: {summary.get('disabled_reason')}")
    else:
        cost = summary.get("sampler_cost_ms_mean")
        cost_text = f", sampler {cost:.2f} ms/sample" if cost is not None else ""
        lines.append(
            f"GPU memory in use, NVML (every {summary['interval_s']:g} s, {summary['samples']} samples{cost_text};"
            f" {summary['log_path']}):"
        )
        if summary.get("error"):
            lines.append(f"  stopped early: {summary['error']}")
        gpus = {g["label"]: g for g in summary["gpus"]}
        for phase, by_gpu in summary["phases"].items():
            for label, s in by_gpu.items():
                g = gpus[label]
                pct = 100 * s["peak_used_mib"] / g["memory_total_mib"]
                lines.append(
                    f"  {phase:<5} {label} {g['name']}: peak {s['peak_used_mib']:,.0f} / {g['memory_total_mib']:,.0f} MiB"
                    f" ({pct:.0f}%), mean {s['mean_used_mib']:,.0f} MiB, util {s['mean_gpu_util_pct']:.0f}%"
                    f" ({s['samples']} samples)"
                )
    if torch_peaks:
        lines.append("torch allocator, this process's device (peaks reset per phase):")
        for phase, p in torch_peaks.items():
            if p is None or p.get("max_allocated_mib") is None:
                lines.append(f"  {phase:<5} CUDA not available")
            else:
                lines.append(
                    f"  {phase:<5} max allocated {p['max_allocated_mib']:,.0f} MiB,"
                    f" max reserved {p['max_reserved_mib']:,.0f} MiB"
                )
    return "\n".join(lines)
