"""GpuMonitor with a fake NVML: log format, device mapping, error paths, summary, cleanup."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.artifacts import GPU_LOG, GPU_LOG_COLUMNS, MONITOR_PHASES, PMON_LOG
from common.memory import torch_peak_memory
from common.monitor import MIB, GpuMonitor, format_summary, map_visible_devices, pmon

UUIDS = ["GPU-aaaa1111-0000-0000-0000-000000000000", "GPU-bbbb2222-0000-0000-0000-000000000000"]


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """Two H100-like GPUs. Tests set `used_mib[i]` before each sample; `fail` makes sampling raise."""

    NVMLError = FakeNVMLError

    def __init__(self, count: int = 2, init_error: Exception | None = None, as_bytes: bool = False) -> None:
        self.count = count
        self.init_error = init_error
        self.as_bytes = as_bytes
        self.used_mib = [21345.0, 1000.0][:count]
        self.total_mib = 81559.0
        self.fail = False
        self.init_calls = 0
        self.shutdown_calls = 0

    def _s(self, text: str) -> str | bytes:
        return text.encode() if self.as_bytes else text

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str | bytes:
        return self._s(UUIDS[h])

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self._s(f"Fake H100 #{h}")

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        if self.fail:
            raise FakeNVMLError("GPU is lost")
        used, total = self.used_mib[h] * MIB, self.total_mib * MIB
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=97 if h == 0 else 5, memory=40)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise FakeNVMLError("Not Supported")
        return 250_500  # mW

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        if h == 0:
            return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=2048 * MIB), SimpleNamespace(pid=1, usedGpuMemory=None)]
        return [SimpleNamespace(pid=1, usedGpuMemory=512 * MIB)]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def make(tmp_path: Path, nvml: object, lines: list[str] | None = None, **kwargs: object) -> GpuMonitor:
    kwargs.setdefault("interval_s", 3600.0)  # the thread stays idle; tests drive samples with sample_now()
    kwargs.setdefault("console_every", 0)
    printer = lines.append if lines is not None else (lambda _line: None)
    return GpuMonitor(tmp_path / "run" / GPU_LOG, nvml_module=nvml, print_fn=printer, **kwargs)


def read_log(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    text = path.read_text(encoding="utf-8").splitlines()
    comments = [line for line in text if line.startswith("#")]
    rows = list(csv.DictReader(line for line in text if not line.startswith("#")))
    return comments, rows


def test_log_has_described_columns_and_csv_rows_with_phase(tmp_path: Path) -> None:
    fake = FakeNvml()
    with make(tmp_path, fake) as mon:
        mon.sample_now()
        mon.set_phase("eval")  # takes the train phase's last sample
    comments, rows = read_log(mon.log_path)  # and closing, the eval phase's last
    header = "\n".join(comments)
    for name, meaning in GPU_LOG_COLUMNS:
        assert re.search(rf"^#\s+{name}\s+\S", header, re.MULTILINE), name
    assert "MiB" in header and "%" in header and ", W" in header
    assert "NOT memory in use" in header  # the memctl column can't be mistaken for memory again
    assert "GPU1 = NVML index 1, Fake H100 #1, " + UUIDS[1] in header
    assert list(rows[0]) == [name for name, _ in GPU_LOG_COLUMNS]
    assert len(rows) == 4 * 2
    assert [r["phase"] for r in rows] == ["train"] * 6 + ["eval"] * 2
    gpu0 = rows[0]
    assert (gpu0["gpu"], gpu0["nvml_index"], gpu0["name"]) == ("0", "0", "Fake H100 #0")
    assert float(gpu0["mem_used_mib"]) == 21345.0 and float(gpu0["mem_total_mib"]) == 81559.0
    assert float(gpu0["mem_used_pct"]) == pytest.approx(26.2, abs=0.05)
    assert (gpu0["gpu_util_pct"], gpu0["memctl_util_pct"]) == ("97", "40")
    assert float(gpu0["power_w"]) == 250.5
    assert float(gpu0["proc_mem_used_mib"]) == 2048.0
    gpu1 = rows[1]
    assert gpu1["gpu"] == "1" and gpu1["power_w"] == "" and gpu1["proc_mem_used_mib"] == ""
    assert float(gpu0["elapsed_s"]) <= float(rows[6]["elapsed_s"])
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", gpu0["time"])
    footer = [line.split(":")[0] for line in comments if line.startswith(("# eval GPU", "# train GPU"))]
    assert footer == ["# eval GPU0", "# eval GPU1", "# train GPU0", "# train GPU1"]  # the summary's order, not seen


def test_summary_peaks_and_means_per_phase_and_gpu(tmp_path: Path) -> None:
    fake = FakeNvml()
    fake.used_mib = [1000.0, 100.0]
    with make(tmp_path, fake) as mon:
        fake.used_mib = [3000.0, 300.0]
        mon.sample_now()
        fake.used_mib = [2000.0, 200.0]
        mon.set_phase("eval")  # takes the train phase's last sample
        fake.used_mib = [500.0, 200.0]
    s = mon.summary()  # closing took the eval phase's last sample
    assert s["enabled"] is True and s["disabled_reason"] is None and s["error"] is None
    assert s["samples"] == 4 and s["interval_s"] == 3600.0
    assert s["gpus"][1] == {
        "label": "GPU1", "index": 1, "nvml_index": 1, "name": "Fake H100 #1", "uuid": UUIDS[1], "memory_total_mib": 81559.0
    }
    train0 = s["phases"]["train"]["GPU0"]
    assert train0 == {
        "peak_used_mib": 3000.0, "mean_used_mib": 2000.0, "mean_gpu_util_pct": 97.0, "peak_proc_used_mib": 2048.0, "samples": 3
    }
    assert s["phases"]["train"]["GPU1"]["peak_used_mib"] == 300.0
    assert s["phases"]["train"]["GPU1"]["peak_proc_used_mib"] is None
    assert s["phases"]["eval"]["GPU0"] == {
        "peak_used_mib": 500.0, "mean_used_mib": 500.0, "mean_gpu_util_pct": 97.0, "peak_proc_used_mib": 2048.0, "samples": 1
    }
    assert s["sampler_cost_ms_mean"] > 0 and s["sampler_cost_ms_max"] >= s["sampler_cost_ms_mean"]

    peaks = {"train": {"max_allocated_mib": 1500.0, "max_reserved_mib": 2500.0},
             "eval": {"max_allocated_mib": None, "max_reserved_mib": None}}
    text = format_summary(s, peaks)
    assert "train GPU0 Fake H100 #0: peak 3,000 / 81,559 MiB (4%), mean 2,000 MiB, util 97% (3 samples)" in text
    assert "eval  GPU0 Fake H100 #0: peak 500 / 81,559 MiB" in text
    assert "train max allocated 1,500 MiB, max reserved 2,500 MiB" in text
    assert "eval  CUDA not available" in text


def test_console_line_every_n_samples(tmp_path: Path) -> None:
    lines: list[str] = []
    with make(tmp_path, FakeNvml(count=1), lines, console_every=2) as mon:
        mon.sample_now()
        mon.sample_now()
    assert len(lines) == 2  # samples 1 and 3
    assert re.fullmatch(r"\[gpu train \d+s\] GPU0 21,345 / 81,559 MiB \(26%\) util 97%", lines[0]), lines[0]


# ---- phases ----------------------------------------------------------------------------------


def test_every_phase_change_takes_the_ending_phases_last_sample(tmp_path: Path) -> None:
    """A phase shorter than the interval (here 3600 s) still has a reading, with what it held at its end, and the
    next phase's rows do not start with what the last one left behind (a selection pass's cache, say)."""
    fake = FakeNvml(count=1)
    with make(tmp_path, fake) as mon:  # the first sample, on entry: train
        for phase, used_mib in (("select", 5000.0), ("train", 6000.0), ("save", 7000.0), ("load", 8000.0),
                                ("eval", 9000.0)):
            mon.set_phase(phase)  # the ending phase's last reading
            fake.used_mib = [used_mib]  # what this phase comes to hold
        mon.set_phase("eval")  # no change, no sample
    rows = read_log(mon.log_path)[1]  # closing: the eval phase's last reading
    assert [(r["phase"], float(r["mem_used_mib"])) for r in rows] == [
        ("train", 21345.0), ("train", 21345.0), ("select", 5000.0), ("train", 6000.0), ("save", 7000.0),
        ("load", 8000.0), ("eval", 9000.0)
    ]
    phases = mon.summary()["phases"]
    assert {p: phases[p]["GPU0"]["samples"] for p in phases} == {"train": 3, "select": 1, "save": 1, "load": 1, "eval": 1}
    assert phases["save"]["GPU0"]["peak_used_mib"] == 7000.0


def test_phases_are_the_runs_monitor_phases(tmp_path: Path) -> None:
    assert MONITOR_PHASES == ("eval", "train", "select", "save", "load")
    with make(tmp_path, FakeNvml(count=1)) as mon:
        for phase in MONITOR_PHASES:
            mon.set_phase(phase)
        for wrong in ("checkpoint", "Train", "", "save,load"):
            with pytest.raises(ValueError, match="phase must be one of eval, train, select, save, load"):
                mon.set_phase(wrong)
        assert mon.phase == "load"  # a rejected label changes nothing
    with pytest.raises(ValueError):
        make(tmp_path, FakeNvml(), phase="warmup")
    # Another tool's own labels (the benchmark's row names) with phases=None: any word without a comma.
    with make(tmp_path / "any", FakeNvml(count=1), phase="start", phases=None) as other:
        other.set_phase("modified_bs64")
        with pytest.raises(ValueError, match="non-empty word"):
            other.set_phase("a,b")
    assert [r["phase"] for r in read_log(other.log_path)[1]] == ["start", "start", "modified_bs64"]


def test_phase_change_with_monitoring_off_takes_no_sample(tmp_path: Path) -> None:
    fake = FakeNvml(count=0)  # no GPU: monitoring off
    with make(tmp_path, fake) as mon:
        mon.set_phase("select")
        assert mon.phase == "select"
    assert mon.summary()["samples"] == 0 and read_log(mon.log_path)[1] == []


def test_phase_change_samples_and_the_thread_never_interleave_rows(tmp_path: Path) -> None:
    """The sampler thread (every 1 ms) and set_phase's samples write whole samples, one after the other."""
    with make(tmp_path, FakeNvml(), interval_s=0.001) as mon:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for phase in ("select", "train", "save"):
                mon.set_phase(phase)
    rows = read_log(mon.log_path)[1]
    assert len(rows) > 100
    samples = [rows[i:i + 2] for i in range(0, len(rows), 2)]
    for gpu0, gpu1 in samples:  # each sample: GPU0 then GPU1, with one time and one phase
        assert (gpu0["gpu"], gpu1["gpu"]) == ("0", "1")
        assert gpu0["elapsed_s"] == gpu1["elapsed_s"] and gpu0["phase"] == gpu1["phase"]
    elapsed_s = [float(gpu0["elapsed_s"]) for gpu0, _ in samples]
    assert elapsed_s == sorted(elapsed_s)
    assert mon.summary()["samples"] == len(samples)


