"""The run directory: refuse silent reuse, find checkpoints to resume, guard the disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from common.config import Profile

METRICS_FILE = "metrics.json"
GIB = 1024**3


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says which flag does what."""


def checkpoints(run_dir: Path) -> list[Path]:
    """The Trainer's checkpoint-<step> folders, oldest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def finished(run_dir: Path) -> bool:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("status") == "finished"
    except (json.JSONDecodeError, OSError):
        return False


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> Path | None:
    """Decide how to use `run_dir` without touching it; returns the checkpoint to resume from, if any."""
    if not run_dir.exists():
        if resume:
            raise RunDirError(f"{run_dir}: --resume given but the run directory does not exist")
        return None
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory")
    saved = checkpoints(run_dir)
    if finished(run_dir) and not overwrite:
        raise RunDirError(
            f"{run_dir}: holds a finished run. Pass --overwrite to replace it, or --output-dir for a new directory."
        )
    if resume:
        if not saved:
            raise RunDirError(f"{run_dir}: --resume given but there is no checkpoint-* to resume from")
        return saved[-1]
    if (saved or any(run_dir.iterdir())) and not overwrite:
        raise RunDirError(
            f"{run_dir}: holds an unfinished run ({len(saved)} checkpoint(s)). Pass --resume to continue from "
            "the newest checkpoint, or --overwrite to start over."
        )
    return None


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove the old run's contents (called only once every input has been checked)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


def checkpoint_bytes(parameter_count: int, optim: str) -> int:
    """One full checkpoint: fp32 weights plus optimizer state (AdamW: two fp32 moments per parameter)."""
    optimizer_bytes_per_parameter = {"adafactor": 0.5, "adamw_bnb_8bit": 2, "adamw_8bit": 2}.get(optim, 8)
    return int(parameter_count * (4 + optimizer_bytes_per_parameter))


def checkpoints_kept(profile: Profile, epochs: int) -> int:
    """At most how many checkpoints sit on disk at once."""
    if profile.save_total_limit is None:
        return epochs
    # With load_best_model_at_end the Trainer keeps the best one beside the newest.
    return min(epochs, profile.save_total_limit + (1 if profile.load_best_model_at_end else 0))


def check_disk(run_dir: Path, parameter_count: int, profile: Profile, optim: str, epochs: int) -> dict:
    """Refuse before training when the file system cannot hold the checkpoints and the final model."""
    need_bytes = checkpoint_bytes(parameter_count, optim) * checkpoints_kept(profile, epochs)
    need_bytes += parameter_count * 4  # the final model
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    free_bytes = shutil.disk_usage(probe).free
    if need_bytes > free_bytes:
        raise RunDirError(
            f"{run_dir}: checkpoints need about {need_bytes / GIB:.1f} GiB but the file system has "
            f"{free_bytes / GIB:.1f} GiB free. Free some space, pass --output-dir on a larger disk, or train fewer epochs."
        )
    return {"estimated_checkpoint_disk_gib": round(need_bytes / GIB, 2), "free_disk_gib": round(free_bytes / GIB, 1)}


def directory_size_mib(path: Path) -> float:
    if not path.exists():
        return 0.0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
