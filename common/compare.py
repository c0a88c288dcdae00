"""Compare two or more run directories: a Markdown report with tables, plots and paired significance tests.

    python3 -m common.compare runs/baseline runs/modified [--out DIR]

Writes DIR/compare.md and DIR/compare_*.png (DIR defaults to the first run's parent) and prints the tables.
Every number carries its unit; accuracy differences carry McNemar's exact test and a 95% interval, so that a
difference of a few examples is not read as a gain. See docs/compare.md for how to read the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from scipy.stats import binom, norm

from common import artifacts
from common.artifacts import CONFIG, GPU_LOG, METRICS, PHASES

REPORT_NAME = "compare.md"
PHASE_TITLES = {"zero_shot": "zero-shot", "fine_tuned": "fine-tuned"}
TORCH_PHASE_TITLES = {"train": "train", "eval_zero_shot": "zero-shot eval", "eval": "fine-tuned eval"}
ALPHA = 0.05  # significance level of every test in the report
Z_95 = float(norm.ppf(1 - ALPHA / 2))
NA = "n/a"
STATUS_MEANING = {
    "interrupted": "stopped early by Ctrl-C or SIGTERM",
    "failed": "stopped early by an error",
    "running": "still running, or killed without a chance to record it (SIGKILL, out of memory, power loss)",
}
# Arguments that name where or how a run was started, not what it measured.
IGNORED_EXPERIMENT_KEYS = ("output_dir", "overwrite", "resume")


class NotARunError(ValueError):
    """The directory holds no run; the message is the one-line error shown to the user."""


# ---- loading -------------------------------------------------------------------------------------------------


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
    status = metrics.get("status")
    if metrics and status is None:
        notes.append(f"{METRICS} has no 'status': whether the run finished is unknown")
    elif metrics and status != "finished":
        why = STATUS_MEANING.get(status, "the run did not finish")
        notes.append(f"status is {status!r}, not 'finished': {why}; its numbers cover only what it completed")
    for section in ("timing", "train", "accuracy", "memory"):
        if metrics and section not in metrics:
            notes.append(f"{METRICS} has no '{section}' section")
    gpu_samples = _read_gpu_log(path / GPU_LOG, notes)
    predictions = _read_all_predictions(path, metrics, config, notes)
    return Run(path, label or path.name, metrics, config, gpu_samples, predictions, notes)


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


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """Directory names, or longer relative paths where two runs share a name."""
    names = [p.name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [os.path.relpath(p) for p in paths]


# ---- statistics ----------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion, as fractions; good at small n and near 0 or 1."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs b and c (1 when there are none)."""
    if b + c == 0:
        return 1.0
    return min(1.0, 2 * float(binom.cdf(min(b, c), b + c, 0.5)))


def paired_difference_interval(both: int, first_only: int, second_only: int, neither: int) -> tuple[float, float]:
    """95% interval for accuracy(second) - accuracy(first) on the same examples, as fractions.

    Newcombe's (1998) square-and-add interval for paired proportions, as in Fagerland, Lydersen & Laake,
    "Statistical Analysis of Contingency Tables" (ch. 8): the Wilson intervals of the two accuracies, combined
    with a continuity-corrected estimate of their correlation.
    """
    n = both + first_only + second_only + neither
    if n == 0:
        return (-1.0, 1.0)
    right1, right2 = both + first_only, both + second_only
    p1, p2 = right1 / n, right2 / n
    l1, u1 = wilson_interval(right1, n)
    l2, u2 = wilson_interval(right2, n)
    margins = right1 * (n - right1) * right2 * (n - right2)
    phi = 0.0
    if margins > 0:
        cross = both * neither - first_only * second_only
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    d = p2 - p1
    low = d - math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)))
    high = d + math.sqrt(max(0.0, (u2 - p2) ** 2 + (p1 - l1) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1)))
    return (max(-1.0, low), min(1.0, high))


