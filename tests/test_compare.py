"""tools.compare: the report from two real --smoke runs, partial runs, the statistics, the plots, the errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from matplotlib.image import imread
from scipy.stats import binomtest

from common.artifacts import MONITOR_PHASES, TIME_PHASES
from common.monitor import MIB, GpuMonitor
from tools.compare import plots
from tools.compare.__main__ import main
from tools.compare.plots import PHASE_SHADES, TIME_PHASE_COLOURS, TIME_PLOT, phase_spans
from tools.compare.report import write_report
from tools.compare.runs import GpuSample, NotARunError, load_run
from tools.compare.stats import mcnemar_exact_p, paired_difference_interval, paired_test, wilson_interval

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(smoke_runs: dict[str, Path]) -> tuple[Path, Path]:
    """The README's two --smoke runs (conftest's session fixture), baseline first."""
    return smoke_runs["baseline.py"], smoke_runs["modified.py"]


@pytest.fixture(scope="module")
def both_methods_run(runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An --eval-only run of the baseline's final model scored by both methods (evaluation only: no training)."""
    run_dir = tmp_path_factory.mktemp("both") / "eval-both"
    done = subprocess.run(
        [sys.executable, "baseline.py", "--smoke", "--eval-only", "--model", str(runs[0]), "--eval-method", "both",
         "--eval-samples", "10", "--output-dir", str(run_dir)],
        cwd=ROOT, env=OFFLINE_ENV, check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    """A copy without the model files, for tests that damage it."""
    return Path(shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("checkpoint-*", "final_model", "runs")))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def table_row(markdown: str, label: str) -> list[str]:
    """The cells after the label of the table row labelled `label` (or, failing that, starting with it)."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")
    ]
    for matches in (lambda first: first == label, lambda first: first.startswith(label)):
        for cells in rows:
            if matches(cells[0]):
                return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{markdown}")


# ---- the report from two real runs ---------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the README's runs, made on a CPU, have no GPU memory to report")
def test_cli_report_from_two_smoke_runs(runs: tuple[Path, Path]) -> None:
    baseline, modified = runs
    done = subprocess.run(
        [sys.executable, "-m", "tools.compare", str(baseline), str(modified)],
        cwd=ROOT, env=OFFLINE_ENV, check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out_dir = baseline.parent  # the default --out: the first run's parent
    report = (out_dir / "compare.md").read_text()
    metrics = json.loads((baseline / "metrics.json").read_text())

    # The printed table is the report's table.
    assert table_row(done.stdout, "wall time (s)") == table_row(report, "wall time (s)")
    assert table_row(report, "wall time (s)")[0] == f"{metrics['timing']['wall_s']:,.1f}"
    assert table_row(report, "train throughput (non-padding tokens/s)")[0] == f"{metrics['timing']['train_tokens_per_s']:,.0f}"
    assert table_row(report, "status") == ["finished", "finished"]
    assert table_row(report, "setting: precision") == ["fp32", "mixed"]
    settings = [json.loads((run / "metrics.json").read_text())["settings"] for run in runs]
    for key in settings[0].keys() - {"name"}:
        assert (f"| setting: {key} " in report) == (settings[0][key] != settings[1][key]), key  # only those that differ
    for label in (
        "train runtime (s)", "train throughput (samples/s)", "GPU memory used (NVML), peak, train (MiB)",
        "GPU memory used (NVML), mean, train (MiB)", "torch peak allocated, train (MiB)",
        "torch peak reserved, fine-tuned eval (MiB)", "checkpoints on disk (MiB)",
        "train loss, mean over the run (nats/token)", "zero-shot loglik examples (count)",
        "fine-tuned loglik acc (%, [95% Wilson CI])", "fine-tuned loglik acc_norm (%, [95% Wilson CI])",
        "speed-up, train non-padding tokens/s (x)", "speed-up, train runtime (x", "memory saved, torch peak allocated",
        "disk saved, checkpoints (%)",
    ):
        table_row(report, label)
    acc = metrics["accuracy"]["fine_tuned"]["loglik"]["acc_pct"]
    assert table_row(report, "fine-tuned loglik acc (%")[0].startswith(f"{acc:.2f} [")
    # No CUDA here: memory cells say n/a, and the report says why.
    assert table_row(report, "GPU memory used (NVML), peak, train (MiB)") == ["n/a", "n/a"]
    assert "no GPU samples" in report and "GPU monitoring off" in report
    # Paired tests on the same examples, in words.
    test_cells = table_row(report, "modified vs baseline, fine-tuned loglik acc")
    assert test_cells[0] == "40" and "%" not in test_cells[-1]
    assert any(word in test_cells[-1] for word in ("not significant at 5%", "significant at 5%", "nothing to test"))
    # Plots: written, valid, referenced relatively; the GPU plot is skipped with a note.
    for name in ("compare_train_loss.png", "compare_selection_accuracy.png"):
        assert f"]({name})" in report
        assert_png(out_dir / name)
    assert not (out_dir / "compare_gpu_memory.png").exists()
    assert "**GPU memory used (NVML) over time**: no GPU samples in baseline, modified" in report


def test_a_method_only_one_run_scored_shows_in_its_rows_and_is_not_tested(runs, both_methods_run, tmp_path):
    md = write_report([both_methods_run, runs[0]], tmp_path / "out").markdown
    assert table_row(md, "zero-shot generate parse failures (%)")[0] != "n/a"
    assert table_row(md, "zero-shot generate parse failures (%)")[1] == "n/a"
    assert "zero-shot generate: baseline has no predictions_zero_shot_generate.jsonl" in md


def test_truncated_run_still_reports_with_notes(runs: tuple[Path, Path], tmp_path: Path) -> None:
    baseline, modified = runs
    broken = copy_run(modified, tmp_path / "interrupted")
    metrics = json.loads((broken / "metrics.json").read_text())
    metrics["status"] = "interrupted"
    del metrics["timing"], metrics["train"]["loss_per_step"]
    (broken / "metrics.json").write_text(json.dumps(metrics))
    (broken / "predictions_fine_tuned.jsonl").unlink()

    report = write_report([baseline, broken], tmp_path / "out")
    md = report.markdown
    assert "status is 'interrupted', not 'finished': stopped early by Ctrl-C or SIGTERM" in md
    assert "metrics.json has no 'timing' section" in md
    assert "predictions_fine_tuned.jsonl missing" in md
    assert "no paired test of interrupted vs baseline, fine-tuned loglik: interrupted has no predictions_fine_tuned.jsonl" in md
    assert table_row(md, "status") == ["finished", "interrupted"]
    assert table_row(md, "wall time (s)")[1] == "n/a" and table_row(md, "wall time (s)")[0] != "n/a"
    assert table_row(md, "speed-up, wall time") == ["n/a"]
    assert table_row(md, "interrupted vs baseline, zero-shot loglik acc")[0] == "40"  # what it has is still tested
    assert not re.search(r"^\| interrupted vs baseline, fine-tuned", md, re.MULTILINE)  # no predictions, no test
    assert "(no data in interrupted.)" in md  # the loss plot shows the baseline and says what is missing
    assert_png(tmp_path / "out" / "compare_train_loss.png")


def test_run_without_metrics_json(runs: tuple[Path, Path], tmp_path: Path) -> None:
    baseline, modified = runs
    partial = tmp_path / "killed"
    partial.mkdir()
    for name in ("config.json", "densenetsmi.txt"):
        shutil.copy(modified / name, partial / name)
    report = write_report([baseline, partial], tmp_path / "out").markdown
    assert "metrics.json missing" in report
    assert "predictions_zero_shot.jsonl missing" in report
    assert table_row(report, "status") == ["finished", "unknown"]
    assert table_row(report, "train runtime (s)")[1] == "n/a"


def test_different_example_ids_are_said_and_only_common_ones_tested(runs: tuple[Path, Path], tmp_path: Path) -> None:
    baseline, modified = runs
    other = copy_run(modified, tmp_path / "other")
    path = other / "predictions_zero_shot.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    extra = {**records[0], "id": "validation-9999"}
    path.write_text("".join(json.dumps(r) + "\n" for r in [*records[5:], extra]))
    md = write_report([baseline, other], tmp_path / "out").markdown
    assert "scored different examples (5 only in the first, 1 only in the second); tested on the 35 they share" in md
    assert table_row(md, "other vs baseline, zero-shot loglik acc")[0] == "35"


def test_gpu_memory_plot_from_monitor_logs(runs: tuple[Path, Path], tmp_path: Path) -> None:
    copies = [copy_run(run, tmp_path / run.name) for run in runs]
    write_gpu_log(copies[0] / "densenetsmi.txt", [("train", 3000.0), ("train", 5000.0), ("eval", 2000.0)])
    write_gpu_log(copies[1] / "densenetsmi.txt", [("train", 2000.0), ("train", 2500.0), ("eval", 1500.0)])
    report = write_report(copies, tmp_path / "out")
    assert_png(tmp_path / "out" / "compare_gpu_memory.png")
    md = report.markdown
    assert "](compare_gpu_memory.png)" in md
    assert table_row(md, "GPU memory used (NVML), peak, train (MiB)") == ["5,000", "2,500"]
    assert table_row(md, "GPU memory used (NVML), mean, train (MiB)") == ["4,333", "2,333"]  # 3000, 5000, 5000
    assert table_row(md, "GPU memory used (NVML), peak, eval (MiB)") == ["2,000", "1,500"]
    assert table_row(md, "memory saved, GPU peak used (NVML), train (%)") == ["+50.0%"]


def test_phase_spans_cover_each_stretch_of_one_phase_until_the_next_begins() -> None:
    samples = [GpuSample(t, phase, "GPU0", 1.0) for t, phase in
               [(0.0, "eval"), (1.0, "eval"), (2.0, "train"), (3.0, "train"), (4.0, "select"), (5.0, "train")]]
    assert phase_spans(samples) == [("eval", 0.0, 2.0), ("train", 2.0, 4.0), ("select", 4.0, 5.0),
                                            ("train", 5.0, 5.0)]


class _FakeNvml:
    """Just enough NVML for GpuMonitor: one GPU whose used memory the test sets before each sample."""

    NVMLError = RuntimeError

    def __init__(self) -> None:
        self.used_mib = 0.0

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return 1
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlDeviceGetUUID(self, h: int) -> str: return "GPU-0000"
    def nvmlDeviceGetName(self, h: int) -> str: return "Fake GPU"
    def nvmlDeviceGetPowerUsage(self, h: int) -> int: return 100_000
    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace: return SimpleNamespace(gpu=90, memory=30)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=self.used_mib * MIB, total=80_000 * MIB)


def write_gpu_log(path: Path, samples: list[tuple[str, float]]) -> None:
    """densenetsmi.txt as common.monitor writes it, from (phase, MiB used) samples; the monitor adds a phase's closing
    reading (what it held last) at each phase change and at the end."""
    nvml = _FakeNvml()
    nvml.used_mib = samples[0][1]
    with GpuMonitor(path, interval_s=3600, console_every=0, nvml_module=nvml, print_fn=lambda _: None,
                    phase=samples[0][0], phases=None) as monitor:  # the first sample, taken on entry
        for phase, used_mib in samples[1:]:
            monitor.set_phase(phase)  # at a change, the ending phase's last reading
            nvml.used_mib = used_mib
            monitor.sample_now()


# ---- where the time went (synthetic metrics.json: the smoke runs' code may predate timing.phases_s) --------

BASELINE_TIMING = {
    "wall_s": 420.0,
    "phases_s": {"startup": 23.0, "eval_zero_shot": 12.0, "train_steps": 330.0, "select": 6.0, "checkpoint_save": 30.0,
                 "load_best": 4.0, "eval_fine_tuned": 10.0, "final_save": 3.0, "other": 2.0},  # no checkpoint_wait
    "train_runtime_s": 366.0, "train_tokens_per_s": 4_900.0, "train_steps_tokens_per_s": 5_438.0,
}
MODIFIED_TIMING = {
    "wall_s": 90.0,
    "phases_s": {"startup": 15.0, "eval_zero_shot": 4.0, "train_steps": 50.0, "select": 3.0, "checkpoint_save": 3.0,
                 "checkpoint_wait": 5.0, "load_best": 3.0, "eval_fine_tuned": 3.0, "final_save": 3.0, "other": 1.0},
    "train_runtime_s": 56.0, "train_tokens_per_s": 32_000.0, "train_steps_tokens_per_s": 36_000.0,
}
OLD_TIMING = {"wall_s": 128.0, "train_runtime_s": 117.6, "train_tokens_per_s": 14_892.0}  # before phases_s


def timing_run(path: Path, timing: dict) -> Path:
    """A run directory with only a finished metrics.json holding `timing`."""
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"status": "finished", "timing": timing}))
    return path


def test_time_table_puts_each_phase_side_by_side_and_says_what_is_not_recorded(tmp_path: Path) -> None:
    runs = [timing_run(tmp_path / name, timing) for name, timing in
            (("baseline", BASELINE_TIMING), ("modified", MODIFIED_TIMING), ("old", OLD_TIMING))]
    report = write_report(runs, tmp_path / "out")
    md = report.markdown
    section = md.split("## Where the time went (s)")[1].split("\n## ")[0]
    descriptions = dict(TIME_PHASES)
    # phase | what it measures | baseline s, % | modified s, % | old s, % | modified/baseline | old/baseline
    assert table_row(section, "train_steps") == [descriptions["train_steps"], "330.0", "78.6%", "50.0", "55.6%",
                                                 "not recorded", "", "0.15x", "n/a"]
    assert table_row(section, "checkpoint_save")[1:] == ["30.0", "7.1%", "3.0", "3.3%", "not recorded", "", "0.10x",
                                                         "n/a"]
    assert table_row(section, "checkpoint_wait")[1:6] == ["0.0", "0.0%", "5.0", "5.6%", "not recorded"]  # absent: 0
    assert table_row(section, "checkpoint_wait")[-2] == "n/a"  # no ratio to nothing
    phase_rows = [line.split("|")[1].strip() for line in section.splitlines()
                  if line.startswith("|") and line.split("|")[1].strip() in descriptions]
    assert phase_rows == [name for name, _ in TIME_PHASES]  # every phase, in the order they happen
    assert table_row(section, "all phases")[1:5] == ["420.0", "100.0%", "90.0", "100.0%"]
    assert table_row(section, "wall clock")[1:] == ["420.0", "100.0%", "90.0", "100.0%", "128.0", "100.0%", "0.21x",
                                                    "0.30x"]
    assert table_row(section, "train runtime")[1:3] == ["366.0", "87.1%"]
    # Both throughputs, with what each measures; a rate has no share of the wall clock.
    steps = table_row(section, "training-step throughput (non-padding tokens/s)")
    assert "train runtime - selection passes - checkpoint saves" in steps[0]
    assert steps[1:] == ["5,438", "", "36,000", "", "n/a", "", "6.62x", "n/a"]
    assert table_row(section, "train throughput (non-padding tokens/s)")[1:] == ["4,900", "", "32,000", "", "14,892", "",
                                                                                  "6.53x", "3.04x"]
    assert "**old**: metrics.json has no timing.phases_s" in md and "not recorded" in md
    assert "**baseline**: metrics.json has no timing.phases_s" not in md
    # The plot: written, linked from the time section and the plots, the old run named as not recorded.
    assert_png(tmp_path / "out" / TIME_PLOT)
    assert f"]({TIME_PLOT})" in section and f"![Where the time went: each run's wall clock by phase]({TIME_PLOT})" in md
    assert "(not recorded in old: no timing.phases_s.)" in md
    assert table_row(report.console, "train_steps") == table_row(section, "train_steps")  # printed too


def test_training_step_throughput_is_recomputed_with_one_formula_for_runs_that_recorded_another(tmp_path: Path):
    """Runs up to 2026-12-04 recorded it over the train_steps phase; a report beside a newer run must not divide two
    formulas, so it is recomputed from the run's tokens, train runtime, selection and save seconds."""
    phases = {**BASELINE_TIMING["phases_s"], "train_steps": 320.0, "select": 6.0, "checkpoint_save": 30.0}
    old_formula = {**BASELINE_TIMING, "phases_s": phases, "train_steps_tokens_per_s": 1_650_000 / 320.0}
    path = timing_run(tmp_path / "old-formula", old_formula)
    metrics = json.loads((path / "metrics.json").read_text())
    (path / "metrics.json").write_text(json.dumps({**metrics, "train": {"session_tokens": 1_650_000}}))
    section = write_report([path], tmp_path / "out").markdown.split("## Where the time went (s)")[1].split("\n## ")[0]
    assert table_row(section, "training-step throughput (non-padding tokens/s)")[1] == "5,000"  # 1.65 M / (366-6-30)


