"""metrics.json (machine-readable, written as the run goes) and the console summary table."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import transformers

from common.artifacts import TIME_PHASES


class MetricsFile:
    """A metrics.json rewritten after every phase, so an interrupted run still leaves what it measured."""

    def __init__(self, path: Path, initial: dict, write: bool = True):
        self.path = path
        self.data = {"status": "running", **initial}
        self.enabled = write  # only rank 0 writes under torchrun

    def update(self, **sections) -> None:
        """The one way metrics are recorded: each section merged into what is there (one level deep), then the
        file rewritten."""
        for name, value in sections.items():
            recorded = self.data.get(name)
            if isinstance(recorded, dict) and isinstance(value, dict):
                recorded.update(value)
            else:
                self.data[name] = value
        self.write()

    def write(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def environment() -> dict:
    """The card and the versions, so every number can be traced to what produced it."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def summary_table(metrics: dict) -> str:
    """The final table on the console: what the run measured, each with its unit."""
    rows: list[tuple[str, str]] = []
    timing = metrics.get("timing", {})
    train = metrics.get("train", {})
    accuracy = metrics.get("accuracy", {})
    memory = metrics.get("memory", {})

    def add(label: str, value, fmt: str = "{}") -> None:
        if value is not None:
            rows.append((label, fmt.format(value)))

    add("profile", metrics.get("profile"))
    add("status", metrics.get("status"))
    add("wall time (s)", timing.get("wall_s"), "{:.1f}")
    add("train runtime (s, Trainer: steps, selection passes, saves)", timing.get("train_runtime_s"), "{:.1f}")
    add("train samples/s (over train runtime)", timing.get("train_samples_per_s"), "{:.2f}")
    add("train non-padding tokens/s (over train runtime)", timing.get("train_tokens_per_s"), "{:,.0f}")
    add("train non-padding tokens/s (training steps only, no selection or saves)",
        timing.get("train_steps_tokens_per_s"), "{:,.0f}")
    if "wall_s" in timing:
        rows.extend(time_phase_rows(timing))
    add("optimizer steps", train.get("optimizer_steps"))
    add(f"train loss, mean over {'this session' if train.get('resumed_from') else 'the run'}",
        train.get("mean_loss", train.get("final_loss")), "{:.4f}")
    add("train loss, last logged step", (train.get("loss_per_step") or [{}])[-1].get("loss"), "{:.4f}")
    for phase in ("zero_shot", "fine_tuned"):
        # An --eval-only run evaluates --model as given (recorded under zero_shot): name it, not a phase it lacks.
        what = f"{metrics.get('model')} (eval-only)" if metrics.get("eval_only") else phase
        for method, result in accuracy.get(phase, {}).items():
            add(f"{what} {method} acc (%)", result.get("acc_pct"), "{:.2f}")
            add(f"{what} {method} acc_norm (%)", result.get("acc_norm_pct"), "{:.2f}")
            add(f"{what} {method} parse failures (%)", result.get("parse_failure_pct"), "{:.2f}")
    add("accuracy change (points, loglik acc)", accuracy.get("change_acc_pts"), "{:+.2f}")
    add("reported examples", accuracy.get("n_examples"))
    for phase, peaks in (memory.get("torch") or {}).items():
        if peaks and peaks.get("max_allocated_mib") is not None:
            add(f"torch peak allocated, {phase} (MiB)", peaks["max_allocated_mib"], "{:,.0f}")
            add(f"torch peak reserved, {phase} (MiB)", peaks["max_reserved_mib"], "{:,.0f}")
    nvml = memory.get("nvml") or {}
    for phase, gpus in (nvml.get("phases") or {}).items():
        for gpu, stats in gpus.items():
            add(f"NVML peak used, {gpu} {phase} (MiB)", stats.get("peak_used_mib"), "{:,.0f}")
    add("checkpoint disk (MiB)", metrics.get("disk", {}).get("checkpoints_mib"), "{:,.0f}")
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"  {label:<{width}}  {value}".rstrip() for label, value in rows)


def time_phase_rows(timing: dict) -> list[tuple[str, str]]:
    """Where the wall clock went: each phase that took time, in seconds and as a share of wall time."""
    phases_s = timing.get("phases_s")
    if not isinstance(phases_s, dict) or not phases_s:
        return [("where the time went", "not recorded (a run from before timing.phases_s)")]
    wall_s = timing.get("wall_s") or sum(phases_s.values())
    known = [name for name, _ in TIME_PHASES]
    names = known + sorted(set(phases_s) - set(known))  # a phase newer than this code still shows
    rows = [("where the time went (s, % of wall time)", "")]
    for name in names:
        seconds = phases_s.get(name) or 0.0
        if seconds > 0:  # phases that did not happen are 0 or absent
            rows.append((f"  {name}", f"{seconds:,.1f}  ({100 * seconds / wall_s:.1f}%)"))
    return rows
