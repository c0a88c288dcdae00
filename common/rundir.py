"""The run directory: refuse silent reuse, find checkpoints to resume, guard the disk."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from common import artifacts
from common.config import Profile
from common.memory import GIB, MIB


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says which flag does what."""


def finished(run_dir: Path) -> bool:
    path = run_dir / artifacts.METRICS
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("status") == "finished"
    except (json.JSONDecodeError, OSError):
        return False


def is_inside(path: Path, directory: Path) -> bool:
    """Whether `path` is `directory` or lies under it (symbolic links resolved)."""
    path, directory = path.expanduser().resolve(), directory.expanduser().resolve()
    return path == directory or directory in path.parents


def looks_like_a_run(run_dir: Path) -> bool:
    return (run_dir / artifacts.METRICS).exists() or (run_dir / artifacts.CONFIG).exists() or bool(artifacts.checkpoints(run_dir))


def check_run_dir(
    run_dir: Path, overwrite: bool, resume: bool, model: str | None = None, eval_only: bool = False
) -> Path | None:
    """Decide how to use `run_dir` without touching it; returns the checkpoint to resume from, if any.

    No flag deletes or replaces `model`: --overwrite is refused when the model lies inside `run_dir`, and so is
    training into it. Each refusal names only ways out that work from where the user stands.
    """
    holds_model = model is not None and Path(model).exists() and is_inside(Path(model), run_dir)
    elsewhere = ("leave out --output-dir (--eval-only then writes to a new directory of its own)" if eval_only
                 else "pass --output-dir with a new directory")
    if holds_model and resume:
        raise RunDirError(f"{run_dir}: --model {model} lies inside the run --resume continues, and the run's checkpoint "
                          "rotation could delete it: pass --model the model the run started from (its config.json "
                          "names it); the weights come from the newest checkpoint.")
    if holds_model and (overwrite or not eval_only):
        does = "--overwrite would delete" if overwrite else "training writes checkpoints and final_model/ into it and could replace"
        raise RunDirError(f"{run_dir}: {does} --model {model}, which lies inside it: {elsewhere}.")
    if not run_dir.exists():
        if resume:
            raise RunDirError(f"{run_dir}: --resume given but the run directory does not exist: leave out --resume "
                              "to start a new run")
        return None
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory: {elsewhere}.")
    if not any(p.name != artifacts.LOCK for p in run_dir.iterdir()):  # empty, or just locked by this run
        if resume:
            raise RunDirError(f"{run_dir}: --resume given but the directory is empty: leave out --resume")
        return None
    if not looks_like_a_run(run_dir):
        raise RunDirError(f"{run_dir}: is not empty and holds no run (no metrics.json, config.json or checkpoint-*); "
                          f"--overwrite replaces only runs: {elsewhere}.")
    saved = artifacts.checkpoints(run_dir)
    replace = "" if holds_model else ", or --overwrite to replace it"
    if finished(run_dir):
        if overwrite:
            return None
        if resume:  # --resume must go for either way out (--overwrite contradicts it)
            raise RunDirError(f"{run_dir}: holds a finished run, so there is nothing to resume: leave out --resume and "
                              f"{elsewhere}{replace}.")
        raise RunDirError(f"{run_dir}: holds a finished run: {elsewhere}{replace}.")
    if resume:
        if not saved:
            raise RunDirError(f"{run_dir}: --resume given but the run stopped before its first checkpoint, so there is "
                              f"nothing to resume: pass --overwrite instead of --resume to start over, or leave out --resume and "
                              f"{elsewhere}.")
        return saved[-1]
    if overwrite:
        return None
    if eval_only:
        raise RunDirError(f"{run_dir}: holds an unfinished run: {elsewhere}{replace}.")
    if saved:
        raise RunDirError(f"{run_dir}: holds an unfinished run ({len(saved)} checkpoint(s)). Pass --resume to continue "
                          f"from the newest checkpoint, --overwrite to start over, or --output-dir for a new directory.")
    raise RunDirError(f"{run_dir}: holds a run that stopped before its first checkpoint (nothing to resume). Pass "
                      f"--overwrite to start over, or --output-dir for a new directory.")


def first_free_dir(base: Path) -> Path:
    """`base`, else `base-2`, `base-3`, ...: the first that does not exist (every rank computes the same one)."""
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove the old run's contents (called only once every input has been checked), except the lock
    this run holds."""
    for path in run_dir.iterdir() if run_dir.exists() else []:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.name != artifacts.LOCK:
            path.unlink()


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory that cannot be written, before anything is loaded: a file in its path, a read-only
    file system, no permission."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "exists and is not a directory" if probe == run_dir else f"{probe} is a file, not a directory"
        raise RunDirError(f"{run_dir}: {where}: pass --output-dir with a directory")
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise RunDirError(f"{run_dir}: {probe} is on a read-only file system: pass --output-dir on a writable one")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"{run_dir}: no permission to write in {probe}: pass --output-dir where you may write")


def checkpoint_bytes(parameter_count: int, optim: str) -> int:
    """One full checkpoint: fp32 weights plus optimizer state (AdamW: two fp32 moments per parameter)."""
    optimizer_bytes_per_parameter = {"adafactor": 0.5, "adamw_bnb_8bit": 2, "adamw_8bit": 2}.get(optim, 8)
    return int(parameter_count * (4 + optimizer_bytes_per_parameter))


def checkpoints_kept(profile: Profile, epochs: int) -> int:
    """At most how many checkpoints sit on disk at once: those kept (with load_best_model_at_end, the best one beside
    the newest), and the next one, written in full before the rotation removes the oldest."""
    if profile.save_total_limit is None:
        return epochs
    return min(epochs, profile.save_total_limit + (1 if profile.load_best_model_at_end else 0) + 1)


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
            f"{run_dir}: checkpoints need about {readable_size(need_bytes)} but the file system has "
            f"{readable_size(free_bytes)} free. Free some space, pass --output-dir on a larger disk, or train fewer epochs."
        )
    return {"estimated_checkpoint_disk_gib": round(need_bytes / GIB, 2), "free_disk_gib": round(free_bytes / GIB, 1)}


def readable_size(size_bytes: int) -> str:
    """GiB, or MiB below one GiB (a small model's 1.2 MiB is not "0.0 GiB")."""
    return f"{size_bytes / GIB:.1f} GiB" if size_bytes >= GIB else f"{size_bytes / MIB:.1f} MiB"


def directory_size_mib(path: Path) -> float:
    if not path.exists():
        return 0.0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB
