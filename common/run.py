"""run(profile): the story of one experiment, the same for both scripts.

set up (arguments, run directory guard, data, model; nothing written until every input is checked)
-> zero-shot accuracy -> train (monitored, best epoch selected on held-out examples) -> fine-tuned accuracy
-> final model -> metrics.json and a summary table.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common import artifacts, distributed, hub, runlock
from common.checkpoint_writer import CheckpointWriter, adam_moments, link_model_files
from common.config import (
    ConfigError,
    EngineArguments,
    ExperimentArguments,
    Profile,
    check_resumes_the_same_run,
    parse_arguments,
    resolved_config,
)
from common.data import (
    HUB_DATASET,
    DataError,
    ExperimentData,
    PadToLongest,
    build_experiment_data,
    training_features,
    training_pairs,
)
from common.distributed import evaluate_on_all_ranks, is_main_process, one_gpu_unless_distributed, world_size
from common.divergence import StopOnNonFiniteLoss
from common.engine import Engine, apply_engine, usable_engine
from common.evaluation import write_predictions
from common.memory import torch_peak_memory
from common.memory_plan import MemoryPlan, fit_to_gpu, planned_engine
from common.models import (
    ModelLoadError,
    check_model_path,
    count_parameters,
    is_hub_id,
    load_model,
    load_tokenizer,
    resolve_model_argument,
)
from common.monitor import GpuMonitor, format_summary
from common.phases import PhaseTimes, StartupClock
from common.precision import Precision, resolve_precision
from common.preflight import check_max_length, check_trainer_arguments
from common.reporting import MetricsFile, environment, summary_table
from common.rundir import RunDirError, check_disk, check_run_dir, clear_run_dir, directory_size_mib, first_free_dir
from common.training import (
    PiqaTrainer,
    build_training_arguments,
    check_visible_gpus,
    compute_device,
    configure_allocator,
    configure_ddp_communication,
)

USER_ERRORS = (ConfigError, DataError, ModelLoadError, RunDirError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so the same cleanup runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


@dataclass
class Experiment:
    """What one run works with, set up and checked before anything is written."""

    args: ExperimentArguments
    engine: EngineArguments  # as this hardware can run it (usable_engine)
    profile: Profile
    precision: Precision  # the profile's, resolved once for this machine
    run_dir: Path
    data: ExperimentData
    tokenizer: Any
    model: torch.nn.Module
    resume_from: Path | None  # the checkpoint to continue from (--resume)
    disk_estimate: dict  # what the checkpoints will need, and what the file system has free
    train_features: list[dict]  # the training examples tokenized (empty with --eval-only)
    truncated: int  # training examples --max-length cut
    memory_plan: MemoryPlan | None  # the engine's memory settings as fitted to this GPU (None on a CPU)
    startup_s: dict  # set-up's parts, s (the rest of start-up is the interpreter and the imports)
    step_engine: Engine | None = None  # the engine as applied to the model (common/engine/)
    writer: CheckpointWriter | None = None  # checkpoints in the background (None: the Trainer's, in the foreground)


@runlock.released_after  # the run directory is locked from set_up until the run ends (common/runlock.py)
def run(profile: Profile, argv: list[str] | None = None, parsed: tuple | None = None) -> int:
    """The experiment for baseline.py and modified.py (through common/launch.py, which passes the arguments it
    `parsed` from `argv`); returns the process exit code."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    # Ctrl-C must stop the run cleanly even when a parent shell started it with SIGINT ignored (`cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        experiment = set_up(profile, argv, parsed)
    except USER_ERRORS as err:
        if is_main_process():
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted while setting up: nothing was written", file=sys.stderr)
        return 130
    return carry_out(experiment)