@dataclass(frozen=True)
class PairedTest:
    n_common: int
    only_first: int  # example ids scored by the first run alone
    only_second: int
    right_first: int
    right_second: int
    b: int  # first right, second wrong
    c: int  # first wrong, second right
    p_value: float
    diff_low_pts: float
    diff_high_pts: float

    @property
    def acc_first_pct(self) -> float:
        return 100 * self.right_first / self.n_common

    @property
    def acc_second_pct(self) -> float:
        return 100 * self.right_second / self.n_common

    @property
    def diff_pts(self) -> float:
        return self.acc_second_pct - self.acc_first_pct

    def verdict(self) -> str:
        if self.b + self.c == 0:
            return "same examples right in both: nothing to test"
        level = f"{100 * ALPHA:g}%"
        if self.p_value < ALPHA:
            return f"significant at {level}"
        return f"not significant at {level}: may be noise"


def paired_test(first: dict[str, bool], second: dict[str, bool]) -> PairedTest | None:
    """McNemar's exact test and the paired 95% interval on the example ids both runs scored."""
    common = sorted(first.keys() & second.keys())
    if not common:
        return None
    b = sum(first[i] and not second[i] for i in common)
    c = sum(second[i] and not first[i] for i in common)
    both = sum(first[i] and second[i] for i in common)
    low, high = paired_difference_interval(both, b, c, len(common) - both - b - c)
    return PairedTest(
        n_common=len(common),
        only_first=len(first.keys() - second.keys()),
        only_second=len(second.keys() - first.keys()),
        right_first=both + b,
        right_second=both + c,
        b=b,
        c=c,
        p_value=mcnemar_exact_p(b, c),
        diff_low_pts=100 * low,
        diff_high_pts=100 * high,
    )


# Accuracy measures with per-example predictions: (method, prediction key, table name).
MEASURES = (("loglik", "prediction", "acc"), ("loglik", "prediction_norm", "acc_norm"), ("generate", "prediction", "acc"))


def correctness(records: dict[str, dict[str, Any]], key: str) -> dict[str, bool]:
    """Example id -> answered right; an unparsed answer (None) is wrong."""
    return {i: r.get(key) is not None and r.get(key) == r.get("label") for i, r in records.items()}


# ---- numbers -------------------------------------------------------------------------------------------------


def get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def fmt(value: Any, spec: str = "{:,.1f}") -> str:
    if value is None:
        return NA
    if isinstance(value, float) and not math.isfinite(value):
        return NA
    try:
        return spec.format(value)
    except (TypeError, ValueError):  # a hand-edited metrics.json: show what is there
        return str(value)


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


# ---- tables --------------------------------------------------------------------------------------------------

Row = tuple[str, list[str]]


def main_rows(runs: Sequence[Run]) -> list[Row]:
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


def profile_settings(run: Run) -> dict[str, Any]:
    return run.metrics.get("settings") or run.config.get("profile") or {}


def engine_settings(run: Run) -> dict[str, Any]:
    return run.metrics.get("engine") or run.config.get("engine") or {}


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

    def add(label: str, value_of: Callable[[Run], Any], compare: Callable[[float, float], float], spec: str) -> None:
        base = value_of(first)
        values = []
        for run in others:
            value = value_of(run)
            ok = isinstance(base, (int, float)) and isinstance(value, (int, float)) and base > 0 and value > 0
            values.append(fmt(compare(base, value) if ok else None, spec))
        rows.append((label, values))

    faster = lambda base, value: value / base  # noqa: E731 - higher is better
    shorter = lambda base, value: base / value  # noqa: E731 - lower is better
    saved = lambda base, value: 100 * (base - value) / base  # noqa: E731
    add("speed-up, train non-padding tokens/s (x)", lambda r: get(r.metrics, "timing", "train_tokens_per_s"), faster, "{:.2f}x")
    add("speed-up, train samples/s (x)", lambda r: get(r.metrics, "timing", "train_samples_per_s"), faster, "{:.2f}x")
    add("speed-up, train runtime (x, first's / this)", lambda r: get(r.metrics, "timing", "train_runtime_s"), shorter, "{:.2f}x")
    add("speed-up, wall time (x, first's / this)", lambda r: get(r.metrics, "timing", "wall_s"), shorter, "{:.2f}x")
    add("memory saved, GPU peak used (NVML), train (%)", peak_nvml_train_mib, saved, "{:+.1f}%")
    for kind in ("allocated", "reserved"):
        add(f"memory saved, torch peak {kind}, train (%)",
            lambda r, k=kind: get(r.metrics, "memory", "torch", "train", f"max_{k}_mib"), saved, "{:+.1f}%")
    add("disk saved, checkpoints (%)", lambda r: get(r.metrics, "disk", "checkpoints_mib"), saved, "{:+.1f}%")
    return rows