def test_summary_lists_the_new_phases_aligned(tmp_path: Path) -> None:
    fake = FakeNvml(count=1)
    with make(tmp_path, fake, phase="eval") as mon:
        for phase in ("train", "select", "train", "save", "load", "eval"):
            mon.set_phase(phase)
    text = format_summary(mon.summary(), {"eval_zero_shot": {"max_allocated_mib": 10.0, "max_reserved_mib": 20.0},
                                          "train": {"max_allocated_mib": 30.0, "max_reserved_mib": 40.0}})
    nvml_lines = [line for line in text.splitlines() if "GPU0 Fake" in line]
    assert [line.split()[0] for line in nvml_lines] == ["eval", "train", "select", "save", "load"]
    assert len({line.index("GPU0") for line in nvml_lines}) == 1  # one column, "select" included
    assert "  eval_zero_shot max allocated 10 MiB" in text and "  train          max allocated 30 MiB" in text
    footer = [line for line in read_log(mon.log_path)[0] if line.startswith(("# save", "# load"))]
    assert footer == ["# save GPU0: peak 21,345 MiB, mean 21,345 MiB, 1 samples",
                      "# load GPU0: peak 21,345 MiB, mean 21,345 MiB, 1 samples"]


def test_names_as_bytes_are_decoded(tmp_path: Path) -> None:
    with make(tmp_path, FakeNvml(as_bytes=True)) as mon:
        pass
    assert [(g["name"], g["uuid"]) for g in mon.summary()["gpus"]] == [("Fake H100 #0", UUIDS[0]), ("Fake H100 #1", UUIDS[1])]