def set_up(profile: Profile, argv: list[str] | None, parsed: tuple | None = None) -> Experiment:
    """Every input checked, data and model loaded; only then is the run directory cleared and config.json written."""
    clock = StartupClock()  # from here; before it: the interpreter, the imports
    user_visible_gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    if note := one_gpu_unless_distributed():
        print(note)
    args, engine = parsed or parse_arguments(argv, profile=profile)
    configure_allocator(engine)  # before anything starts CUDA
    distributed.init()
    args.micro_batch_size(engine, world_size())
    engine, notes = usable_engine(engine)
    precision = resolve_precision(profile.precision)
    check_visible_gpus(user_visible_gpus)
    args.model, model_note = resolve_model_argument(args.model)
    run_dir, run_dir_note = choose_run_dir(args, profile)
    if is_main_process():  # rank 0 holds the run directory for every rank
        runlock.check_not_in_use(run_dir)  # one run per directory (common/runlock.py)
    resume_from = check_run_dir(run_dir, args.overwrite, args.resume, args.model, args.eval_only)
    if resume_from and (run_dir / artifacts.CONFIG).is_file():
        check_resumes_the_same_run(json.loads((run_dir / artifacts.CONFIG).read_text()), args, profile)
    if is_main_process():
        runlock.acquire(run_dir)  # held until the run ends
    check_model_path(args.model)
    check_trainer_arguments(args, engine, profile, precision, run_dir)
    if is_main_process():
        for note in notes:
            print(f"note: {note}")
        for note in (model_note, run_dir_note):
            if note:
                print(note)
    hub.check_reachable(hub_needs(args))
    clock.lap("arguments_and_cuda")
    data = build_experiment_data(args.data_dir, args.smoke, args.train_samples, args.selection_samples,
                                 args.eval_sample_count(), args.seed, need_train=not args.eval_only)
    clock.lap("data")
    tokenizer = load_tokenizer(args.model, args.trust_remote_code, args.token)
    clock.lap("tokenizer")
    model = load_model(args.model, tokenizer, args.trust_remote_code, args.token, device=compute_device())
    writer = None
    if engine.background_checkpoints and not args.eval_only:
        writer = CheckpointWriter(model, pin=torch.cuda.is_available())
        writer.reserve(adam_moments(engine.optim))  # host buffers allocated in the background, while tokenizing
    clock.lap("model")
    pairs = training_pairs(data.train, tokenizer)  # empty with --eval-only
    check_max_length(pairs, args.max_length)
    features, truncated = training_features(pairs, tokenizer.eos_token_id, args.max_length)
    clock.lap("tokenize")
    step_engine = apply_engine(model, engine, precision, budget=False)  # the budget once the plan is known
    memory_plan = fit_to_gpu(model, engine, [len(f["input_ids"]) for f in features], args.batch_size, world_size(),
                             eval_only=args.eval_only)
    if memory_plan:
        engine = planned_engine(engine, memory_plan)
        if is_main_process():
            print(memory_plan.describe())
    step_engine.fit(model, engine)
    if step_engine.budget and is_main_process() and not args.eval_only:
        print(step_engine.budget.describe())
    clock.lap("engine")
    disk_estimate = {}
    if not args.eval_only and not resume_from:
        steps_per_epoch = math.ceil(len(features) / args.batch_size)
        epochs = math.ceil(args.max_steps / steps_per_epoch) if args.max_steps > 0 else math.ceil(args.num_train_epochs)
        disk_estimate = check_disk(run_dir, count_parameters(model), profile, engine.optim, epochs)
    distributed.barrier()  # every rank has checked the run directory before rank 0 changes it
    if is_main_process():
        if args.overwrite:
            clear_run_dir(run_dir)  # only now that every input has been checked
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / artifacts.CONFIG).write_text(json.dumps(resolved_config(args, engine, profile), indent=2) + "\n")
    distributed.barrier()
    clock.lap("disk_check_and_config")
    return Experiment(args, engine, profile, precision, run_dir, data, tokenizer, model, resume_from,
                      disk_estimate, features, truncated, memory_plan, clock.laps_s, step_engine, writer)


def choose_run_dir(args, profile: Profile) -> tuple[Path, str | None]:
    """--output-dir; else runs/<profile>; --eval-only gets a new directory of its own, never a training run's."""
    if args.output_dir:
        return Path(args.output_dir).expanduser(), None
    if args.eval_only:
        run_dir = first_free_dir(Path("runs") / f"{profile.name}-eval")
        return run_dir, f"--eval-only: writing to {run_dir}"
    return Path("runs") / profile.name, None


def hub_needs(args) -> dict[str, str]:
    """What this run would fetch from the Hugging Face Hub -> the option that makes it local instead."""
    needs = {}
    if not args.data_dir and not args.smoke:
        needs[f"PIQA ({HUB_DATASET})"] = hub.DATA_FIX
    if is_hub_id(args.model):
        needs[args.model] = hub.MODEL_FIX
    return needs