@dataclass(frozen=True)
class Comparison:
    what: str  # e.g. "modified vs baseline, fine-tuned loglik acc"
    test: PairedTest


def comparisons(runs: Sequence[Run]) -> tuple[list[Comparison], list[str]]:
    """Paired tests: each run against the first, and fine-tuned against zero-shot within each run."""
    found: list[Comparison] = []
    skipped: list[str] = []

    def compare(what: str, a: dict[str, dict] | None, b: dict[str, dict] | None, key: str) -> None:
        if a is None or b is None:
            return
        test = paired_test(correctness(a, key), correctness(b, key))
        if test is None:
            skipped.append(f"{what}: the runs share no example id")
        else:
            found.append(Comparison(what, test))

    first = runs[0]
    for run in runs[1:]:
        for phase in PHASES:
            for method in ("loglik", "generate"):
                a, b = first.predictions.get((phase, method)), run.predictions.get((phase, method))
                if (a is None) != (b is None):
                    missing = first if a is None else run
                    skipped.append(
                        f"no paired test of {run.label} vs {first.label}, {PHASE_TITLES[phase]} {method}: "
                        f"{missing.label} has no {artifacts.predictions(phase, method)}"
                    )
            for method, key, name in MEASURES:
                what = f"{run.label} vs {first.label}, {PHASE_TITLES[phase]} {method} {name}"
                compare(what, first.predictions.get((phase, method)), run.predictions.get((phase, method)), key)
    for run in runs:
        for method, key, name in MEASURES:
            what = f"{run.label}: fine-tuned vs zero-shot, {method} {name}"
            compare(what, run.predictions.get(("zero_shot", method)), run.predictions.get(("fine_tuned", method)), key)
    return found, skipped


def comparison_rows(found: Sequence[Comparison]) -> list[list[str]]:
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


def id_mismatch_notes(found: Sequence[Comparison]) -> list[str]:
    return [
        f"{c.what}: the runs scored different examples ({c.test.only_first} only in the first, "
        f"{c.test.only_second} only in the second); tested on the {c.test.n_common} they share"
        for c in found
        if c.test.only_first or c.test.only_second
    ]


def experiment_differences(runs: Sequence[Run]) -> list[str]:
    """Experiment arguments and engine settings (meant to be identical across runs) that are not."""
    configs = [get(r.config, "experiment") or {} for r in runs]
    known = [c for c in configs if c]
    keys = sorted({k for c in known for k in c} - set(IGNORED_EXPERIMENT_KEYS))
    notes = []
    for key in keys:
        values = [json.dumps(c.get(key)) for c in known]
        if len(set(values)) > 1:
            pairs = ", ".join(f"{r.label}={json.dumps(c.get(key))}" for r, c in zip(runs, configs) if c)
            notes.append(f"experiment argument '{key}' differs ({pairs}): check that the comparison is fair")
    engines = [engine_settings(r) for r in runs]
    for key in sorted({k for e in engines if e for k in e}):
        values = {json.dumps(e.get(key)) for e in engines if e}
        if len(values) > 1:
            pairs = ", ".join(f"{r.label}={json.dumps(e.get(key))}" for r, e in zip(runs, engines) if e)
            notes.append(f"engine setting '{key}' differs ({pairs}): speed and memory differ by more than the profile")
    devices = {get(r.metrics, "environment", "device") for r in runs} - {None}
    if len(devices) > 1:
        notes.append(f"the runs ran on different devices ({', '.join(sorted(devices))}): speed and memory differ by card too")
    return notes


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table padded to line up in a terminal too."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [list(header), *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


RUN_LINESTYLES = ("-", "--", "-.", ":")  # with the colour, so that identical curves still show every run
RUN_MARKERS = ("o", "s", "^", "D", "v")


def run_style(index: int) -> dict[str, Any]:
    """Colour, line style and marker of the run at `index`, the same in every plot."""
    return {
        "color": _pyplot().get_cmap("tab10")(index % 10),
        "linestyle": RUN_LINESTYLES[index % len(RUN_LINESTYLES)],
        "marker": RUN_MARKERS[index % len(RUN_MARKERS)],
    }


