"""The scripts' entry point (common/launch.py): Ctrl-C at any moment of start-up and an operating-system error
during the run each end in one line, not a traceback."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import OFFLINE_ENV, ROOT

import baseline
from common import artifacts
from common.launch import main


@pytest.mark.parametrize("delay_s", [pytest.param(0.1, marks=pytest.mark.slow), 0.3,
                                     pytest.param(1.5, marks=pytest.mark.slow)])
def test_ctrl_c_while_starting_is_one_line(tmp_path, delay_s):
    """0.1 s: reading the command line; 0.3 s and 1.5 s: importing torch and transformers. (Within the first ~25 ms,
    before common/launch.py has run a line, Python itself still prints a traceback.)"""
    process = subprocess.Popen([sys.executable, str(ROOT / "modified.py"), "--smoke"], cwd=tmp_path, env=OFFLINE_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # As from a terminal: a CI shell may start us with SIGINT ignored.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    time.sleep(delay_s)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert [line for line in err.splitlines() if line.strip()] in (
        ["interrupted"], ["interrupted while starting: nothing was written"]), err
    assert not (tmp_path / "runs").exists()


def test_an_operating_system_error_during_the_run_is_one_line_and_the_run_is_marked_failed(tmp_path, monkeypatch,
                                                                                           capsys):
    import common.run

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "run/predictions_zero_shot.jsonl")

    monkeypatch.setattr(common.run, "report_accuracy", disk_full)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # run() narrows it to one GPU; undone afterwards
    code = main(baseline.PROFILE, ["--smoke", "--output-dir", "run"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [("error: run/predictions_zero_shot.jsonl: No space left on device (the disk is "
                                         "full: free some space, or pass --output-dir on a larger disk)")]
    assert json.loads((tmp_path / "run" / artifacts.METRICS).read_text())["status"] == "failed"
    assert not (tmp_path / "run" / artifacts.LOCK).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_run_directory_without_write_permission_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o555)
    done = subprocess.run([sys.executable, str(ROOT / "baseline.py"), "--smoke", "--output-dir", "locked/run"],
                          cwd=tmp_path, env=OFFLINE_ENV, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr == "error: locked/run: no permission to write in locked: pass --output-dir where you may write\n"