def carry_out(experiment: Experiment) -> int:
    """The experiment itself, monitored and timed phase by phase; metrics.json is rewritten after every phase, also
    when interrupted."""
    args, run_dir = experiment.args, experiment.run_dir
    metrics = MetricsFile(run_dir / artifacts.METRICS, run_record(experiment), write=is_main_process())
    torch_peaks: dict = {}
    monitor = GpuMonitor(run_dir / artifacts.GPU_LOG, interval_s=args.monitor_interval, pmon=args.pmon, phase="eval")
    phases = PhaseTimes(on_change=monitor.set_phase)
    metrics.update(timing={"startup_parts_s": experiment.startup_s})
    status = "failed"  # until the run ends normally or is interrupted
    try:
        with monitor:
            with torch_peak_memory("eval_zero_shot", torch_peaks), phases.phase("eval_zero_shot"):
                report_accuracy(experiment, "zero_shot", metrics)
            if not args.eval_only:
                with torch_peak_memory("train", torch_peaks), phases.phase("train_steps"):
                    trainer = train(experiment, phases, metrics)
                trainer.peaks.fold_into_phases(torch_peaks)  # the selection passes apart from training
                trainer.free_optimizer_state()
                experiment.model = trainer.model
                with torch_peak_memory("eval", torch_peaks, empty_cache=True), phases.phase("eval_fine_tuned"):
                    report_accuracy(experiment, "fine_tuned", metrics)
                with phases.phase("final_save"):
                    save_final_model(experiment, trainer)
        status = "finished"
    except KeyboardInterrupt as interrupt:
        status = "interrupted"
        print(f"\ninterrupted ({'SIGTERM' if isinstance(interrupt, Terminated) else 'Ctrl-C'}): "
              "partial results in metrics.json", file=sys.stderr)
    finally:
        checkpoints_mib = sum(directory_size_mib(p) for p in artifacts.checkpoints(run_dir))
        metrics.update(
            timing=phases.record(),
            memory={"nvml": monitor.summary(), "torch": torch_peaks},
            disk={"checkpoints_mib": checkpoints_mib, **experiment.disk_estimate},
            status=status,
        )
        steps_tokens_per_s = artifacts.training_steps_tokens_per_s(
            metrics.data["timing"], metrics.data.get("train", {}).get("session_tokens"))
        if steps_tokens_per_s is not None:
            metrics.update(timing={"train_steps_tokens_per_s": steps_tokens_per_s})
    if is_main_process():
        print(f"\n== {experiment.profile.name}: summary ({run_dir}) ==\n{summary_table(metrics.data)}")
        print(format_summary(metrics.data["memory"]["nvml"], torch_peaks))
    return 0 if status == "finished" else 130


def run_record(experiment: Experiment) -> dict:
    """What metrics.json says about the run before it starts: settings, model, data sizes, machine."""
    data = experiment.data
    return {
        "profile": experiment.profile.name,
        "settings": asdict(experiment.profile),
        "engine": asdict(experiment.engine),
        "activation_checkpointing": budget.record() if (budget := experiment.step_engine.budget) else None,
        "memory_plan": experiment.memory_plan.record() if experiment.memory_plan else None,
        "model": experiment.args.model,
        "eval_only": experiment.args.eval_only,  # then the one evaluation, of --model, is under accuracy.zero_shot
        "parameters": count_parameters(experiment.model),
        "environment": environment(),
        "data": {"train_examples": len(data.train), "selection_examples": len(data.selection),
                 "reported_examples": len(data.report)},
        "world_size": world_size(),
    }


