"""Every file a run directory holds, and every column of its GPU log, named once: the run writes through these
names and the tools (compare, the tests) read through them."""

from __future__ import annotations

from pathlib import Path

METRICS = "metrics.json"  # status, accuracies, timing, memory, disk: rewritten after every phase
CONFIG = "config.json"  # the resolved experiment, engine and profile (access tokens never written)
GPU_LOG = "densenetsmi.txt"  # NVML samples, one row per sample and GPU: GPU_LOG_COLUMNS
PMON_LOG = "pmon.txt"  # `nvidia-smi pmon` output, with --pmon
FINAL_MODEL = "final_model"  # the model and tokenizer at the end (save_pretrained)
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint-<step> folders
LOCK = "run.lock"  # while a run uses the directory: its process id (common/runlock.py); left behind only by a kill

PHASES = ("zero_shot", "fine_tuned")  # the two reported evaluations

# Where a run's wall clock went: metrics.json's timing.phases_s, in seconds, in the order they happen. They add up
# to timing.wall_s (from the process's start); "other" is what no phase claims.
TIME_PHASES: tuple[tuple[str, str], ...] = (
    ("startup", "process start to the first evaluation: imports, arguments, data, tokenizer, model, engine set-up"),
    ("eval_zero_shot", "accuracy of the model before training, on the reported examples"),
    ("train_steps", "the Trainer's training steps (forward, backward, optimizer, data loading) and its set-up"),
    ("select", "the selection passes at each epoch's end (accuracy on the held-out selection slice)"),
    ("checkpoint_save", "training stopped for a checkpoint: its state copied to host memory (written in the background)"),
    ("checkpoint_wait", ("waiting for the background writes (the last checkpoint, and final_model/'s weights where "
                         "they are the last checkpoint's) to finish")),
    ("load_best", "loading the best checkpoint at the end (load_best_model_at_end)"),
    ("eval_fine_tuned", "accuracy of the final model, on the reported examples"),
    ("final_save", "writing final_model/ on the main thread (or handing its weights to the background writer)"),
    ("other", "what no phase above claims: the summary, metrics.json, the Trainer's teardown"),
)


def training_steps_tokens_per_s(timing: dict, tokens: float | None) -> float | None:
    """metrics.json's timing.train_steps_tokens_per_s: non-padding `tokens` over the Trainer's train_runtime less the
    selection passes and checkpoint saves it holds, i.e. the training steps alone; None where a field is missing."""
    phases_s, runtime_s = timing.get("phases_s") or {}, timing.get("train_runtime_s")
    if not tokens or not runtime_s or "select" not in phases_s or "checkpoint_save" not in phases_s:
        return None
    steps_s = runtime_s - phases_s["select"] - phases_s["checkpoint_save"]
    return tokens / steps_s if steps_s > 0 else None


# The phase column of densenetsmi.txt: what the run was doing when the sample was taken.
MONITOR_PHASES = ("eval", "train", "select", "save", "load")


def predictions(phase: str, method: str) -> str:
    """One JSON record a reported example: predictions_zero_shot.jsonl, predictions_fine_tuned_generate.jsonl, ..."""
    return f"predictions_{phase}{'' if method == 'loglik' else '_' + method}.jsonl"


def checkpoints(run_dir: Path) -> list[Path]:
    """The Trainer's checkpoint-<step> folders, oldest first."""
    found = [p for p in run_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


GPU_LOG_COLUMNS: tuple[tuple[str, str], ...] = (
    ("time", "wall-clock time, ISO 8601 with UTC offset"),
    ("elapsed_s", "seconds since monitoring started"),
    ("phase", "eval, train, select, save (checkpoint or final model) or load (best checkpoint): what the run was doing"),
    ("gpu", "CUDA device index in this process (torch's cuda:N)"),
    ("nvml_index", "index of the same GPU in NVML and nvidia-smi"),
    ("name", "GPU name"),
    ("mem_used_mib", "device memory in use, all processes + driver, MiB (2^20 bytes)"),
    ("mem_total_mib", "device memory total, MiB"),
    ("mem_used_pct", "mem_used_mib / mem_total_mib, %"),
    ("gpu_util_pct", "share of the driver's last sample period with a kernel running, %"),
    ("memctl_util_pct", "share of that period the memory controller was busy, % (NOT memory in use)"),
    ("power_w", "board power draw, W (empty: not supported)"),
    ("proc_mem_used_mib", "this process's own device memory, MiB (empty: not reported, e.g. other PID namespace)"),
)
