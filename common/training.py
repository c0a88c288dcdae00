"""The experiment, the engine and a Profile (its precision resolved: common/precision.py) as TrainingArguments; the
allocator's settings; a Trainer (the engine's, common/engine/) whose evaluation is PIQA accuracy."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from common import artifacts, distributed
from common.checkpoint_writer import CheckpointWriter, staging_dir
from common.config import ConfigError, EngineArguments, ExperimentArguments, Profile
from common.distributed import evaluate_on_all_ranks, world_size
from common.engine import EngineTrainer, liger_kernel_config
from common.memory import GIB, MIB, SelectionPeaks, allocated_bytes
from common.phases import PhaseTimes
from common.precision import Precision

SELECTION_METRIC = "accuracy"  # Trainer logs it as eval_accuracy: loglik acc on the selection slice, in %


def check_visible_gpus(visible: str | None) -> None:
    """CUDA_VISIBLE_DEVICES (as the user set it) naming GPUs none of which exist is a mistake, not a request for the CPU."""
    if visible is not None and visible.strip() not in ("", "-1") and torch.cuda.device_count() == 0:
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible} names no GPU this process can use; fix it, or set it to '' to run on the CPU"
        )


def configure_allocator(engine: EngineArguments) -> None:
    """The engine's CUDA allocator settings; to be called before CUDA starts (a user's PYTORCH_CUDA_ALLOC_CONF wins).
    --gpu-memory-gib caps the allocator after the setting, since capping starts CUDA."""
    if engine.expandable_segments:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if engine.gpu_memory_gib is not None and torch.cuda.is_available():
        device = compute_device()
        total_bytes = torch.cuda.get_device_properties(device).total_memory
        if engine.gpu_memory_gib * GIB > total_bytes:
            raise ConfigError(f"--gpu-memory-gib {engine.gpu_memory_gib:g} is more than this GPU's "
                              f"{total_bytes / GIB:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(engine.gpu_memory_gib * GIB / total_bytes, device)


def compute_device() -> torch.device:
    """This process's GPU (its LOCAL_RANK under torchrun), else the CPU; the zero-shot evaluation runs there too."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_training_arguments(
    args: ExperimentArguments, engine: EngineArguments, profile: Profile, precision: Precision, run_dir: str
) -> TrainingArguments:
    return TrainingArguments(**training_argument_values(args, engine, profile, precision, run_dir))


def training_argument_values(
    args: ExperimentArguments, engine: EngineArguments, profile: Profile, precision: Precision, run_dir: str
) -> dict:
    """The one place where the experiment, the engine and the profile (its precision resolved for this machine)
    become TrainingArguments' values."""
    on_cuda = precision.on_cuda
    return dict(
        output_dir=run_dir,
        # The experiment: identical in both runs.
        seed=args.seed,
        data_seed=args.seed,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.micro_batch_size(engine, world_size()),
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
        use_cpu=not on_cuda,
        # The engine: how a step is executed, identical in both runs.
        gradient_accumulation_steps=engine.gradient_accumulation_steps,
        **checkpointing_arguments(engine.gradient_checkpointing),
        optim=engine.optim,
        logging_nan_inf_filter=False,  # its isnan/isinf check of every micro-batch's loss waits for the GPU
        use_liger_kernel=engine.liger,
        liger_kernel_config=liger_kernel_config(engine) if engine.liger else None,
        torch_compile=engine.torch_compile,
        train_sampling_strategy=engine.train_sampling_strategy,
        ddp_bucket_cap_mb=engine.ddp_bucket_cap_mb,
        ddp_static_graph=engine.ddp_static_graph,
        # The profile: what the two scripts compare.
        **precision.trainer_flags(),  # fp32: no TF32 matmuls either
        save_total_limit=profile.save_total_limit,
        load_best_model_at_end=profile.load_best_model_at_end,
        metric_for_best_model=SELECTION_METRIC if profile.load_best_model_at_end else None,
        greater_is_better=True if profile.load_best_model_at_end else None,
        dataloader_pin_memory=profile.pin_memory and on_cuda,
    )


def configure_ddp_communication(trainer: Trainer, engine: EngineArguments) -> None:
    """Register the engine's DDP gradient-compression hook; TrainingArguments has no field for it, so it is set on
    the accelerator's DDP settings, which are applied when the Trainer wraps the model at the start of train()."""
    if engine.ddp_comm_hook is None or trainer.accelerator.ddp_handler is None:
        return
    from accelerate.utils import DDPCommunicationHookType

    trainer.accelerator.ddp_handler.comm_hook = DDPCommunicationHookType(engine.ddp_comm_hook)


