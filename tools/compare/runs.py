"""Reading a run directory: metrics.json, config.json, densenetsmi.txt and the predictions, by the names in
common/artifacts.py. Anything missing or damaged becomes a note in the report, not an error."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import artifacts
from common.artifacts import CONFIG, GPU_LOG, METRICS, PHASES

PHASE_TITLES = {"zero_shot": "zero-shot", "fine_tuned": "fine-tuned"}
STATUS_MEANING = {
    "interrupted": "stopped early by Ctrl-C or SIGTERM",
    "failed": "stopped early by an error",
    "running": "still running, or killed without a chance to record it (SIGKILL, out of memory, power loss)",
}


# The phases of timing.phases_s add up to wall_s; further apart than this share, the report says so.
PHASES_SUM_TOLERANCE = 0.05


class NotARunError(ValueError):
    """The directory holds no run; the message is the one-line error shown to the user."""


@dataclass(frozen=True)
class GpuSample:
    elapsed_s: float
    phase: str
    gpu: str
    mem_used_mib: float


@dataclass
class Run:
    path: Path
    label: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    gpu_samples: list[GpuSample]
    # (phase, method) -> example id -> prediction record; only the files that exist
    predictions: dict[tuple[str, str], dict[str, dict[str, Any]]]
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.metrics.get("status", "unknown"))


def get(data: Any, *keys: str) -> Any:
    """data[keys[0]][keys[1]]..., or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def time_phases(metrics: dict[str, Any]) -> dict[str, float] | None:
    """metrics.json's timing.phases_s (seconds per phase of the wall clock); None for runs from before it."""
    phases_s = get(metrics, "timing", "phases_s")
    if not isinstance(phases_s, dict) or not phases_s:
        return None
    return {name: float(s) for name, s in phases_s.items() if isinstance(s, (int, float))}


def training_steps_tokens_per_s(run: Run) -> float | None:
    """Non-padding tokens/s of the training steps alone, recomputed from the run's fields so that every run gets
    today's formula (runs up to 2026-12-04 recorded it over the train_steps phase); else as the run recorded it."""
    computed = artifacts.training_steps_tokens_per_s(run.metrics.get("timing") or {},
                                                     get(run.metrics, "train", "session_tokens"))
    return computed if computed is not None else get(run.metrics, "timing", "train_steps_tokens_per_s")


def profile_settings(run: Run) -> dict[str, Any]:
    return run.metrics.get("settings") or run.config.get("profile") or {}


