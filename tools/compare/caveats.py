"""What a comparison cannot answer from the runs it was given: the same run named twice, runs made on a CPU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tools.compare.runs import Run, get


def same_run_warnings(paths: Sequence[Path]) -> list[str]:
    """Arguments that name one run directory twice (symbolic links and relative paths resolved)."""
    first_named: dict[Path, Path] = {}
    warnings = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in first_named:
            warnings.append(f"{first_named[resolved]} and {path} are the same run directory: it is compared with "
                            "itself, so every difference is zero; name two different runs")
        first_named.setdefault(resolved, path)
    return warnings


def cpu_warnings(runs: Sequence[Run]) -> list[str]:
    on_cpu = [r.label for r in runs if get(r.metrics, "environment", "device") == "cpu"]
    if not on_cpu:
        return []
    return [(f"{', '.join(on_cpu)} ran on a CPU: its speed and memory do not answer the question, which is about a GPU "
             "(on a CPU mixed precision has no tensor cores to gain from and bf16 autocast can run slower than fp32, "
             "and there is no GPU memory to measure); the README's speed and memory figures come from an H200")]
