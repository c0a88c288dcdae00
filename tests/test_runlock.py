"""One run per directory, tested with real processes: a second run into a directory in use is refused with one line
naming the first; the lock of a process that died (SIGKILL) does not block."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import OFFLINE_ENV, ROOT

from common import artifacts, runlock
from common.rundir import RunDirError

HOLD = "import sys, time\nfrom pathlib import Path\nfrom common import runlock\nrunlock.acquire(Path(sys.argv[1]))\n" \
       "print('locked', flush=True)\ntime.sleep(300)"


def script(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "baseline.py"), "--smoke", *argv], cwd=cwd, env=OFFLINE_ENV,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow  # starts a process of its own (seconds)
def test_a_directory_in_use_is_refused_naming_the_process_and_a_dead_ones_lock_does_not_block(tmp_path):
    run_dir = tmp_path / "runs" / "baseline"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = script("--output-dir", str(run_dir), "--overwrite", cwd=tmp_path)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1, refused.stderr
        assert f"in use by another run (process {holder.pid} on " in refused.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / artifacts.LOCK).exists()  # left behind by the kill, with the dead process's id
    done = script("--output-dir", str(run_dir), "--eval-only", "--eval-samples", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / artifacts.METRICS).is_file() and not (run_dir / artifacts.LOCK).exists()


def test_the_same_process_cannot_take_a_directory_twice_and_gives_back_what_it_made(tmp_path):
    run_dir = tmp_path / "new" / "run"
    runlock.acquire(run_dir)
    try:
        assert (run_dir / artifacts.LOCK).read_text().startswith(f"{os.getpid()} on ")
        with pytest.raises(RunDirError, match=f"in use by another run \\(process {os.getpid()} on "):
            runlock.acquire(run_dir)
    finally:
        runlock.release_all()
    assert not (tmp_path / "new").exists()  # the directories made only to hold the lock are gone again


@pytest.mark.slow
def test_two_runs_started_together_into_one_directory_one_runs_and_the_other_is_refused(tmp_path):
    argv = [sys.executable, str(ROOT / "baseline.py"), "--smoke", "--output-dir", "runs/same", "--train-samples", "16"]
    both = [subprocess.Popen(argv, cwd=tmp_path, env=OFFLINE_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.communicate()[1]) for p in both)
    assert [code for code, _ in results] == [0, 2], results
    assert "in use by another run (process" in results[1][1]
    assert len(list((tmp_path / "runs" / "same" / "runs").iterdir())) == 1  # one TensorBoard folder, one writer