def test_a_resumed_run_and_a_different_gpu_count_are_warned_about(tmp_path: Path) -> None:
    whole = timing_run(tmp_path / "whole", BASELINE_TIMING)
    resumed = timing_run(tmp_path / "resumed", MODIFIED_TIMING)
    metrics = json.loads((resumed / "metrics.json").read_text())
    metrics.update(world_size=2, train={"resumed_from": "checkpoint-16", "optimizer_steps": 48})
    (resumed / "metrics.json").write_text(json.dumps(metrics))
    (whole / "metrics.json").write_text(json.dumps({**json.loads((whole / "metrics.json").read_text()), "world_size": 1}))
    md = write_report([whole, resumed], tmp_path / "out").markdown
    assert "resumed was resumed (from checkpoint-16)" in md and "cover the last session only" in md
    assert "different numbers of GPUs (whole=1, resumed=2)" in md
    alone = write_report([whole, timing_run(tmp_path / "again", BASELINE_TIMING)], tmp_path / "out2").markdown
    assert "was resumed" not in alone and "numbers of GPUs" not in alone


def test_time_table_of_runs_without_phases_shows_the_totals_only(tmp_path: Path) -> None:
    runs = [timing_run(tmp_path / name, OLD_TIMING) for name in ("a", "b")]
    md = write_report(runs, tmp_path / "out").markdown
    section = md.split("## Where the time went (s)")[1].split("\n## ")[0]
    assert "No run here records its phases" in section
    assert "| startup " not in section and "| all phases " not in section
    assert table_row(section, "wall clock")[1:] == ["128.0", "100.0%", "128.0", "100.0%", "1.00x"]
    skipped = "**Where the time went: each run's wall clock by phase**: not recorded in a, b: no timing.phases_s: plot skipped"
    assert skipped in md
    assert not (tmp_path / "out" / TIME_PLOT).exists()