def engine_settings(run: Run) -> dict[str, Any]:
    return run.metrics.get("engine") or run.config.get("engine") or {}


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """Directory names, or longer relative paths where two runs share a name."""
    names = [p.name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [os.path.relpath(p) for p in paths]


def load_run(path: Path, label: str | None = None) -> Run:
    """Read what a run directory holds; anything missing becomes a note, not an error."""
    path = Path(path)
    if not path.is_dir():
        raise NotARunError(f"{path}: not a directory")
    has_any = any((path / name).is_file() for name in (METRICS, GPU_LOG, CONFIG))
    if not has_any:
        raise NotARunError(
            f"{path}: not a run directory (no {METRICS}, {GPU_LOG} or {CONFIG}); "
            "give the directories baseline.py / modified.py wrote, e.g. runs/baseline"
        )
    notes: list[str] = []
    metrics = _read_json(path / METRICS, notes, "no timing, accuracy, training or memory numbers")
    config = _read_json(path / CONFIG, notes, "experiment settings unknown")
    notes.extend(_metrics_notes(metrics))
    gpu_samples = _read_gpu_log(path / GPU_LOG, notes)
    predictions = _read_all_predictions(path, metrics, config, notes)
    return Run(path, label or path.name, metrics, config, gpu_samples, predictions, notes)


def _metrics_notes(metrics: dict[str, Any]) -> list[str]:
    """What metrics.json says about the run being partial: its status, and the sections it lacks."""
    if not metrics:
        return []
    notes = []
    status = metrics.get("status")
    if status is None:
        notes.append(f"{METRICS} has no 'status': whether the run finished is unknown")
    elif status != "finished":
        why = STATUS_MEANING.get(status, "the run did not finish")
        notes.append(f"status is {status!r}, not 'finished': {why}; its numbers cover only what it completed")
    for section in ("timing", "train", "accuracy", "memory"):
        if section not in metrics:
            notes.append(f"{METRICS} has no '{section}' section")
    return notes + _time_notes(metrics)


def _time_notes(metrics: dict[str, Any]) -> list[str]:
    """Where the time went: not recorded (older runs), or phases that do not add up to the wall clock."""
    if "timing" not in metrics:
        return []
    phases_s, wall_s = time_phases(metrics), get(metrics, "timing", "wall_s")
    if phases_s is None:
        return [(f"{METRICS} has no timing.phases_s (a run from before it was recorded): where the time went is "
                 "not recorded")]
    if metrics.get("status") != "finished" or not isinstance(wall_s, (int, float)) or wall_s <= 0:
        return []  # an interrupted run's phases stop where it stopped
    sum_s = sum(phases_s.values())
    if abs(sum_s - wall_s) > PHASES_SUM_TOLERANCE * wall_s:
        return [(f"its time phases add up to {sum_s:,.1f} s, not its wall clock of {wall_s:,.1f} s: a phase is "
                 "missing or counted twice")]
    return []


def _read_json(path: Path, notes: list[str], consequence: str) -> dict[str, Any]:
    if not path.is_file():
        notes.append(f"{path.name} missing: {consequence}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        notes.append(f"{path.name} unreadable ({err}): {consequence}")
        return {}
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object: {consequence}")
        return {}
    return data


def _read_gpu_log(path: Path, notes: list[str]) -> list[GpuSample]:
    """Rows of densenetsmi.txt: '#' comment lines, then CSV with a header row."""
    if not path.is_file():
        notes.append(f"{GPU_LOG} missing: no GPU memory over time")
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    off_reason = next((line[2:] for line in lines if line.startswith("# GPU monitoring off")), None)
    stopped = next((line[2:] for line in lines if line.startswith("# GPU monitoring stopped")), None)
    if stopped:
        notes.append(f"{GPU_LOG}: {stopped}; the samples end there")
    samples = []
    for row in csv.DictReader(line for line in lines if not line.startswith("#")):
        try:
            samples.append(
                GpuSample(float(row["elapsed_s"]), row["phase"], f"GPU{row['gpu']}", float(row["mem_used_mib"]))
            )
        except (KeyError, TypeError, ValueError):
            continue  # a row cut short by a killed run
    if not samples:
        notes.append(f"{GPU_LOG} has no GPU samples" + (f" ({off_reason})" if off_reason else ""))
    return samples


def _expected_predictions(metrics: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, str]]:
    """The (phase, method) prediction files this run should have written."""
    experiment = get(config, "experiment") or {}
    method = experiment.get("eval_method", "loglik")
    methods = ["loglik", "generate"] if method == "both" else [method]
    phases = ["zero_shot"] if experiment.get("eval_only") else list(PHASES)
    expected = [(p, m) for p in phases for m in methods]
    reported = [(p, m) for p in PHASES for m in get(metrics, "accuracy", p) or {}]
    return expected + [pm for pm in reported if pm not in expected]


def _read_all_predictions(
    path: Path, metrics: dict[str, Any], config: dict[str, Any], notes: list[str]
) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    found = {}
    for phase, method in _expected_predictions(metrics, config):
        file = path / artifacts.predictions(phase, method)
        if not file.is_file():
            notes.append(f"{file.name} missing: no paired test for {PHASE_TITLES[phase]} {method}")
            continue
        found[(phase, method)] = _read_predictions(file, notes)
    return found


def _read_predictions(path: Path, notes: list[str]) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    bad_lines = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[str(record["id"])] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            bad_lines += 1
    if bad_lines:
        notes.append(f"{path.name}: {bad_lines} unreadable line(s) skipped")
    return records