def report_accuracy(experiment: Experiment, phase: str, metrics: MetricsFile) -> None:
    """Accuracy on the reported validation examples, one or both methods; predictions per example."""
    args = experiment.args
    methods = ["loglik", "generate"] if args.eval_method == "both" else [args.eval_method]
    results = {}
    for method in methods:
        result = evaluate_on_all_ranks(
            experiment.model, experiment.tokenizer, experiment.data.report, method=method,
            batch_size=args.eval_batch_size, autocast_dtype=experiment.precision.autocast_dtype, progress=is_main_process(),
            **eval_memory(experiment),
        )
        results[method] = result.metrics()
        if not is_main_process():
            continue
        write_predictions(experiment.run_dir / artifacts.predictions(phase, method), result)
        label = f"eval-only accuracy of {args.model}" if args.eval_only else f"{phase} accuracy"
        print(f"{label} ({method}, {result.n_examples} examples, {result.seconds:.1f} s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in result.metrics().items() if k.endswith("_pct")))
    accuracy = {"n_examples": len(experiment.data.report), phase: results}
    if phase == "fine_tuned":
        before = metrics.data["accuracy"]["zero_shot"]
        accuracy["change_acc_pts"] = (results["loglik"]["acc_pct"] - before["loglik"]["acc_pct"]
                                      if "loglik" in results else None)
    metrics.update(accuracy=accuracy)


def eval_memory(experiment: Experiment) -> dict:
    """The evaluation's logits bound (loglik method), where the memory plan set one."""
    plan = experiment.memory_plan
    return {"logits_bytes": plan.eval_logits_bytes} if plan else {}


def train(experiment: Experiment, phases: PhaseTimes, metrics: MetricsFile) -> PiqaTrainer:
    """The Trainer on the training examples; each epoch ends with accuracy on the selection examples."""
    args, engine, tokenizer = experiment.args, experiment.engine, experiment.tokenizer
    features, truncated = experiment.train_features, experiment.truncated
    if truncated:
        print(f"note: --max-length {args.max_length} cut {truncated} of {len(features)} training examples")
    trainer = PiqaTrainer(
        model=experiment.model,
        args=build_training_arguments(args, engine, experiment.profile, experiment.precision, str(experiment.run_dir)),
        train_dataset=features,  # a list of dicts: datasets is needed only to read PIQA from the Hub
        data_collator=experiment.step_engine.collator(PadToLongest(tokenizer.pad_token_id, engine.pad_to_multiple_of)),
        engine=experiment.step_engine,
        processing_class=tokenizer,
        eval_dataset=experiment.data.selection,
        eval_batch_size=args.eval_batch_size,
        eval_options=eval_memory(experiment),
        phases=phases,
        writer=experiment.writer,
        callbacks=[StopOnNonFiniteLoss()],  # the first non-finite loss ends the run (common/divergence.py)
    )
    configure_ddp_communication(trainer, engine)
    resume_from = experiment.resume_from
    tokens_before = _tokens_seen_before(resume_from)  # read now: checkpoint rotation may delete it
    if resume_from:
        print(f"resuming from {resume_from}")
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        metrics.update(train=training_record(trainer, truncated, resume_from),
                       memory={"torch_first_step_allocated_mib": trainer.first_step_memory.allocated_mib})
    runtime_s = output.metrics["train_runtime"]  # includes the selection passes and the checkpoint saves
    session_tokens = trainer.state.num_input_tokens_seen - tokens_before
    metrics.update(
        timing={
            "train_runtime_s": runtime_s,
            "train_samples_per_s": output.metrics["train_samples_per_second"],
            "train_tokens_per_s": session_tokens / runtime_s if runtime_s else None,  # non-padding, this session
            "checkpoint_writes_s": trainer.writer.write_seconds if trainer.writer else [],  # in the background
            "checkpoint_copies_s": trainer.writer.stage_seconds if trainer.writer else [],  # to host memory
            "checkpoint_buffers_allocated_s": trainer.writer.reserve_seconds if trainer.writer else None,  # background
        },
        train={"mean_loss": output.training_loss,  # the Trainer's mean over every step of this session
               "session_tokens": session_tokens},  # non-padding tokens trained on by this process
    )
    return trainer


def save_final_model(experiment: Experiment, trainer: PiqaTrainer) -> None:
    """final_model/: where the model holds a checkpoint's weights (the last one staged, or the best one loaded), its
    model files are hard links to that checkpoint's, made once it is complete; then every write is waited for."""
    final_model = experiment.run_dir / artifacts.FINAL_MODEL
    source = trainer.checkpoint_holding_weights()  # the same on every rank
    if source is None:
        trainer.save_model(str(final_model))
    elif is_main_process() and not (trainer.writer and trainer.writer.also_link_model_files(source, final_model)):
        trainer.finish_checkpoints()  # a write still running is waited for as such; a failed one says so here
        link_model_files(source, final_model)
    if is_main_process():
        final_model.mkdir(parents=True, exist_ok=True)
        experiment.tokenizer.save_pretrained(str(final_model))
        if source is not None:
            torch.save(trainer.args, final_model / "training_args.bin")  # as Trainer.save_model writes it
    trainer.finish_checkpoints()
    # Under FSDP the save all-gathers the weights and only rank 0 waits for each transfer; a rank that
    # exited now would take its half of the queued transfers with it and leave rank 0 waiting forever.
    distributed.barrier()


def _tokens_seen_before(checkpoint: Path | None) -> int:
    """Non-padding tokens the resumed checkpoint had already trained on (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    return json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)


def training_record(trainer: PiqaTrainer, truncated: int, resume_from: Path | None) -> dict:
    state = trainer.state
    per_epoch = [
        {"epoch": e["epoch"], "step": e["step"], "accuracy_pct": e["eval_accuracy"]}
        for e in state.log_history if "eval_accuracy" in e
    ]
    losses = [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e]
    return {
        "parallelism": distributed.parallelism(trainer),
        "optimizer_steps": state.global_step,
        "non_padding_tokens": state.num_input_tokens_seen,
        "truncated_examples": truncated,
        "resumed_from": str(resume_from) if resume_from else None,
        "best_checkpoint": state.best_model_checkpoint,
        "selection_accuracy_per_epoch": per_epoch,
        "loss_per_step": losses,
    }