def test_phases_that_do_not_add_up_to_the_wall_clock_are_said(tmp_path: Path) -> None:
    short = {**MODIFIED_TIMING, "phases_s": {**MODIFIED_TIMING["phases_s"], "train_steps": 30.0}}  # 70 s of 90
    runs = [timing_run(tmp_path / "baseline", BASELINE_TIMING), timing_run(tmp_path / "short", short)]
    md = write_report(runs, tmp_path / "out").markdown
    assert "**short**: its time phases add up to 70.0 s, not its wall clock of 90.0 s" in md
    assert "**baseline**: its time phases" not in md  # exactly 420 s


def test_time_plot_is_one_stacked_bar_per_run_in_the_phases_colours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    real_save = plots._save

    def keep_figure(fig, out_dir: Path, name: str) -> str:
        figures.append(fig)  # _save closes it; its axes stay readable
        return real_save(fig, out_dir, name)

    monkeypatch.setattr(plots, "_save", keep_figure)
    runs = [timing_run(tmp_path / name, timing) for name, timing in
            (("baseline", BASELINE_TIMING), ("old", OLD_TIMING), ("modified", MODIFIED_TIMING))]
    plot = plots.plot_time_phases([load_run(r) for r in runs], tmp_path)
    assert plot.file == TIME_PLOT and plot.note == "not recorded in old: no timing.phases_s"
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["baseline", "modified"]
    assert ax.yaxis_inverted()  # the reference on top
    shown = [name for name, _ in TIME_PHASES]  # every phase took time in one run or the other
    assert [c.get_label() for c in ax.containers] == shown
    assert [t.get_text() for t in ax.get_legend().get_texts()] == shown
    from matplotlib.colors import to_rgba

    ends_s = [0.0, 0.0]
    for container in ax.containers:
        name = container.get_label()
        for row, (bar, timing) in enumerate(zip(container.patches, (BASELINE_TIMING, MODIFIED_TIMING))):
            assert bar.get_facecolor() == to_rgba(TIME_PHASE_COLOURS[name])
            assert bar.get_width() == timing["phases_s"].get(name, 0.0)
            assert bar.get_x() == ends_s[row]  # stacked: each segment starts where the last ended
            ends_s[row] += bar.get_width()
    assert ends_s == [420.0, 90.0]
    assert {"420 s", "90 s"} <= {t.get_text().strip() for t in ax.texts}


