"""compare.md and the console text: the tables, the warnings (what makes the comparison unfair, what could not
be tested), the notes on missing data and the plots. write_report(run_dirs, out_dir) is the whole job."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.compare.caveats import cpu_warnings
from tools.compare.plots import TIME_PLOT, Plot, make_plots
from tools.compare.runs import Run, engine_settings, get, load_run, time_phases, unique_labels
from tools.compare.stats import Comparison, find_comparisons
from tools.compare.tables import (
    COMPARISON_HEADER,
    comparison_rows,
    markdown_table,
    measurement_rows,
    ratio_rows,
    time_header,
    time_rows,
)

REPORT_NAME = "compare.md"
# Arguments that name where or how a run was started, not what it measured.
IGNORED_EXPERIMENT_KEYS = ("output_dir", "overwrite", "resume")


@dataclass
class Report:
    markdown: str
    console: str
    plots: list[Plot]
    path: Path | None = None  # where compare.md was written


def write_report(run_dirs: Sequence[Path], out_dir: Path | None = None) -> Report:
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


def build_report(runs: Sequence[Run], out_dir: Path) -> Report:
    """The report's text, the plots written into out_dir (their links are relative to it)."""
    plots = make_plots(runs, out_dir)
    found, skipped = find_comparisons(runs)
    first = runs[0].label
    measurements = markdown_table(
        ["measure (unit)", *[r.label for r in runs]], [[label, *v] for label, v in measurement_rows(runs)]
    )
    ratios = markdown_table(
        [f"vs {first} (unit)", *[r.label for r in runs[1:]]], [[label, *v] for label, v in ratio_rows(runs)]
    )
    times = markdown_table(time_header(runs), time_rows(runs))
    time_plot = next((p for p in plots if p.file == TIME_PLOT), None)  # None: no run records its phases
    tests = markdown_table(COMPARISON_HEADER, comparison_rows(found)) if found else "No paired test could be run."
    warnings = experiment_differences(runs) + cpu_warnings(runs) + id_mismatch_notes(found) + skipped
    run_notes = [f"**{r.label}**: {note}" for r in runs for note in r.notes]
    sections = [
        f"# Run comparison: {', '.join(r.label for r in runs)}",
        _bullets([f"**{r.label}**: `{os.path.relpath(r.path.resolve(), out_dir.resolve())}` (status {r.status})" for r in runs]),
        ("Every accuracy carries its 95% Wilson interval; `n/a` means not measured (see the notes). "
         "How to read this report: docs/compare.md."),
        "## Measurements\n\n" + measurements,
        _time_section(runs, times, time_plot is not None),
        f"## Ratios to {first}\n\nSpeed-ups above 1x are faster; savings above 0% use less.\n\n" + ratios,
        "## Accuracy differences\n\n"
        "Paired on example id. b = first right and second wrong, c = the reverse; McNemar's exact test asks "
        "whether b and c differ more than chance would make them. The interval is Newcombe's for paired "
        "accuracies. *Not significant* means the data cannot tell the runs apart, not that they are equal.\n\n"
        + tests,
    ]
    if warnings:
        sections.append("## Warnings\n\n" + _bullets(warnings))
    if run_notes:
        sections.append("## Missing or partial data\n\n" + _bullets(run_notes))
    sections.append("## Plots\n\n" + "\n\n".join(_plot_markdown(p) for p in plots))
    markdown = "\n\n".join(sections) + "\n"
    console_parts = [measurements, times, ratios, tests]
    if warnings or run_notes:
        console_parts.append("\n".join(f"note: {w}" for w in warnings + [n.replace("**", "") for n in run_notes]))
    return Report(markdown, "\n\n".join(console_parts), plots)


def _time_section(runs: Sequence[Run], table: str, has_plot: bool) -> str:
    """The time table with what its columns mean, and the link to its plot."""
    columns = "columns are" if len(runs) > 2 else "column is"
    text = (
        "Each phase of the process's wall clock (metrics.json's timing.phases_s), in seconds and as a share of the "
        f"run's wall clock; the last {columns} this run / {runs[0].label}, so below 1x is less time and, for the "
        "throughputs, above 1x is faster. The training-step throughput counts the training steps alone; the "
        "Trainer's train runtime also holds the selection passes and checkpoint saves."
    )
    if any(time_phases(r.metrics) for r in runs):
        text += " `not recorded`: a run from before the phases were recorded."
    else:
        text += " No run here records its phases (they predate timing.phases_s): only the totals are shown."
    if has_plot:
        text += f" At a glance: [{TIME_PLOT}]({TIME_PLOT})."
    return f"## Where the time went (s)\n\n{text}\n\n{table}"


def experiment_differences(runs: Sequence[Run]) -> list[str]:
    """Experiment arguments, engine settings and set-up (meant to be identical across runs) that are not."""
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
    world_sizes = [get(r.metrics, "world_size") for r in runs]
    if len(set(world_sizes) - {None}) > 1:
        pairs = ", ".join(f"{r.label}={w}" for r, w in zip(runs, world_sizes) if w is not None)
        notes.append(f"the runs used different numbers of GPUs ({pairs}): throughput is over all GPUs, memory per GPU")
    for r in runs:
        if get(r.metrics, "train", "resumed_from"):
            notes.append(f"{r.label} was resumed (from {get(r.metrics, 'train', 'resumed_from')}): its wall clock, train "
                         "runtime, time phases and mean train loss cover the last session only, so they do not compare "
                         "whole runs")
    return notes


def id_mismatch_notes(found: Sequence[Comparison]) -> list[str]:
    """The paired tests whose runs scored different example ids."""
    return [
        f"{c.what}: the runs scored different examples ({c.test.only_first} only in the first, "
        f"{c.test.only_second} only in the second); tested on the {c.test.n_common} they share"
        for c in found
        if c.test.only_first or c.test.only_second
    ]


def _bullets(items: Sequence[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def _plot_markdown(plot: Plot) -> str:
    if plot.file is None:
        return f"**{plot.title}**: {plot.note}."
    note = f"\n\n({plot.note}.)" if plot.note else ""
    return f"![{plot.title}]({plot.file}){note}"
