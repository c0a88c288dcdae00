"""The report's plots (PNG, matplotlib's Agg backend): GPU memory over time, one panel per run; training loss per
optimizer step; selection accuracy per epoch. A plot with no data in any run is skipped, with a note."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tools.compare.runs import GpuSample, Run, get

RUN_LINESTYLES = ("-", "--", "-.", ":")  # with the colour, so that identical curves still show every run
RUN_MARKERS = ("o", "s", "^", "D", "v")
PHASE_SHADES = {"eval": "tab:blue", "train": "tab:orange", "select": "tab:green"}


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


def make_plots(runs: Sequence[Run], out_dir: Path) -> list[Plot]:
    """The three plots, written into out_dir (or skipped, with a note)."""
    return [
        plot_gpu_memory(runs, out_dir),
        plot_series(runs, out_dir, "Training loss per optimizer step", "compare_train_loss.png",
                    "loss_per_step", "step", "loss", ("optimizer step", "training loss (nats/token)")),
        plot_series(runs, out_dir, "Selection-slice accuracy per epoch", "compare_selection_accuracy.png",
                    "selection_accuracy_per_epoch", "epoch", "accuracy_pct", ("epoch", "accuracy (%)")),
    ]
