"""Per-phase statistics of the samples (peak and mean memory used, utilisation), and the lines printed at the end
of a run (torch's allocator peaks: common/memory.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.artifacts import MONITOR_PHASES
from common.monitor.devices import GpuInfo, Reading


class GpuPhaseStats:
    """One GPU during one phase."""

    def __init__(self) -> None:
        self.samples = 0
        self.peak_used_mib = 0.0
        self.sum_used_mib = 0.0
        self.sum_gpu_util_pct = 0.0
        self.peak_proc_used_mib: float | None = None

    def add(self, r: Reading) -> None:
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


class Statistics:
    """Every sample so far: per phase and GPU label, plus what taking the samples cost."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, GpuPhaseStats]] = {}
        self.samples = 0
        self.cost_s_sum = 0.0
        self.cost_s_max = 0.0

    def add(self, phase: str, gpus: Sequence[GpuInfo], readings: Sequence[Reading]) -> int:
        """Count one sample (a reading per GPU); returns its number, from 1."""
        by_gpu = self.phases.setdefault(phase, {})
        for g, r in zip(gpus, readings):
            by_gpu.setdefault(g.label, GpuPhaseStats()).add(r)
        self.samples += 1
        return self.samples

    def add_cost(self, cost_s: float) -> None:
        self.cost_s_sum += cost_s
        self.cost_s_max = max(self.cost_s_max, cost_s)

    def as_dict(self) -> dict[str, Any]:
        n = self.samples
        return {
            "samples": n,
            "phases": {phase: {label: s.as_dict() for label, s in by_gpu.items()} for phase, by_gpu in self.phases.items()},
            "sampler_cost_ms_mean": round(1000 * self.cost_s_sum / n, 3) if n else None,
            "sampler_cost_ms_max": round(1000 * self.cost_s_max, 3) if n else None,
        }


def format_summary(summary: dict[str, Any], torch_peaks: dict[str, Any]) -> str:
    """Human-readable lines for the end of a run, from GpuMonitor.summary() and common.memory.torch_peak_memory's records."""
    lines = _nvml_lines(summary)
    if torch_peaks:
        lines.append("torch allocator, this process's device (peaks reset per phase):")
        width = max(5, *(len(phase) for phase in torch_peaks))
        for phase, p in torch_peaks.items():
            if p is None or p.get("max_allocated_mib") is None:
                lines.append(f"  {phase:<{width}} CUDA not available")
            else:
                lines.append(
                    f"  {phase:<{width}} max allocated {p['max_allocated_mib']:,.0f} MiB,"
                    f" max reserved {p['max_reserved_mib']:,.0f} MiB"
                )
    return "\n".join(lines)


def _nvml_lines(summary: dict[str, Any]) -> list[str]:
    if not summary.get("enabled"):
        return [f"GPU monitoring off: {summary.get('disabled_reason')}"]
    cost_ms = summary.get("sampler_cost_ms_mean")
    cost_text = f", sampler {cost_ms:.2f} ms/sample" if cost_ms is not None else ""
    every = f"every {summary['interval_s']:g} s, {summary['samples']} samples{cost_text}"
    lines = [f"GPU memory in use, NVML ({every}; {summary['log_path']}):"]
    if summary.get("error"):
        lines.append(f"  stopped early: {summary['error']}")
    gpus = {g["label"]: g for g in summary["gpus"]}
    phases = ordered_phases(summary["phases"])
    width = max(5, *(len(phase) for phase in phases)) if phases else 5
    for phase in phases:
        for label, s in summary["phases"][phase].items():
            g = gpus[label]
            peak_pct = 100 * s["peak_used_mib"] / g["memory_total_mib"]
            lines.append(
                f"  {phase:<{width}} {label} {g['name']}: peak {s['peak_used_mib']:,.0f} / {g['memory_total_mib']:,.0f} MiB"
                f" ({peak_pct:.0f}%), mean {s['mean_used_mib']:,.0f} MiB, util {s['mean_gpu_util_pct']:.0f}%"
                f" ({s['samples']} samples)"
            )
    return lines


def ordered_phases(phases: dict[str, Any]) -> list[str]:
    """The phases with samples, in MONITOR_PHASES' order (eval, train, select, save, load), any other label after."""
    known = [p for p in MONITOR_PHASES if p in phases]
    return known + [p for p in phases if p not in MONITOR_PHASES]
