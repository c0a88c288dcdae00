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

PHASES = ("zero_shot", "fine_tuned")  # the two reported evaluations


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
    ("phase", "eval, train or select (what the run was doing)"),
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
