"""TrainingArguments from the experiment and a Profile; a Trainer whose evaluation is PIQA accuracy."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch
from transformers import Trainer, TrainingArguments

from common.config import LIGER_KERNELS, ConfigError, ExperimentArguments, Profile
from common.distributed import evaluate_on_all_ranks, world_size

SELECTION_METRIC = "accuracy"  # Trainer logs it as eval_accuracy: loglik acc on the selection slice, in %


def mixed_precision_dtype() -> torch.dtype:
    """bf16 where the hardware has it (any CUDA GPU from Ampere on, and CPUs); fp16 + GradScaler otherwise."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def autocast_dtype(profile: Profile) -> torch.dtype | None:
    return mixed_precision_dtype() if profile.precision == "mixed" else None


def check_visible_gpus(visible: str | None) -> None:
    """CUDA_VISIBLE_DEVICES (as the user set it) naming GPUs none of which exist is a mistake, not a request for the CPU."""
    if visible is not None and visible.strip() not in ("", "-1") and torch.cuda.device_count() == 0:
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible} names no GPU this process can use; fix it, or set it to '' to run on the CPU"
        )


def compute_device() -> torch.device:
    """This process's GPU (its LOCAL_RANK under torchrun), else the CPU; the zero-shot evaluation runs there too."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def liger_kernel_usable() -> bool:
    """Liger's Triton kernels need a CUDA GPU and the liger-kernel package; elsewhere a profile runs without them."""
    if not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        warnings.warn("use_liger_kernel: liger-kernel is not installed (pip install liger-kernel); running without it")
        return False
    return True


def liger_kernel_config(profile: Profile) -> dict[str, bool] | None:
    """Profile.liger_kernels as the Trainer's liger_kernel_config: the named kernels on, the others off."""
    if profile.liger_kernels is None:
        return None
    return {kernel: kernel in profile.liger_kernels for kernel in LIGER_KERNELS}


def apply_profile_kernels(model: torch.nn.Module, profile: Profile) -> None:
    """Patch in the profile's Liger kernels now, before any evaluation, so that the zero-shot and fine-tuned
    evaluations of a run, and an --eval-only run of the same profile, all use the kernels the profile trains with.
    (The Trainer patches only when it is built, after the zero-shot evaluation; patching again there is harmless.)"""
    if not (profile.use_liger_kernel and liger_kernel_usable()):
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance  # what the Trainer calls

    _apply_liger_kernel_to_instance(model=model, **(liger_kernel_config(profile) or {}))


def build_training_arguments(args: ExperimentArguments, profile: Profile, run_dir: str) -> TrainingArguments:
    mixed = profile.precision == "mixed"
    half = mixed_precision_dtype() if mixed else None
    on_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=run_dir,
        # The experiment: identical in both profiles.
        seed=args.seed,
        data_seed=args.seed,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.micro_batch_size(profile, world_size()),
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a share of all steps in transformers 5
        weight_decay=args.weight_decay,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="steps",
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        disable_tqdm=False,
        # The profile: how the experiment is executed.
        bf16=mixed and half == torch.bfloat16,
        fp16=mixed and half == torch.float16,
        tf32=False if on_cuda and not mixed else None,  # "standard" fp32: no TF32 matmuls in baseline
        **checkpointing_arguments(profile.gradient_checkpointing),
        save_total_limit=profile.save_total_limit,
        load_best_model_at_end=profile.load_best_model_at_end,
        metric_for_best_model=SELECTION_METRIC if profile.load_best_model_at_end else None,
        greater_is_better=True if profile.load_best_model_at_end else None,
        dataloader_pin_memory=profile.pin_memory and on_cuda,
        use_cpu=not on_cuda,
        gradient_accumulation_steps=profile.gradient_accumulation_steps,
        optim=profile.optim,
        use_liger_kernel=profile.use_liger_kernel and liger_kernel_usable(),
        liger_kernel_config=liger_kernel_config(profile),
        torch_compile=profile.torch_compile,
        train_sampling_strategy=profile.train_sampling_strategy,
        ddp_bucket_cap_mb=profile.ddp_bucket_cap_mb,
        ddp_static_graph=profile.ddp_static_graph,
    )


def configure_ddp_communication(trainer: Trainer, profile: Profile) -> None:
    """Register the profile's DDP gradient-compression hook; TrainingArguments has no field for it, so it is set on
    the accelerator's DDP settings, which are applied when the Trainer wraps the model at the start of train()."""
    if profile.ddp_comm_hook is None or trainer.accelerator.ddp_handler is None:
        return
    from accelerate.utils import DDPCommunicationHookType

    trainer.accelerator.ddp_handler.comm_hook = DDPCommunicationHookType(profile.ddp_comm_hook)


def checkpointing_arguments(enabled: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; accept either version."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


class SelectionPeaks:
    """Torch allocator peaks of training, with the per-epoch selection evaluations measured apart (MiB).

    Without this the training peak would be the selection pass's, whose full-vocabulary logits can exceed it.
    """

    def __init__(self) -> None:
        self.train = {"max_allocated_mib": 0.0, "max_reserved_mib": 0.0}
        self.select = {"max_allocated_mib": 0.0, "max_reserved_mib": 0.0}

    def _fold_into(self, peaks: dict) -> None:
        if torch.cuda.is_available():
            peaks["max_allocated_mib"] = max(peaks["max_allocated_mib"], torch.cuda.max_memory_allocated() / 2**20)
            peaks["max_reserved_mib"] = max(peaks["max_reserved_mib"], torch.cuda.max_memory_reserved() / 2**20)
            torch.cuda.reset_peak_memory_stats()

    def begin_selection(self) -> None:
        self._fold_into(self.train)

    def end_selection(self) -> None:
        self._fold_into(self.select)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the selection pass's cached blocks back, so NVML's training figure is training's

    def training_peaks(self, since_last_selection: dict) -> dict:
        """Combine with the peaks recorded after the last selection pass."""
        if since_last_selection.get("max_allocated_mib") is None:
            return since_last_selection
        return {k: max(v, since_last_selection[k]) for k, v in self.train.items()}


class PiqaTrainer(Trainer):
    """The Trainer, with `evaluate()` measuring PIQA accuracy (log-likelihood method) on its `eval_dataset`:
    the selection slice, a list of PiqaExample held out from the training data.

    Each epoch's `eval_accuracy` is what `load_best_model_at_end` selects on. The reported
    validation examples never pass through here.
    """

    def __init__(
        self,
        *args,
        eval_batch_size: int,
        eval_autocast_dtype: torch.dtype | None,
        on_phase: Callable[[str], None] = lambda phase: None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.selection_batch_size = eval_batch_size
        self.eval_autocast_dtype = eval_autocast_dtype
        self.on_phase = on_phase
        self.peaks = SelectionPeaks()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        self.on_phase("select")
        self.peaks.begin_selection()
        try:
            result = evaluate_on_all_ranks(
                self.model,
                self.processing_class,
                eval_dataset if eval_dataset is not None else self.eval_dataset,
                method="loglik",
                batch_size=self.selection_batch_size,
                autocast_dtype=self.eval_autocast_dtype,
            )
        finally:
            self.peaks.end_selection()
            self.on_phase("train")
        metrics = {
            f"{metric_key_prefix}_{SELECTION_METRIC}": result.acc_pct,
            f"{metric_key_prefix}_acc_norm": result.acc_norm_pct,
            f"{metric_key_prefix}_examples": result.n_examples,
            f"{metric_key_prefix}_runtime": result.seconds,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
