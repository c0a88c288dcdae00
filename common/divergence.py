"""A diverging run stops: the first training loss that is NaN or infinite ends it with one line, and no
checkpoint is written after it.

The check reads the loss where the Trainer already logs it (`on_log`, whose loss the Trainer has gathered to the
host anyway), so it adds no GPU synchronisation per micro-batch; that is why `logging_nan_inf_filter` stays off
(common/training.py). Before each checkpoint a log is asked for, so a checkpoint is written only after the loss
since the last log was seen to be finite.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainerCallback

from common import artifacts


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and what to change."""


class StopOnNonFiniteLoss(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        self._log_before_saving(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._log_before_saving(control)

    @staticmethod
    def _log_before_saving(control) -> None:
        # The Trainer logs, then evaluates, then saves: a log now lets on_log stop a diverged run before the save.
        if control.should_save:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(diverged_message(state.global_step, loss, args.learning_rate, Path(args.output_dir)))


def diverged_message(step: int, loss: float, learning_rate: float, run_dir: Path) -> str:
    saved = artifacts.checkpoints(run_dir)
    kept = (f"the last checkpoint before it, {saved[-1]}, is kept" if saved
            else "no checkpoint had been saved before it")
    return (f"training diverged: the loss is {loss} at step {step}; the likely cause is the learning rate "
            f"({learning_rate:g}), too high for this model and batch: lower --learning-rate. The run is marked "
            f"failed; {kept}.")