def checkpointing_arguments(enabled: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; accept either version."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing enabled as the Trainer enables it from checkpointing_arguments (outside a Trainer)."""
    (name, _), (_, kwargs) = checkpointing_arguments(True).items()
    getattr(model, f"{name}_enable")(**{f"{name}_kwargs": kwargs})


class FirstStepMemory(TrainerCallback):
    """torch's allocated memory around the first optimizer step, MiB: what the state and the first micro-batches hold
    (the optimizer's state is created in that step)."""

    def __init__(self) -> None:
        self.allocated_mib: dict[str, float] = {}

    def _record(self, moment: str) -> None:
        allocated = allocated_bytes()
        if allocated is not None and moment not in self.allocated_mib:
            self.allocated_mib[moment] = allocated / MIB

    def on_step_begin(self, args, state, control, **kwargs):
        self._record("before_first_step")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._record("before_first_optimizer_step")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._record("after_first_optimizer_step")


class PiqaTrainer(EngineTrainer):
    """The Trainer, with `evaluate()` measuring PIQA accuracy (log-likelihood method) on its `eval_dataset`:
    the selection slice, a list of PiqaExample held out from the training data; checkpoints written in the
    background (common/checkpoint_writer.py); each phase's time charged to `phases`.

    Each epoch's `eval_accuracy` is what `load_best_model_at_end` selects on. The reported
    validation examples never pass through here.
    """

    def __init__(self, *args, eval_batch_size: int, phases: PhaseTimes, writer: CheckpointWriter | None = None,
                 eval_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.selection_batch_size = eval_batch_size
        self.eval_options = eval_options or {}  # the evaluation's memory bound (common/memory_plan.py)
        self.phases = phases
        self.peaks = SelectionPeaks()
        self.writer = writer  # None: the Trainer's own checkpoint saving, on the training thread
        self._staged_step = -1  # global step of the last checkpoint staged for the writer
        self._loaded_best = False
        self._best_hidden: str | None = None  # the best checkpoint, while the Trainer must not look for it
        self.first_step_memory = FirstStepMemory()
        self.add_callback(self.first_step_memory)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            self.wait_for_checkpoints()  # no write left running; every checkpoint kept, for --resume
            raise
        finally:
            if self._best_hidden is not None:  # see _load_best_model
                self.state.best_model_checkpoint, self._best_hidden = self._best_hidden, None

    def wait_for_checkpoints(self) -> None:
        """Wait for the background writes (they overlap the final evaluation and save); raises a write's error."""
        if self.writer is None:
            return
        if self.writer.busy:
            with self.phases.phase("checkpoint_wait"):
                self.writer.wait()
        self.writer.close()

    def finish_checkpoints(self) -> None:
        """Once training has finished: wait for the writes, then keep only the best checkpoint where save_total_limit
        is 1, as the Trainer does at the end of train()."""
        if self.writer is None:
            return
        self.wait_for_checkpoints()
        best = self.state.best_model_checkpoint
        if self.args.should_save and best and self.args.save_total_limit == 1:
            for checkpoint in artifacts.checkpoints(Path(self.args.output_dir)):
                if checkpoint.resolve() != Path(best).resolve():
                    shutil.rmtree(checkpoint, ignore_errors=True)

    def free_optimizer_state(self) -> None:
        """After training: the optimizer's state (AdamW: 8 bytes a parameter) is in the checkpoints and not needed
        again; freed so that the fine-tuned evaluation's memory peak is the evaluation's."""
        if self.optimizer is not None:
            getattr(self.optimizer, "optimizer", self.optimizer).state.clear()  # accelerate's wrapper shares it

    def weights_as_staged(self) -> bool:
        """The model's weights are those of the last checkpoint staged (no step and no load since)."""
        return self.writer is not None and self._staged_step == self.state.global_step and not self._loaded_best

    def checkpoint_holding_weights(self) -> Path | None:
        """The checkpoint whose model files hold the model's weights now: the last one staged (no step since) or the
        best one loaded; None under FSDP and DeepSpeed, whose checkpoints store them in their own layout."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return None
        if self.weights_as_staged():
            return Path(self.args.output_dir) / f"checkpoint-{self._staged_step}"
        best = self.state.best_model_checkpoint
        return Path(best) if self._loaded_best and best else None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        self.peaks.begin_selection()
        try:
            with self.phases.phase("select"):
                result = evaluate_on_all_ranks(
                    self.model,
                    self.processing_class,
                    eval_dataset if eval_dataset is not None else self.eval_dataset,
                    method="loglik",
                    batch_size=self.selection_batch_size,
                    autocast_dtype=self.engine.precision.autocast_dtype,
                    **self.eval_options,
                )
        finally:
            self.peaks.end_selection()
        metrics = {
            f"{metric_key_prefix}_{SELECTION_METRIC}": result.acc_pct,
            f"{metric_key_prefix}_acc_norm": result.acc_norm_pct,
            f"{metric_key_prefix}_examples": result.n_examples,
            f"{metric_key_prefix}_runtime": result.seconds,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model, trial) -> None:
        with self.phases.phase("checkpoint_save"):
            if self.writer is None or self.is_fsdp_enabled or self.is_deepspeed_enabled or self.args.save_only_model:
                return super()._save_checkpoint(model, trial)  # the Trainer's own, on this thread
            self._save_checkpoint_in_background(trial)

    def _save_checkpoint_in_background(self, trial) -> None:
        """The Trainer's _save_checkpoint (transformers 5.x) with the two large files written by self.writer."""
        self.store_flos()
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"checkpoint-{self.state.global_step}"
        best = self.state.best_global_step
        if best and (best == self.state.global_step or (run_dir / f"checkpoint-{best}").exists()):
            self.state.best_model_checkpoint = str(run_dir / f"checkpoint-{best}")
        staging = staging_dir(final)  # every rank writes its RNG state there, never into a visible checkpoint-N
        if self.args.should_save:
            best_checkpoint = self.state.best_model_checkpoint
            limit = self.args.save_total_limit
            self.writer.stage(
                final, self.model.state_dict(), self.optimizer.state_dict(),
                after=lambda: rotate_checkpoints(str(run_dir), limit, best_checkpoint, use_mtime=False),
            )
            self._staged_step = self.state.global_step
        distributed.barrier()  # every rank's RNG state goes into rank 0's staging directory
        try:
            staging.mkdir(parents=True, exist_ok=True)
            self._save_rng_state(str(staging))
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), staging / "scheduler.pt")
                self._save_scaler(str(staging))
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(str(staging))
                torch.save(self.args, staging / "training_args.bin")
                self._save_trainer_state(staging)
            distributed.barrier()
        except BaseException:
            if self.args.should_save:
                self.writer.abandon()  # no checkpoint-N without its small files
            raise
        if self.args.should_save:
            self.writer.small_files_written()

    def _save_trainer_state(self, directory: Path) -> None:
        """trainer_state.json, with the stateful callbacks' state, as the Trainer writes it."""
        from transformers.trainer_callback import ExportableState

        for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()
        self.state.save_to_json(str(directory / "trainer_state.json"))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self.weights_as_staged() and Path(best).name == f"checkpoint-{self._staged_step}":
            # The best is the last checkpoint, staged from the weights the model still holds: nothing to load, and
            # no need to wait for its write.
            if distributed.is_main_process():
                print(f"the best checkpoint is the last, {best} (selection accuracy {self.state.best_metric:.2f} %): "
                      "the model holds its weights already")
        else:
            with self.phases.phase("load_best"):
                super()._load_best_model()  # an earlier checkpoint: complete, since each save waits for the last
            self._loaded_best = True
        if self.writer is not None:
            # The Trainer's end-of-train cleanup lists and deletes checkpoints while the last one may still be renamed
            # and rotated in the background: it sees no best until train() returns, and finish_checkpoints cleans up.
            self._best_hidden, self.state.best_model_checkpoint = best, None

    def _issue_warnings_after_load(self, load_result) -> None:
        """A checkpoint holds a tied output projection once, under the input embeddings' name: say so in one line,
        instead of transformers' 'missing keys' warning (best-model load and --resume alike)."""
        tied = tied_parameter_names(self.model)
        missing = set(load_result.missing_keys)
        if missing and missing <= tied and not load_result.unexpected_keys:
            if distributed.is_main_process():
                print(f"checkpoint loaded; {', '.join(sorted(missing))} shares the input embeddings' weights, loaded "
                      "with them")
            return
        super()._issue_warnings_after_load(load_result)


def tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter's tensor (the tied output projection), not counting the first."""
    first_name: dict[int, str] = {}
    tied = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first_name:
            tied.add(name)
        else:
            first_name[id(parameter)] = name
    return tied