# ---- CUDA_VISIBLE_DEVICES -> NVML ---------------------------------------------------------------

THREE = ["GPU-aaaa1111-x", "GPU-aaaa2222-x", "GPU-cccc3333-x"]


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [0, 1, 2]),
        ("1,0", [1, 0]),
        (" 2 , 0 ", [2, 0]),
        ("GPU-cccc3333-x,GPU-aaaa1111-x", [2, 0]),
        ("GPU-aaaa2,cccc", [1, 2]),  # unique prefixes, with or without "GPU-"
        ("gpu-CCCC3333", [2]),
    ],
)
def test_map_visible_devices(visible: str | None, expected: list[int]) -> None:
    assert map_visible_devices(visible, THREE) == (expected, [])


def test_map_visible_devices_skips_mig_entries() -> None:
    assert map_visible_devices("MIG-1234-abcd,1", THREE) == ([1], ["MIG-1234-abcd"])
    with pytest.raises(ValueError, match="only MIG instances"):
        map_visible_devices("MIG-GPU-aaaa1111-x/1/0", THREE)


@pytest.mark.parametrize(
    ("visible", "reason"),
    [
        ("3", "'3' is not a GPU index"),
        ("-1", "'-1' is not a GPU index"),
        ("0,7", "'7' is not a GPU index"),
        ("GPU-aaaa", "'GPU-aaaa' matches 2 GPU UUIDs"),
        ("GPU-ffff", "'GPU-ffff' matches no GPU UUID"),
        ("0,GPU-aaaa1111", "names GPU 0 a second time"),
        ("0,,1", "entry '' is empty"),
        ("", "CUDA_VISIBLE_DEVICES is empty"),
    ],
)
def test_map_visible_devices_rejects(visible: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        map_visible_devices(visible, THREE)


def test_monitor_follows_cuda_visible_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    with make(tmp_path, FakeNvml()) as mon:
        pass
    assert [(g["label"], g["nvml_index"], g["uuid"]) for g in mon.summary()["gpus"]] == [("GPU0", 1, UUIDS[1])]
    _, rows = read_log(mon.log_path)
    assert {(r["gpu"], r["nvml_index"]) for r in rows} == {("0", "1")}  # the first and the closing reading


def test_invalid_visible_device_turns_monitoring_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,5")
    fake, lines = FakeNvml(), []
    with make(tmp_path, fake, lines) as mon:
        mon.sample_now()  # no-op while off
    reason = mon.summary()["disabled_reason"]
    assert "CUDA_VISIBLE_DEVICES='0,5': entry '5' is not a GPU index" in reason
    assert lines == [f"GPU monitoring off: {reason}"]
    comments, rows = read_log(mon.log_path)
    assert f"# GPU monitoring off: {reason}" in comments and rows == []
    assert fake.shutdown_calls == 1


# ---- error paths ---------------------------------------------------------------------------


def assert_off(mon: GpuMonitor, lines: list[str], expected: str) -> None:
    s = mon.summary()
    assert s["enabled"] is False and expected in s["disabled_reason"]
    assert s["phases"] == {} and s["sampler_cost_ms_mean"] is None
    assert lines == [f"GPU monitoring off: {s['disabled_reason']}"]
    assert f"# GPU monitoring off: {s['disabled_reason']}" in mon.log_path.read_text()
    assert format_summary(s, {}) == lines[0]


def test_no_pynvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    lines: list[str] = []
    ran = False
    with make(tmp_path, None, lines) as mon:
        ran = True
    assert ran
    assert_off(mon, lines, "nvidia-ml-py (module pynvml) is not importable")


def test_nvml_init_error(tmp_path: Path) -> None:
    lines: list[str] = []
    fake = FakeNvml(init_error=FakeNVMLError("Driver Not Loaded"))
    with make(tmp_path, fake, lines) as mon:
        pass
    assert_off(mon, lines, "NVML did not start (FakeNVMLError: Driver Not Loaded)")
    assert fake.shutdown_calls == 0


def test_no_gpu(tmp_path: Path) -> None:
    lines: list[str] = []
    fake = FakeNvml(count=0)
    with make(tmp_path, fake, lines) as mon:
        pass
    assert_off(mon, lines, "NVML found no GPU")
    assert fake.shutdown_calls == 1


def test_error_mid_run_is_logged_once_and_stops_sampling(tmp_path: Path) -> None:
    fake, lines = FakeNvml(), []
    with make(tmp_path, fake, lines) as mon:
        fake.fail = True
        mon.sample_now()
        mon.sample_now()
        fake.fail = False
        mon.sample_now()  # stays stopped
    assert lines == ["GPU monitoring stopped: FakeNVMLError at 0.0 s: GPU is lost"]
    s = mon.summary()
    assert s["enabled"] is True and s["error"] == "FakeNVMLError at 0.0 s: GPU is lost" and s["samples"] == 1
    comments, rows = read_log(mon.log_path)
    assert "# GPU monitoring stopped: FakeNVMLError at 0.0 s: GPU is lost" in comments and len(rows) == 2
    assert not mon._thread.is_alive()
    assert fake.shutdown_calls == 1


def test_error_in_the_sampler_thread_stops_it(tmp_path: Path) -> None:
    fake, lines = FakeNvml(count=1), []
    with make(tmp_path, fake, lines, interval_s=0.01) as mon:
        deadline = time.monotonic() + 5
        while mon.summary()["samples"] < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        fake.fail = True
        mon._thread.join(timeout=5)
        assert not mon._thread.is_alive()
    assert mon.summary()["samples"] >= 3
    assert len(lines) == 1 and lines[0].startswith("GPU monitoring stopped: FakeNVMLError")


def test_a_log_write_that_fails_stops_sampling_never_the_run(tmp_path: Path) -> None:
    """The disk the checkpoints filled: writing a row fails. Sampling stops once, says why, and the run's phase
    changes and the summary go on."""
    import errno

    fake, lines = FakeNvml(count=1), []
    with make(tmp_path, fake, lines) as mon:
        def disk_full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        mon._sampler._log.write_sample = disk_full
        mon.set_phase("select")  # would sample: must not raise into the run
        mon.sample_now()
    assert mon.error is not None and mon.error.startswith("OSError at") and "No space left" in mon.error
    assert lines == [f"GPU monitoring stopped: {mon.error}"]
    assert mon.summary()["error"] == mon.error and mon.summary()["samples"] == 1  # the first, before the disk filled


def test_a_sample_asked_for_while_nvml_hangs_returns(tmp_path: Path) -> None:
    """A sampler stuck in an NVML call holds the lock: sample_now, like a phase change, waits at most 1 s."""
    import threading

    fake, release = FakeNvml(count=1), threading.Event()
    with make(tmp_path, fake) as mon:
        stuck = threading.Thread(target=mon._sampler.sample, daemon=True)
        fake.nvmlDeviceGetMemoryInfo = lambda h: (release.wait(), SimpleNamespace(used=MIB, total=MIB))[1]
        stuck.start()
        time.sleep(0.1)
        started_s = time.monotonic()
        mon.sample_now()
        assert time.monotonic() - started_s < 3
        release.set()
        stuck.join(timeout=5)


def test_other_local_ranks_do_not_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    fake, lines = FakeNvml(), []
    with make(tmp_path, fake, lines, pmon=True) as mon:
        pass
    s = mon.summary()
    assert s["enabled"] is False and s["disabled_reason"].startswith("LOCAL_RANK=1: the process with LOCAL_RANK 0")
    assert fake.init_calls == 0 and lines == [] and not mon.log_path.exists()


def test_local_rank_zero_monitors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    with make(tmp_path, FakeNvml()) as mon:
        pass
    assert mon.summary()["enabled"] is True and len(read_log(mon.log_path)[1]) == 2 * 2  # first, closing; 2 GPUs


# ---- stopping --------------------------------------------------------------------------------


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_exception_in_block_stops_thread_and_closes_log(tmp_path: Path, exc_type: type[BaseException]) -> None:
    with pytest.raises(exc_type), make(tmp_path, FakeNvml(), interval_s=0.01) as mon:
        time.sleep(0.05)
        raise exc_type("boom")
    assert not mon._thread.is_alive()
    assert mon._file is None
    text = mon.log_path.read_text()
    assert re.search(r"^# ended .* \d+ samples, sampler [\d.]+ ms/sample$", text, re.MULTILINE)
    rows_after_close = len(read_log(mon.log_path)[1])
    time.sleep(0.05)
    assert len(read_log(mon.log_path)[1]) == rows_after_close


def test_stops_promptly_with_a_long_interval(tmp_path: Path) -> None:
    started = time.monotonic()
    with make(tmp_path, FakeNvml(), interval_s=3600.0):
        pass
    assert time.monotonic() - started < 2.0


# ---- pmon subprocess -------------------------------------------------------------------------

SLEEPER = [sys.executable, "-c", "import time; print('fake pmon', flush=True); time.sleep(60)"]
IGNORES_TERM = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
]


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def wait_for_text(path: Path, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert text in path.read_text()


def test_pmon_is_stopped_on_normal_exit(tmp_path: Path) -> None:
    with make(tmp_path, FakeNvml(), pmon=True, pmon_cmd=SLEEPER) as mon:
        pid = mon.pmon_pid
        assert pid is not None
        os.kill(pid, 0)  # running
        pmon_log = mon.log_path.parent / PMON_LOG
        wait_for_text(pmon_log, "fake pmon")
    assert_gone(pid)
    assert pmon_log.read_text().startswith("# " + " ".join(SLEEPER))


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_pmon_is_stopped_on_exception(tmp_path: Path, exc_type: type[BaseException]) -> None:
    with pytest.raises(exc_type), make(tmp_path, FakeNvml(), pmon=True, pmon_cmd=SLEEPER) as mon:
        pid = mon.pmon_pid
        raise exc_type("boom")
    assert pid is not None
    assert_gone(pid)


CTRL_C_CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell may start us with SIGINT ignored
sys.path[:0] = [{repo!r}, {tests!r}]
from test_monitor import FakeNvml, SLEEPER
from common.monitor import GpuMonitor
with GpuMonitor({log!r}, interval_s=0.01, console_every=0, nvml_module=FakeNvml(), print_fn=lambda _: None,
                pmon=True, pmon_cmd=SLEEPER) as mon:
    print(mon.pmon_pid, flush=True)
    time.sleep(60)
"""


def test_ctrl_c_in_a_real_process_stops_pmon_and_closes_log(tmp_path: Path) -> None:
    tests_dir = Path(__file__).resolve().parent
    log = tmp_path / GPU_LOG
    code = CTRL_C_CHILD.format(repo=str(tests_dir.parent), tests=str(tests_dir), log=str(log))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pmon_pid = int(child.stdout.readline())
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=15)
    finally:
        child.kill()
    assert "KeyboardInterrupt" in stderr
    assert_gone(pmon_pid)
    assert re.search(r"^# ended .* samples", log.read_text(), re.MULTILINE)


def test_pmon_ignoring_sigterm_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pmon, "PMON_STOP_TIMEOUT_S", 0.2)
    with make(tmp_path, FakeNvml(), pmon=True, pmon_cmd=IGNORES_TERM) as mon:
        pid = mon.pmon_pid
        wait_for_text(mon.log_path.parent / PMON_LOG, "ready")
    assert pid is not None
    assert_gone(pid)


def test_pmon_command_missing_keeps_monitoring(tmp_path: Path) -> None:
    lines: list[str] = []
    with make(tmp_path, FakeNvml(), lines, pmon=True, pmon_cmd=[str(tmp_path / "no-such-nvidia-smi")]) as mon:
        assert mon.pmon_pid is None
    assert mon.summary()["enabled"] is True
    assert len(lines) == 1 and lines[0].startswith("nvidia-smi pmon off:")


# ---- torch allocator peaks --------------------------------------------------------------------


def test_torch_peak_memory_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    peaks: dict = {}
    with torch_peak_memory("train", peaks):
        pass
    assert peaks == {"train": {"max_allocated_mib": None, "max_reserved_mib": None}}


def test_torch_peak_memory_resets_per_phase_and_records_on_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    state = {"resets": 0, "allocated": 0, "reserved": 0}

    def reset(device: object = None) -> None:
        state.update(resets=state["resets"] + 1, allocated=0, reserved=0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: state.update(emptied=state.get("emptied", 0) + 1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: state["reserved"])
    peaks: dict = {}
    with torch_peak_memory("train", peaks):
        state.update(allocated=3000 * MIB, reserved=4096 * MIB)
    with pytest.raises(RuntimeError), torch_peak_memory("eval", peaks, empty_cache=True):
        assert state["resets"] == 2 and state["allocated"] == 0 and state["emptied"] == 1
        state.update(allocated=512 * MIB, reserved=1024 * MIB)
        raise RuntimeError("CUDA out of memory")
    assert state["emptied"] == 1  # only when asked
    assert peaks == {
        "train": {"max_allocated_mib": 3000.0, "max_reserved_mib": 4096.0},
        "eval": {"max_allocated_mib": 512.0, "max_reserved_mib": 1024.0},
    }
