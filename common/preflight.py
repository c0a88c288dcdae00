"""What the Trainer will be given, checked before the run directory is touched: a value it would refuse only once
training starts (after --overwrite has cleared the old run) is a ConfigError here instead."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from transformers import Trainer, get_scheduler
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from common.config import ConfigError, EngineArguments, ExperimentArguments, Profile
from common.precision import Precision
from common.training import build_training_arguments


def check_choice(option: str, value: str, choices: list[str]) -> None:
    if value in choices:
        return
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(choices)}"
    raise ConfigError(f"{option} {value!r} is not one of the Trainer's choices ({hint})")


def check_trainer_arguments(args: ExperimentArguments, engine: EngineArguments, profile: Profile,
                            precision: Precision, run_dir: Path) -> None:
    """The TrainingArguments and the optimizer class built now, as training will build them."""
    check_choice("--optim", engine.optim, [o.value for o in OptimizerNames])
    check_choice("--lr-scheduler-type", args.lr_scheduler_type, [s.value for s in SchedulerType])
    try:
        training_args = build_training_arguments(args, engine, profile, precision, str(run_dir))
        Trainer.get_optimizer_cls_and_kwargs(training_args)  # a missing package (bitsandbytes, ...) shows here
        # Schedules that need arguments the command line cannot give (min_lr, num_decay_steps) fail here, not after
        # --overwrite has cleared the old run.
        get_scheduler(training_args.lr_scheduler_type, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                      num_warmup_steps=0, num_training_steps=100,
                      scheduler_specific_kwargs=training_args.lr_scheduler_kwargs)
    except (ValueError, ImportError, TypeError) as err:
        raise ConfigError(f"the Trainer refuses these arguments: {str(err).strip().splitlines()[0]}") from err
    check_mixed_precision(training_args.mixed_precision, precision)


def check_mixed_precision(trainer_value: str, precision: Precision) -> None:
    """The Trainer takes ACCELERATE_MIXED_PRECISION (set by `accelerate launch` from its config) where the profile
    asks for neither bf16 nor fp16: fp32 would silently train in mixed precision."""
    if trainer_value != precision.accelerate_name:
        raise ConfigError(
            f"accelerate's mixed_precision is {trainer_value!r} (ACCELERATE_MIXED_PRECISION, from `accelerate launch`'s "
            f"config), but the {precision.name!r} precision means {precision.accelerate_name!r}: set "
            f"mixed_precision: 'no' in the accelerate config (common/fsdp.yaml does); the profile sets the precision")


def check_max_length(pairs: list[tuple[list[int], list[int]]], max_length: int) -> None:
    """Refuse a --max-length that cuts the whole answer off a training example (`pairs`: common.data.training_pairs):
    the loss is on the answer tokens only, so such an example teaches nothing, and a batch of them has a loss of 0/0
    (NaN)."""
    answerless = sum(len(context) >= max_length for context, _ in pairs)
    if answerless:
        longest_prompt = max(len(context) for context, _ in pairs)
        whole = max(len(context) + len(answer) for context, answer in pairs) + 1  # + EOS
        raise ConfigError(
            f"--max-length {max_length} cuts the whole answer off {answerless} of {len(pairs)} training examples "
            f"(their prompts take up to {longest_prompt} tokens), leaving nothing to learn from them: pass "
            f"--max-length {longest_prompt + 1} or more ({whole} keeps every example whole)"
        )
