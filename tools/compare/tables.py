"""The report's tables as rows of text: measurements, where the time went, ratios to the first run, the settings
that differ, the paired tests; and markdown_table, which lays them out. Every label carries its unit; `n/a` is not
measured."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from common.artifacts import PHASES, TIME_PHASES
from tools.compare.runs import (
    PHASE_TITLES,
    Run,
    engine_settings,
    get,
    profile_settings,
    time_phases,
    training_steps_tokens_per_s,
)
from tools.compare.stats import Comparison, wilson_interval

NA = "n/a"
NOT_RECORDED = "not recorded"  # a run from before metrics.json's timing.phases_s
TORCH_PHASE_TITLES = {"train": "train", "eval_zero_shot": "zero-shot eval", "eval": "fine-tuned eval"}
COMPARISON_HEADER = [
    "comparison (second vs first)",
    "examples (count)",
    "first acc (%)",
    "second acc (%)",
    "difference (points, [95% CI])",
    "b / c (count)",
    "McNemar exact p",
    "at 5%",
]

Row = tuple[str, list[str]]  # a label, and one cell a run


def fmt(value: Any, spec: str = "{:,.1f}") -> str:
    if value is None:
        return NA
    if isinstance(value, float) and not math.isfinite(value):
        return NA
    try:
        return spec.format(value)
    except (TypeError, ValueError):  # a hand-edited metrics.json: show what is there
        return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table padded to line up in a terminal too."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [list(header), *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def nvml_stats(run: Run) -> dict[tuple[str, str], tuple[float, float]]:
    """(phase, GPU) -> (peak, mean) device memory used in MiB: from densenetsmi.txt, else metrics.json."""
    if run.gpu_samples:
        by_key: dict[tuple[str, str], list[float]] = {}
        for s in run.gpu_samples:
            by_key.setdefault((s.phase, s.gpu), []).append(s.mem_used_mib)
        return {k: (max(v), sum(v) / len(v)) for k, v in by_key.items()}
    phases = get(run.metrics, "memory", "nvml", "phases") or {}
    return {
        (phase, gpu): (s["peak_used_mib"], s["mean_used_mib"])
        for phase, by_gpu in phases.items()
        for gpu, s in by_gpu.items()
        if "peak_used_mib" in s and "mean_used_mib" in s
    }


def peak_nvml_train_mib(run: Run) -> float | None:
    peaks = [peak for (phase, _), (peak, _) in nvml_stats(run).items() if phase == "train"]
    return max(peaks) if peaks else None


def last_loss(run: Run) -> float | None:
    losses = get(run.metrics, "train", "loss_per_step") or []
    return losses[-1].get("loss") if losses else None


def accuracy_cell(result: dict[str, Any] | None, key: str) -> str:
    """'27.50 [16.1, 42.8]': accuracy in % with its 95% Wilson interval."""
    pct, n = get(result, key), get(result, "n_examples")
    if pct is None:
        return NA
    if not n:
        return f"{pct:.2f}"
    low, high = wilson_interval(round(pct * n / 100), n)
    return f"{pct:.2f} [{100 * low:.1f}, {100 * high:.1f}]"


def measurement_rows(runs: Sequence[Run]) -> list[Row]:
    """The measurements table: one column a run."""
    rows: list[Row] = []

    def add(label: str, value_of: Callable[[Run], Any], spec: str = "{:,.1f}") -> None:
        rows.append((label, [fmt(value_of(r), spec) for r in runs]))

    add("status", lambda r: r.status, "{}")
    add("profile", lambda r: r.metrics.get("profile"), "{}")
    add("device", lambda r: get(r.metrics, "environment", "device"), "{}")
    add("wall time (s)", lambda r: get(r.metrics, "timing", "wall_s"))
    add("train runtime (s)", lambda r: get(r.metrics, "timing", "train_runtime_s"))
    add("train throughput (samples/s)", lambda r: get(r.metrics, "timing", "train_samples_per_s"), "{:,.2f}")
    add("train throughput (non-padding tokens/s)", lambda r: get(r.metrics, "timing", "train_tokens_per_s"), "{:,.0f}")
    add("train throughput, training steps only (non-padding tokens/s)",
        training_steps_tokens_per_s, "{:,.0f}")
    add("optimizer steps (count)", lambda r: get(r.metrics, "train", "optimizer_steps"), "{:,}")
    rows.extend(_nvml_rows(runs))
    for phase, title in TORCH_PHASE_TITLES.items():
        for kind in ("allocated", "reserved"):
            add(f"torch peak {kind}, {title} (MiB)", lambda r, p=phase, k=kind: get(r.metrics, "memory", "torch", p, f"max_{k}_mib"))
    add("checkpoints on disk (MiB)", lambda r: get(r.metrics, "disk", "checkpoints_mib"))
    add("train loss, mean over the run (nats/token)", lambda r: get(r.metrics, "train", "mean_loss")
        if get(r.metrics, "train", "mean_loss") is not None else get(r.metrics, "train", "final_loss"), "{:.4f}")
    add("train loss, last logged step (nats/token)", last_loss, "{:.4f}")
    rows.extend(_accuracy_rows(runs))
    rows.extend(_settings_rows(runs))
    return rows


def _nvml_rows(runs: Sequence[Run]) -> list[Row]:
    stats = [nvml_stats(r) for r in runs]
    keys = sorted({k for s in stats for k in s}, key=lambda k: (k[0] != "train", k))
    if not keys:
        keys = [("train", "GPU0"), ("eval", "GPU0")]
    several_gpus = len({gpu for _, gpu in keys}) > 1
    rows: list[Row] = []
    for phase, gpu in keys:
        where = f"{phase} {gpu}" if several_gpus else phase
        for i, what in enumerate(("peak", "mean")):
            values = [fmt(s[(phase, gpu)][i] if (phase, gpu) in s else None, "{:,.0f}") for s in stats]
            rows.append((f"GPU memory used (NVML), {what}, {where} (MiB)", values))
    return rows


def _accuracy_rows(runs: Sequence[Run]) -> list[Row]:
    rows: list[Row] = []
    for phase in PHASES:
        methods = [m for m in ("loglik", "generate") if any(get(r.metrics, "accuracy", phase, m) for r in runs)]
        methods = methods or ["loglik"]
        for method in methods:
            results = [get(r.metrics, "accuracy", phase, method) for r in runs]
            name = f"{PHASE_TITLES[phase]} {method}"
            rows.append((f"{name} examples (count)", [fmt(get(x, "n_examples"), "{:,}") for x in results]))
            rows.append((f"{name} acc (%, [95% Wilson CI])", [accuracy_cell(x, "acc_pct") for x in results]))
            if method == "loglik":
                rows.append((f"{name} acc_norm (%, [95% Wilson CI])", [accuracy_cell(x, "acc_norm_pct") for x in results]))
            else:
                rows.append((f"{name} parse failures (%)", [fmt(get(x, "parse_failure_pct"), "{:.2f}") for x in results]))
    return rows


def _settings_rows(runs: Sequence[Run]) -> list[Row]:
    """Only the profile and engine settings that differ between runs."""
    rows = []
    for kind, read in (("setting", profile_settings), ("engine", engine_settings)):
        settings = [read(r) for r in runs]
        for key in sorted({k for s in settings for k in s} - {"name"}):
            values = [_setting_text(s[key]) if key in s else NA for s in settings]
            if len(set(values)) > 1:
                rows.append((f"{kind}: {key}", values))
    return rows


def _setting_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def ratio_rows(runs: Sequence[Run]) -> list[Row]:
    """Each later run against the first: speed-ups (x) and savings (%)."""
    first, others = runs[0], runs[1:]
    rows: list[Row] = []

    def add(label: str, value_of: Callable[[Run], Any], ratio: Callable[[float, float], float], spec: str) -> None:
        base = value_of(first)
        values = []
        for run in others:
            value = value_of(run)
            ok = isinstance(base, (int, float)) and isinstance(value, (int, float)) and base > 0 and value > 0
            values.append(fmt(ratio(base, value) if ok else None, spec))
        rows.append((label, values))

    faster = lambda base, value: value / base
    shorter = lambda base, value: base / value
    saved = lambda base, value: 100 * (base - value) / base
    add("speed-up, train non-padding tokens/s (x)", lambda r: get(r.metrics, "timing", "train_tokens_per_s"), faster, "{:.2f}x")
    add("speed-up, training-step non-padding tokens/s (x)",
        training_steps_tokens_per_s, faster, "{:.2f}x")
    add("speed-up, train samples/s (x)", lambda r: get(r.metrics, "timing", "train_samples_per_s"), faster, "{:.2f}x")
    add("speed-up, train runtime (x, first's / this)", lambda r: get(r.metrics, "timing", "train_runtime_s"), shorter, "{:.2f}x")
    add("speed-up, wall time (x, first's / this)", lambda r: get(r.metrics, "timing", "wall_s"), shorter, "{:.2f}x")
    add("memory saved, GPU peak used (NVML), train (%)", peak_nvml_train_mib, saved, "{:+.1f}%")
    for kind in ("allocated", "reserved"):
        add(f"memory saved, torch peak {kind}, train (%)",
            lambda r, k=kind: get(r.metrics, "memory", "torch", "train", f"max_{k}_mib"), saved, "{:+.1f}%")
    add("disk saved, checkpoints (%)", lambda r: get(r.metrics, "disk", "checkpoints_mib"), saved, "{:+.1f}%")
    return rows


def time_header(runs: Sequence[Run]) -> list[str]:
    """The time table's columns: each run's seconds and share of its wall clock, then each later run / the first."""
    first = runs[0].label
    per_run = [cell for r in runs for cell in (f"{r.label} (s)", f"{r.label} (% of wall)")]
    return ["phase", "what it measures", *per_run, *[f"{r.label} / {first} (x)" for r in runs[1:]]]


def time_rows(runs: Sequence[Run]) -> list[list[str]]:
    """Where the time went, under time_header: each phase of timing.phases_s, their sum, the wall clock, train
    runtime, and both training throughputs (non-padding tokens/s)."""
    phases = [time_phases(r.metrics) for r in runs]
    walls = [get(r.metrics, "timing", "wall_s") for r in runs]
    descriptions = dict(TIME_PHASES)
    extra = sorted({name for p in phases if p for name in p} - set(descriptions))  # newer than this code
    rows = []

    def add(label: str, what: str, values: list[Any], spec: str, share: bool = True) -> None:
        cells = []
        for value, wall_s in zip(values, walls):
            if value is NOT_RECORDED:
                cells += [NOT_RECORDED, ""]
                continue
            share_pct = 100 * value / wall_s if _positive(wall_s) and isinstance(value, (int, float)) else None
            cells += [fmt(value, spec), fmt(share_pct, "{:.1f}%") if share else ""]  # a rate has no share
        base = values[0]
        ratios = [fmt(v / base if _positive(base) and _positive(v) else None, "{:.2f}x") for v in values[1:]]
        rows.append([label, what, *cells, *ratios])

    names = [n for n, _ in TIME_PHASES] + extra if any(phases) else []  # no run records phases: no phase rows
    for name in names:
        # Absent from a run that records phases: that phase did not happen (0 s).
        values = [NOT_RECORDED if p is None else p.get(name, 0.0) for p in phases]
        add(name, descriptions.get(name, "a phase this version of tools.compare does not know"), values, "{:,.1f}")
    if names:
        add("all phases", "their sum: the wall clock, when every second is claimed",
            [NOT_RECORDED if p is None else sum(p.values()) for p in phases], "{:,.1f}")
    add("wall clock", "the process, from its start to the end of the run (timing.wall_s)", walls, "{:,.1f}")
    add("train runtime", "the Trainer's train_runtime: training steps, selection passes and checkpoint saves",
        [get(r.metrics, "timing", "train_runtime_s") for r in runs], "{:,.1f}")
    add("training-step throughput (non-padding tokens/s)",
        "non-padding tokens / (train runtime - selection passes - checkpoint saves): the training steps alone",
        [training_steps_tokens_per_s(r) for r in runs], "{:,.0f}", share=False)
    add("train throughput (non-padding tokens/s)",
        "non-padding tokens / train runtime: selection passes and saves included",
        [get(r.metrics, "timing", "train_tokens_per_s") for r in runs], "{:,.0f}", share=False)
    return rows


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and value > 0


def comparison_rows(found: Sequence[Comparison]) -> list[list[str]]:
    """The paired-test table, under COMPARISON_HEADER."""
    rows = []
    for comp in found:
        t = comp.test
        rows.append([
            comp.what,
            f"{t.n_common:,}",
            f"{t.acc_first_pct:.2f}",
            f"{t.acc_second_pct:.2f}",
            f"{t.diff_pts:+.2f} [{t.diff_low_pts:+.1f}, {t.diff_high_pts:+.1f}]",
            f"{t.b} / {t.c}",
            f"{t.p_value:.4g}",
            t.verdict(),
        ])
    return rows