def test_phase_colours_cover_every_phase_once_and_match_between_plots() -> None:
    assert list(TIME_PHASE_COLOURS) == [name for name, _ in TIME_PHASES]
    assert len(set(TIME_PHASE_COLOURS.values())) == len(TIME_PHASE_COLOURS)
    assert set(MONITOR_PHASES) <= set(PHASE_SHADES)
    # A monitor phase is shaded in its time phase's colour.
    for monitor_phase, time_phase in (("eval", "eval_zero_shot"), ("train", "train_steps"), ("select", "select"),
                                      ("save", "checkpoint_save"), ("load", "load_best")):
        assert PHASE_SHADES[monitor_phase] == TIME_PHASE_COLOURS[time_phase]


def test_gpu_log_with_new_and_older_labels(tmp_path: Path) -> None:
    """save and load rows get their own NVML rows and shades; a label from an older log is still read."""
    runs = [timing_run(tmp_path / name, BASELINE_TIMING) for name in ("baseline", "modified")]
    write_gpu_log(runs[0] / "densenetsmi.txt", [("train", 3000.0), ("save", 3500.0), ("load", 1200.0), ("eval", 2000.0)])
    write_gpu_log(runs[1] / "densenetsmi.txt", [("warmup", 100.0), ("train", 2000.0)])  # not a MONITOR_PHASE
    md = write_report(runs, tmp_path / "out").markdown
    assert table_row(md, "GPU memory used (NVML), peak, save (MiB)") == ["3,500", "n/a"]
    assert table_row(md, "GPU memory used (NVML), peak, load (MiB)") == ["1,200", "n/a"]
    assert table_row(md, "GPU memory used (NVML), peak, warmup (MiB)") == ["n/a", "100"]
    assert_png(tmp_path / "out" / "compare_gpu_memory.png")