@dataclass
class Plot:
    title: str
    file: str | None  # None: skipped
    note: str = ""


def _save(fig: Any, out_dir: Path, name: str) -> str:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


PHASE_SHADES = {"eval": "tab:blue", "train": "tab:orange", "select": "tab:green"}


def phase_spans(samples: Sequence[GpuSample]) -> list[tuple[str, float, float]]:
    """(phase, start s, end s) for each stretch of consecutive samples in one phase; a stretch ends at the next."""
    spans: list[tuple[str, float, float]] = []
    for sample in sorted(samples, key=lambda s: s.elapsed_s):
        if spans and spans[-1][0] == sample.phase:
            spans[-1] = (sample.phase, spans[-1][1], sample.elapsed_s)
        else:
            if spans:
                spans[-1] = (spans[-1][0], spans[-1][1], sample.elapsed_s)
            spans.append((sample.phase, sample.elapsed_s, sample.elapsed_s))
    return spans


def plot_gpu_memory(runs: Sequence[Run], out_dir: Path) -> Plot:
    """One panel per run (their clocks differ), its train, select and eval phases shaded."""
    title = "GPU memory used (NVML) over time"
    missing = [r.label for r in runs if not r.gpu_samples]
    note = f"no GPU samples in {', '.join(missing)}" if missing else ""
    if len(missing) == len(runs):
        return Plot(title, None, note + " (CPU run, or GPU monitoring off): plot skipped")
    plt = _pyplot()
    shown = [r for r in runs if r.gpu_samples]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.2 + 2.3 * len(shown)), sharex=True, sharey=True,
                             squeeze=False)
    for index, (run, ax) in enumerate(zip(shown, axes[:, 0])):
        shaded = set()
        for phase, start_s, end_s in phase_spans(run.gpu_samples):
            ax.axvspan(start_s, end_s, color=PHASE_SHADES.get(phase, "tab:gray"), alpha=0.12, linewidth=0,
                       label=f"phase: {phase}" if phase not in shaded else None)
            shaded.add(phase)
        gpus = sorted({s.gpu for s in run.gpu_samples})
        for g, gpu in enumerate(gpus):
            points = [(s.elapsed_s, s.mem_used_mib) for s in run.gpu_samples if s.gpu == gpu]
            style = run_style(index)
            # Several GPUs of one run: the run's colour and line, a marker of its own per GPU.
            style["marker"] = None if len(gpus) == 1 else RUN_MARKERS[g % len(RUN_MARKERS)]
            ax.plot(*zip(*points), **style, label=run.label if len(gpus) == 1 else f"{run.label} {gpu}",
                    linewidth=1.4, markevery=max(1, len(points) // 12))
        ax.set(ylabel="used (MiB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("time since the run's monitoring started (s)")
    return Plot(title, _save(fig, out_dir, "compare_gpu_memory.png"), note)


def plot_series(
    runs: Sequence[Run], out_dir: Path, title: str, file: str, section: str, x: str, y: str, labels: tuple[str, str]
) -> Plot:
    """One line per run from a list of records in metrics.json's train section."""
    series = [[(p[x], p[y]) for p in get(r.metrics, "train", section) or [] if x in p and y in p] for r in runs]
    missing = [r.label for r, s in zip(runs, series) if not s]
    note = f"no data in {', '.join(missing)}" if missing else ""
    if len(missing) == len(runs):
        return Plot(title, None, note + ": plot skipped")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for index, (run, points) in enumerate(zip(runs, series)):
        if points:
            ax.plot(*zip(*points), **run_style(index), label=run.label, markersize=4, linewidth=1.4)
    ax.set(title=title, xlabel=labels[0], ylabel=labels[1])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return Plot(title, _save(fig, out_dir, file), note)


def make_plots(runs: Sequence[Run], out_dir: Path) -> list[Plot]:
    return [
        plot_gpu_memory(runs, out_dir),
        plot_series(runs, out_dir, "Training loss per optimizer step", "compare_train_loss.png",
                    "loss_per_step", "step", "loss", ("optimizer step", "training loss (nats/token)")),
        plot_series(runs, out_dir, "Selection-slice accuracy per epoch", "compare_selection_accuracy.png",
                    "selection_accuracy_per_epoch", "epoch", "accuracy_pct", ("epoch", "accuracy (%)")),
    ]


# ---- report --------------------------------------------------------------------------------------------------


@dataclass
class Report:
    markdown: str
    console: str
    plots: list[Plot]
    path: Path | None = None  # where compare.md was written


def build_report(runs: Sequence[Run], out_dir: Path) -> Report:
    plots = make_plots(runs, out_dir)
    found, skipped = comparisons(runs)
    first = runs[0].label
    main = markdown_table(["measure (unit)", *[r.label for r in runs]], [[label, *v] for label, v in main_rows(runs)])
    ratios = markdown_table(
        [f"vs {first} (unit)", *[r.label for r in runs[1:]]], [[label, *v] for label, v in ratio_rows(runs)]
    )
    tests = markdown_table(COMPARISON_HEADER, comparison_rows(found)) if found else "No paired test could be run."
    warnings = experiment_differences(runs) + id_mismatch_notes(found) + skipped
    run_notes = [f"**{r.label}**: {note}" for r in runs for note in r.notes]

    def bullets(items: Sequence[str]) -> str:
        return "\n".join(f"- {item}" for item in items)

    sections = [
        f"# Run comparison: {', '.join(r.label for r in runs)}",
        bullets([f"**{r.label}**: `{os.path.relpath(r.path.resolve(), out_dir.resolve())}` (status {r.status})" for r in runs]),
        "Every accuracy carries its 95% Wilson interval; `n/a` means not measured (see the notes). "
        "How to read this report: docs/compare.md.",
        "## Measurements\n\n" + main,
        f"## Ratios to {first}\n\nSpeed-ups above 1x are faster; savings above 0% use less.\n\n" + ratios,
        "## Accuracy differences\n\n"
        "Paired on example id. b = first right and second wrong, c = the reverse; McNemar's exact test asks "
        "whether b and c differ more than chance would make them. The interval is Newcombe's for paired "
        "accuracies. *Not significant* means the data cannot tell the runs apart, not that they are equal.\n\n"
        + tests,
    ]
    if warnings:
        sections.append("## Warnings\n\n" + bullets(warnings))
    if run_notes:
        sections.append("## Missing or partial data\n\n" + bullets(run_notes))
    sections.append("## Plots\n\n" + "\n\n".join(_plot_markdown(p) for p in plots))
    markdown = "\n\n".join(sections) + "\n"
    console_parts = [main, ratios, tests]
    if warnings or run_notes:
        console_parts.append("\n".join(f"note: {w}" for w in warnings + [n.replace("**", "") for n in run_notes]))
    return Report(markdown, "\n\n".join(console_parts), plots)


def _plot_markdown(plot: Plot) -> str:
    if plot.file is None:
        return f"**{plot.title}**: {plot.note}."
    note = f"\n\n({plot.note}.)" if plot.note else ""
    return f"![{plot.title}]({plot.file}){note}"


def compare(run_dirs: Sequence[Path], out_dir: Path | None = None) -> Report:
    """Load the runs, write compare.md and the plots into out_dir; returns the report."""
    paths = [Path(p) for p in run_dirs]
    labels = unique_labels(paths)
    runs = [load_run(p, label) for p, label in zip(paths, labels)]
    out_dir = Path(out_dir) if out_dir is not None else paths[0].resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(runs, out_dir)
    report.path = out_dir / REPORT_NAME
    report.path.write_text(report.markdown, encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m common.compare",
        description="Compare run directories: a Markdown report (compare.md) with tables, plots and significance tests.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    parser.add_argument("--out", type=Path, default=None, help="where compare.md and the plots go (default: the first run's parent)")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two run directories, e.g. runs/baseline runs/modified")
    try:
        report = compare(args.runs, args.out)
    except NotARunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. --out not writable
        print(f"error: cannot write the report: {err}", file=sys.stderr)
        return 1
    print(report.console)
    written = [p.file for p in report.plots if p.file]
    print(f"\nwrote {report.path}" + (f" and {', '.join(written)}" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
