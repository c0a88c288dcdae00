"""A diverging run stops at the first non-finite training loss, says so in one line, and keeps its checkpoints."""

import json
import math

from transformers import TrainerControl, TrainerState, TrainingArguments

import baseline
from common import artifacts
from common.divergence import StopOnNonFiniteLoss, TrainingDiverged
from common.launch import main


def test_a_finite_loss_passes_and_the_first_non_finite_one_names_its_step(tmp_path):
    callback, args = StopOnNonFiniteLoss(), TrainingArguments(output_dir=str(tmp_path), learning_rate=0.5)
    state, control = TrainerState(global_step=7), TrainerControl()
    callback.on_log(args, state, control, logs={"loss": 2.5, "learning_rate": 0.5})
    callback.on_log(args, state, control, logs={"eval_accuracy": math.nan})  # only the training loss counts
    for loss in (math.nan, math.inf):
        try:
            callback.on_log(args, state, control, logs={"loss": loss})
        except TrainingDiverged as err:
            assert f"the loss is {loss} at step 7" in str(err) and "--learning-rate" in str(err)
            assert "no checkpoint had been saved" in str(err)
        else:
            raise AssertionError(f"loss {loss} did not stop the run")


def test_the_loss_is_logged_before_every_checkpoint_and_only_then():
    callback, control = StopOnNonFiniteLoss(), TrainerControl()
    callback.on_epoch_end(None, None, control)
    assert not control.should_log  # no extra log (and no extra GPU synchronisation) between checkpoints
    control.should_save = True
    callback.on_epoch_end(None, None, control)
    assert control.should_log


def test_a_diverging_run_ends_failed_with_one_line_and_keeps_the_checkpoints_before_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # run() narrows it to one GPU; undone afterwards
    code = main(baseline.PROFILE, ["--smoke", "--output-dir", "run", "--learning-rate", "1e30", "--train-samples", "16",
                                   "--selection-samples", "8", "--eval-samples", "8", "--num-train-epochs", "2"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["train"]["loss_per_step"]]
    step = len(losses)
    assert metrics["status"] == "failed" and not math.isfinite(losses[-1]) and all(map(math.isfinite, losses[:-1]))
    assert f"the loss is nan at step {step}" in errors[0]
    saved = [int(path.name.split("-")[-1]) for path in artifacts.checkpoints(tmp_path / "run")]
    assert saved and max(saved) < step, saved  # the checkpoints before the divergence, none after it
    assert f"the last checkpoint before it, run/checkpoint-{max(saved)}, is kept" in errors[0]
    assert not (tmp_path / "run" / "final_model").exists()
