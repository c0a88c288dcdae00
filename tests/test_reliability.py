"""Interruption, resume, refusal to overwrite, disk guard, bad inputs, secrets and determinism.

The entry points run for real in subprocesses; signals are sent for real.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import Profile
from common.rundir import RunDirError, check_disk

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS_PER_EPOCH = 8  # smoke: 64 training examples / 8 per optimizer step


def start(script: str, *argv: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, script, "--smoke", *argv], cwd=ROOT, env=env or ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As from a terminal: a CI shell may run us as a background job, which starts children with SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - no threads yet
    )


def children_of(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, f"run ended before {path} appeared: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_training_leaves_partial_metrics_and_no_process(tmp_path, sig):
    run_dir = tmp_path / "run"
    process = start("baseline.py", "--output-dir", str(run_dir), "--num-train-epochs", "6")
    wait_for(run_dir / f"checkpoint-{STEPS_PER_EPOCH}" / "trainer_state.json", process)
    children = children_of(process.pid)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "interrupted" in stderr and "Traceback" not in stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert metrics["accuracy"]["zero_shot"]["loglik"]["n_examples"] == 40  # measured before the signal
    assert "memory" in metrics and metrics["timing"]["wall_s"] > 0
    log = (run_dir / "densenetsmi.txt").read_text()
    assert log.startswith("#")
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.5, 4.0])
def test_signal_at_any_moment_exits_non_zero_cleanly(tmp_path, delay_s):
    run_dir = tmp_path / "run"
    process = start("modified.py", "--output-dir", str(run_dir))
    time.sleep(delay_s)
    children = children_of(process.pid)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode != 0
    if (run_dir / "metrics.json").exists():
        assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)


@pytest.mark.slow
def test_resume_ends_with_the_same_number_of_steps(tmp_path):
    """Interrupted after two epochs, every checkpoint is kept (the newest is the one to resume from, whichever was
    best); a resume that changes the experiment is refused; the resumed run finishes with the best epoch's alone."""
    run_dir = tmp_path / "run"
    epochs, options = 6, ("--learning-rate", "1e-2")  # a high rate: later epochs select worse, the best is an early one
    process = start("modified.py", "--output-dir", str(run_dir), "--num-train-epochs", str(epochs), *options)
    wait_for(run_dir / f"checkpoint-{2 * STEPS_PER_EPOCH}" / "trainer_state.json", process)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    assert (run_dir / f"checkpoint-{2 * STEPS_PER_EPOCH}" / "trainer_state.json").is_file()

    def again(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "modified.py", "--smoke", "--output-dir", str(run_dir),
                               "--num-train-epochs", str(epochs), *options, *argv],
                              cwd=ROOT, env=ENV, check=False, capture_output=True, text=True, timeout=300)

    refused = again()
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    changed = again("--resume", "--seed", "7")
    assert changed.returncode == 2 and "--seed 42 -> 7" in changed.stderr and "Traceback" not in changed.stderr

    resumed = again("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / f'checkpoint-{2 * STEPS_PER_EPOCH}'}" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["train"]["optimizer_steps"] == epochs * STEPS_PER_EPOCH
    assert metrics["train"]["resumed_from"]
    best = metrics["train"]["best_checkpoint"]
    assert [p.name for p in sorted(run_dir.glob("checkpoint-*"))] == [Path(best).name]  # save_total_limit 1


@pytest.mark.slow  # starts a process of its own (seconds)
def test_cuda_visible_devices_naming_no_gpu_is_refused(tmp_path):
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "7"}
    done = subprocess.run([sys.executable, "baseline.py", "--smoke", "--output-dir", str(tmp_path / "r")],
                          cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=120)
    if "CUDA_VISIBLE_DEVICES" not in done.stderr:
        pytest.skip("a GPU 7 exists here")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


def test_disk_guard_refuses_before_training(tmp_path):
    profile = Profile("keep-all", "fp32", None, False, False)
    with pytest.raises(RunDirError, match="checkpoints need about"):
        check_disk(tmp_path / "run", parameter_count=10**15, profile=profile, optim="adamw_torch_fused", epochs=3)
    estimate = check_disk(tmp_path / "run", parameter_count=1_235_814_400, profile=profile, optim="adamw_torch_fused",
                          epochs=1)
    assert 13 < estimate["estimated_checkpoint_disk_gib"] < 20  # fp32 weights + AdamW state + final model


def test_the_disk_guard_counts_the_checkpoint_being_written_beside_those_kept():
    """The next checkpoint is written in full before the rotation removes the oldest: modified's best and newest plus
    that one make three on disk at once from the third epoch."""
    from common import profiles
    from common.rundir import checkpoints_kept

    assert [checkpoints_kept(profiles.MODIFIED, epochs) for epochs in (1, 2, 3, 6)] == [1, 2, 3, 3]
    assert checkpoints_kept(profiles.BASELINE, 6) == 6
    assert checkpoints_kept(Profile("last-only", "fp32", 1, False, False), 6) == 2


@pytest.mark.slow  # starts a process of its own (seconds)
def test_access_tokens_never_reach_disk_or_logs(tmp_path):
    env_token, cli_token = "hf_FakeEnvToken0123456789", "hf_FakeCliToken9876543210"
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "modified.py", "--smoke", "--train-samples", "8", "--output-dir", str(run_dir), "--token", cli_token],
        cwd=ROOT, env={**ENV, "HF_TOKEN": env_token}, check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for token in (env_token, cli_token):
        assert token not in done.stdout and token not in done.stderr
        for path in run_dir.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), f"{token} leaked into {path}"
    assert json.loads((run_dir / "config.json").read_text())["experiment"]["token"] == "<redacted>"


@pytest.mark.slow
def test_same_seed_same_losses_and_predictions(tmp_path):
    outputs = []
    for name in ("a", "b"):
        done = subprocess.run([sys.executable, "baseline.py", "--smoke", "--output-dir", str(tmp_path / name)],
                              cwd=ROOT, env=ENV, check=False, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        predictions = (tmp_path / name / "predictions_fine_tuned.jsonl").read_text()
        outputs.append((metrics["train"]["loss_per_step"], predictions))
    assert outputs[0] == outputs[1]
