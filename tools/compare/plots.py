"""The report's plots (PNG, matplotlib's Agg backend): where the time went, a stacked bar per run; GPU memory over
time, one panel per run; training loss per optimizer step; selection accuracy per epoch. A plot with no data in any
run is skipped, with a note."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.artifacts import TIME_PHASES
from tools.compare.runs import GpuSample, Run, get, time_phases

RUN_LINESTYLES = ("-", "--", "-.", ":")  # with the colour, so that identical curves still show every run
RUN_MARKERS = ("o", "s", "^", "D", "v")
# One colour per time phase, the same in every report; the monitor's phases below share their time phase's.
TIME_PHASE_COLOURS = {
    "startup": "tab:olive", "eval_zero_shot": "tab:blue", "train_steps": "tab:orange", "select": "tab:green",
    "checkpoint_save": "tab:red", "checkpoint_wait": "tab:pink", "load_best": "tab:purple",
    "eval_fine_tuned": "tab:cyan", "final_save": "tab:brown", "other": "tab:gray",
}
UNKNOWN_PHASE_COLOUR = "black"  # a time phase newer than this code
# densenetsmi.txt's phases (MONITOR_PHASES); an older or unknown label is shaded grey.
PHASE_SHADES = {
    "eval": "tab:blue", "train": "tab:orange", "select": "tab:green", "save": "tab:red", "load": "tab:purple",
}
TIME_PLOT = "compare_time_phases.png"


@dataclass
class Plot:
    title: str
    file: str | None  # None: skipped
    note: str = ""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_style(index: int) -> dict[str, Any]:
    """Colour, line style and marker of the run at `index`, the same in every plot."""
    return {
        "color": _pyplot().get_cmap("tab10")(index % 10),
        "linestyle": RUN_LINESTYLES[index % len(RUN_LINESTYLES)],
        "marker": RUN_MARKERS[index % len(RUN_MARKERS)],
    }


def _save(fig: Any, out_dir: Path, name: str) -> str:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


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
        _gpu_memory_panel(ax, run, index)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("time since the run's monitoring started (s)")
    return Plot(title, _save(fig, out_dir, "compare_gpu_memory.png"), note)


def _gpu_memory_panel(ax: Any, run: Run, index: int) -> None:
    """The run's phases shaded, and one line per GPU in the run's style."""
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


def plot_time_phases(runs: Sequence[Run], out_dir: Path) -> Plot:
    """One horizontal bar per run, its wall clock stacked by phase (timing.phases_s), first run on top."""
    title = "Where the time went: each run's wall clock by phase"
    recorded = [(r, time_phases(r.metrics)) for r in runs]
    shown = [(r, p) for r, p in recorded if p]
    missing = [r.label for r, p in recorded if not p]
    note = f"not recorded in {', '.join(missing)}: no timing.phases_s" if missing else ""
    if not shown:
        return Plot(title, None, note + ": plot skipped")
    known = [name for name, _ in TIME_PHASES]
    names = known + sorted({n for _, p in shown for n in p} - set(known))
    totals_s = [get(r.metrics, "timing", "wall_s") or sum(p.values()) for r, p in shown]
    longest_s = max(max(totals_s), max(sum(p.values()) for _, p in shown), 1e-9)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 2.4 + 0.7 * len(shown)))
    y = list(range(len(shown)))
    lefts_s = [0.0] * len(shown)
    for name in names:
        widths_s = [p.get(name, 0.0) for _, p in shown]
        if not any(w > 0 for w in widths_s):
            continue  # a phase no run had: no legend entry
        ax.barh(y, widths_s, left=lefts_s, height=0.6, color=TIME_PHASE_COLOURS.get(name, UNKNOWN_PHASE_COLOUR),
                edgecolor="white", linewidth=0.8, label=name)
        for row, (left_s, width_s) in enumerate(zip(lefts_s, widths_s)):
            if width_s >= 0.04 * longest_s:  # the seconds inside segments wide enough to hold them
                ax.text(left_s + width_s / 2, row, f"{width_s:,.0f}", ha="center", va="center", fontsize="small")
        lefts_s = [left + width for left, width in zip(lefts_s, widths_s)]
    for row, (end_s, total_s) in enumerate(zip(lefts_s, totals_s)):
        ax.text(end_s, row, f"  {total_s:,.0f} s", va="center", fontsize="small")
    ax.set_yticks(y, [r.label for r, _ in shown])
    ax.invert_yaxis()  # the first run (the reference) on top
    ax.set_xlim(0, 1.15 * longest_s)
    ax.set(title=title, xlabel="seconds of the process's wall clock (s); segments in the order they happen")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=5, fontsize="small", frameon=False)
    return Plot(title, _save(fig, out_dir, TIME_PLOT), note)


def make_plots(runs: Sequence[Run], out_dir: Path) -> list[Plot]:
    """The four plots, written into out_dir (or skipped, with a note)."""
    return [
        plot_time_phases(runs, out_dir),
        plot_gpu_memory(runs, out_dir),
        plot_series(runs, out_dir, "Training loss per optimizer step", "compare_train_loss.png",
                    "loss_per_step", "step", "loss", ("optimizer step", "training loss (nats/token)")),
        plot_series(runs, out_dir, "Selection-slice accuracy per epoch", "compare_selection_accuracy.png",
                    "selection_accuracy_per_epoch", "epoch", "accuracy_pct", ("epoch", "accuracy (%)")),
    ]
