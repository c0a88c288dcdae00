"""Both scripts' real entry points, run with --smoke in subprocesses (the README's own commands, conftest.smoke_runs);
assertions on the files they write."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_script(script: str, *argv: str, timeout_s: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *argv], cwd=ROOT, env=OFFLINE_ENV, check=False, capture_output=True, text=True,
        timeout=timeout_s,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU the monitor is off and says so")
@pytest.mark.parametrize("script", ["baseline.py", "modified.py"])
def test_smoke_run_writes_every_output(smoke_runs, script):
    run_dir = smoke_runs[script]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["train"]["optimizer_steps"] > 0
    assert metrics["train"]["mean_loss"] > 0
    assert metrics["timing"]["train_tokens_per_s"] > 0
    assert len(metrics["train"]["selection_accuracy_per_epoch"]) == 2
    checkpointing = metrics["activation_checkpointing"]  # what the budget measured at start-up, in bytes
    assert checkpointing["budget_gib"] == metrics["engine"]["activation_budget_gib"]
    assert checkpointing["kept_bytes_per_position_per_layer"] > checkpointing["checkpointed_bytes_per_position_per_layer"] > 0
    for phase in ("zero_shot", "fine_tuned"):
        result = metrics["accuracy"][phase]["loglik"]
        assert result["n_examples"] == 40 and 0 <= result["acc_pct"] <= 100
        predictions = [json.loads(line) for line in (run_dir / f"predictions_{phase}.jsonl").open()]
        assert len(predictions) == 40
        assert {"id", "label", "prediction"} <= set(predictions[0])
    assert (run_dir / "final_model" / "config.json").is_file()
    assert (run_dir / "final_model" / "tokenizer.json").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["profile"]["name"] == script.removesuffix(".py")
    assert config["experiment"]["token"] is None  # none given: nothing to redact
    header = [line for line in (run_dir / "densenetsmi.txt").read_text().splitlines() if line.startswith("#")]
    assert any("GPU monitoring off" in line for line in header)  # CI has no GPU, and says so


# The README's --smoke runs' loss at each optimizer step, measured here (2-core CPU, torch 2.13, transformers 5.25; the
# same with OMP_NUM_THREADS=1). After a change meant to alter them: run `python3 baseline.py --smoke` and
# `python3 modified.py --smoke` and copy each metrics.json's train.loss_per_step, rounded to 6 decimals.
PINNED_LOSSES = {
    "baseline.py": [5.601314, 5.598767, 5.393798, 5.250184, 5.136724, 5.025124, 4.962986, 4.876231,
                    4.831101, 4.771529, 4.724734, 4.692094, 4.674147, 4.663582, 4.659592, 4.652755],
    "modified.py": [5.601253, 5.59868, 5.393654, 5.249955, 5.136679, 5.024967, 4.963079, 4.876195,
                    4.831069, 4.771467, 4.724697, 4.692018, 4.674174, 4.663501, 4.659667, 4.652714],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinned on a CPU: a GPU's kernels round differently")
@pytest.mark.parametrize("script", ["baseline.py", "modified.py"])
def test_smoke_losses_are_the_pinned_ones(smoke_runs, script):
    """A changed step (its loss, gradients, optimizer, schedule, batches or precision) moves these losses."""
    metrics = json.loads((smoke_runs[script] / "metrics.json").read_text())
    losses = [step["loss"] for step in metrics["train"]["loss_per_step"]]
    assert losses == pytest.approx(PINNED_LOSSES[script], abs=1e-4)


def test_both_runs_share_the_experiment(smoke_runs):
    a, b = (json.loads((smoke_runs[s] / "config.json").read_text()) for s in ("baseline.py", "modified.py"))
    for config in (a, b):
        config["experiment"].pop("output_dir")
    assert a["experiment"] == b["experiment"]
    ids = [
        [json.loads(line)["id"] for line in (smoke_runs[s] / "predictions_fine_tuned.jsonl").open()]
        for s in ("baseline.py", "modified.py")
    ]
    assert ids[0] == ids[1]


def test_checkpoint_management_differs_as_the_profiles_say(smoke_runs):
    baseline_checkpoints = sorted(p.name for p in smoke_runs["baseline.py"].glob("checkpoint-*"))
    modified_checkpoints = sorted(p.name for p in smoke_runs["modified.py"].glob("checkpoint-*"))
    assert len(baseline_checkpoints) == 2  # every epoch kept
    assert len(modified_checkpoints) == 1  # save_total_limit=1; the best is the one kept
    best = json.loads((smoke_runs["modified.py"] / "metrics.json").read_text())["train"]["best_checkpoint"]
    assert Path(best).name == modified_checkpoints[0]


def test_finished_run_is_not_reused_silently(smoke_runs):
    run_dir = smoke_runs["baseline.py"]
    before = (run_dir / "metrics.json").read_text()
    done = run_script("baseline.py", "--smoke", "--output-dir", str(run_dir))
    assert done.returncode == 2
    assert "holds a finished run" in done.stderr and "--overwrite" in done.stderr
    assert "Traceback" not in done.stderr
    assert (run_dir / "metrics.json").read_text() == before


def test_eval_only_writes_metrics_and_predictions(smoke_runs, tmp_path):
    model_dir = smoke_runs["modified.py"] / "final_model"
    out = tmp_path / "eval"
    done = run_script("modified.py", "--smoke", "--eval-only", "--model", str(model_dir), "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and "train" not in metrics
    trained = json.loads((smoke_runs["modified.py"] / "metrics.json").read_text())
    assert metrics["accuracy"]["zero_shot"]["loglik"]["acc_pct"] == pytest.approx(
        trained["accuracy"]["fine_tuned"]["loglik"]["acc_pct"]
    )
    assert (out / "predictions_zero_shot.jsonl").is_file()


@pytest.mark.parametrize("script", ["baseline.py", "modified.py"])
def test_phase_times_add_up_to_the_wall_clock(readme_runs, smoke_runs, script):
    """metrics.json's phases add up to its wall clock, which matches an outside clock: from the launch to the last
    write of metrics.json, within 5%."""
    timing = json.loads((smoke_runs[script] / "metrics.json").read_text())["timing"]
    phases = timing["phases_s"]
    assert sum(phases.values()) == pytest.approx(timing["wall_s"], rel=1e-6)
    outside_s = (smoke_runs[script] / "metrics.json").stat().st_mtime - json.loads(
        (readme_runs / "launched_s.json").read_text())[script]
    assert timing["wall_s"] == pytest.approx(outside_s, rel=0.05)
    for phase in ("startup", "eval_zero_shot", "train_steps", "select", "checkpoint_save", "eval_fine_tuned",
                  "final_save"):
        assert phases[phase] > 0, phase
    assert phases["other"] < 0.05 * timing["wall_s"]
    steps_s = timing["train_runtime_s"] - phases["select"] - phases["checkpoint_save"]
    assert timing["train_steps_tokens_per_s"] == pytest.approx(timing["train_tokens_per_s"] * timing["train_runtime_s"]
                                                               / steps_s)  # the same tokens, without selection and saves