# ---- statistics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 5, 0.0625),  # 2 * 0.5**5
        (5, 0, 0.0625),
        (1, 9, 0.021484375),  # 2 * (1 + 10) / 2**10
        (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 2**10
        (0, 0, 1.0),  # no discordant pair
        (3, 3, 1.0),  # 2 * 42/64 > 1, capped
        (0, 1, 1.0),
    ],
)
def test_mcnemar_exact_hand_computed(b: int, c: int, p: float) -> None:
    assert mcnemar_exact_p(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_matches_two_sided_binomial_test() -> None:
    for b, c in ((40, 60), (7, 19), (120, 95)):
        assert mcnemar_exact_p(b, c) == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)


def test_wilson_interval_known_values() -> None:
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(3.8415 / 13.8415, abs=1e-4)  # z^2 / (n + z^2)
    for k, n in ((11, 40), (199, 200), (37, 1838)):
        reference = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((reference.low, reference.high), rel=1e-9)


def test_paired_interval_matches_newcombe_reference() -> None:
    # Cavo et al. 2012 via the contingencytables R package: p1 - p2 = -0.0621, 95% CI -0.1186 to -0.0046.
    # Here the difference is second - first, so the signs flip.
    low, high = paired_difference_interval(both=59, first_only=6, second_only=16, neither=80)
    assert (low, high) == pytest.approx((0.0046, 0.1186), abs=1e-4)


