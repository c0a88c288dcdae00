"""The JSON report's header: the command that ran, the machine and package versions, the settings every row shares."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import subprocess
import sys
from typing import Any

from tools.benchmark.train_row import H100_BF16_DENSE_PEAK_FLOPS
from tools.benchmark.workload import mean_length


def machine_and_versions() -> dict[str, Any]:
    """The GPU (nvidia-smi), the versions of the packages that decide speed, CUDA's and Python's."""
    versions = {}
    for package in ("torch", "transformers", "accelerate", "liger-kernel", "torchao", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            check=False, capture_output=True, text=True, timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            name, driver, memory = (part.strip() for part in out.stdout.strip().splitlines()[0].split(","))
            gpu = {"name": name, "driver": driver, "memory_total": memory}
    import torch

    return {"gpu": gpu, "versions": versions, "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def new_report(options: argparse.Namespace, argv: list[str] | None, lengths: dict) -> dict[str, Any]:
    """The JSON report before any row: the command, the machine and the settings every row shares."""
    launcher = ("accelerate launch --config_file common/fsdp.yaml" if options.fsdp else "torchrun") \
        if options.nproc > 1 else None
    return {
        "command": "python3 -m tools.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": machine_and_versions(),
        "settings": {
            "model": options.model, "steps": options.steps, "warmup_steps": options.warmup_steps,
            "max_measure_s": options.max_measure_s, "batch_size": options.batch_size, "gpus": options.nproc,
            "launcher": launcher,
            "dataset_size": options.dataset_size, "seed": options.seed,
            "peak_flops": H100_BF16_DENSE_PEAK_FLOPS,
            "mfu": "non-padding tokens/s x 6 x parameters (8 x with gradient checkpointing) / 989 TFLOP/s "
                   "(H100 bf16 dense peak), for fp32 rows too",
            "lengths": {"source": lengths["source"], "tokenizer": lengths["tokenizer"], "note": lengths["note"],
                        "mean_train_sequence": mean_length(lengths["train_sequence"])},
        },
        "rows": [],
    }