def test_paired_test_counts_and_common_ids() -> None:
    first = {f"e{i}": i < 6 for i in range(10)}  # e0..e5 right
    second = {f"e{i}": i >= 3 for i in range(1, 12)}  # e3..e11 right; e0 missing, e10 and e11 extra
    t = paired_test(first, second)
    assert (t.n_common, t.only_first, t.only_second) == (9, 1, 2)
    assert (t.b, t.c) == (2, 4)  # e1, e2 lost; e6..e9 gained
    assert (t.right_first, t.right_second) == (5, 7)
    assert t.diff_pts == pytest.approx(100 * 2 / 9)
    assert t.p_value == pytest.approx(mcnemar_exact_p(2, 4))
    assert t.diff_low_pts < t.diff_pts < t.diff_high_pts
    assert t.verdict() == "not significant at 5%: may be noise"
    assert paired_test({"a": True}, {"b": True}) is None


# ---- errors ----------------------------------------------------------------------------------------------------


def test_not_a_run_is_a_one_line_error(tmp_path: Path, runs: tuple[Path, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "tools.compare", str(runs[0]), str(empty)],
        cwd=ROOT, env=OFFLINE_ENV, check=False, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: {empty}: not a run directory")
    assert main([str(runs[0]), str(tmp_path / "nowhere")]) == 2
    with pytest.raises(NotARunError, match="not a directory"):
        load_run(tmp_path / "nowhere")


def test_one_run_is_not_enough(runs: tuple[Path, Path]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs[0])])
    assert exit_info.value.code == 2


def test_the_gpu_log_compare_reads_has_the_columns_the_monitor_writes(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """compare reads densenetsmi.txt by the column names common/artifacts.py gives the monitor."""
    from common.artifacts import GPU_LOG, GPU_LOG_COLUMNS

    run = copy_run(runs[0], tmp_path / "run")
    write_gpu_log(run / GPU_LOG, [("train", 1000.0), ("eval", 2000.0)])
    header = next(line for line in (run / GPU_LOG).read_text().splitlines() if not line.startswith("#"))
    assert header.split(",") == [name for name, _ in GPU_LOG_COLUMNS]
    assert [(s.phase, s.mem_used_mib) for s in load_run(run).gpu_samples] == [
        ("train", 1000.0), ("train", 1000.0), ("eval", 2000.0), ("eval", 2000.0)]  # each phase's closing reading
