"""One configuration trained for warm-up + timed optimizer steps through the experiment's own code path (the
engine set up as run() sets it up, TrainingArguments from training_argument_values, the HF Trainer): one row."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from common.config import EngineArguments, ExperimentArguments
from tools.benchmark.configurations import BenchConfig
from tools.benchmark.timing import (
    CountingCollator,
    Measured,
    epoch_padding_share,
    make_profiler_callback,
    make_step_timer,
    measure,
    mega_batch_steps,
)
from tools.benchmark.workload import PIQA_TRAIN_EXAMPLES, mean_length, sample_lengths, synthetic_features

H100_BF16_DENSE_PEAK_FLOPS = 989e12  # H100 SXM, bf16 tensor cores, dense (no sparsity)
# A run's TrainingArguments changed for timing training steps alone: no evaluation, checkpoint, log or progress bar.
TIMING_ONLY = {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False, "report_to": [],
               "metric_for_best_model": None, "greater_is_better": None, "disable_tqdm": True, "logging_first_step": False}


@dataclass
class TrainerSetup:
    """A configuration made ready to train: the Trainer and what the row reports about it."""

    trainer: Any
    model: Any
    engine: EngineArguments  # what the engine became on this machine (usable_engine)
    training_args: Any
    collator: CountingCollator
    parameters: int
    step_engine: Any  # common.engine.Engine: the engine as applied (its precision, its activation budget)


def run_config(
    config: BenchConfig,
    model_name: str,
    steps: int,
    warmup_steps: int,
    max_measure_s: float,
    dataset_size: int,
    seed: int,
    lengths: dict[str, Any],
    profile_steps: int = 0,
) -> dict[str, Any]:
    """Train `config` for warm-up + timed optimizer steps; one row of measurements.

    `profile_steps` > 0: the timed steps run under torch.profiler (slower), and the row gets where the time went.
    Under torchrun (DDP, one GPU per process) every rank runs this; tokens are summed over ranks, step times and
    peak memory are the slowest / largest rank's, and the row is the same on every rank.
    """
    from common.distributed import parallelism, world_size
    from common.training import configure_allocator

    configure_allocator(config.engine)  # before prepare_device starts CUDA
    ranks = world_size()
    if ranks > 1:
        max_measure_s = math.inf  # every rank must stop at the same step: a count, not a clock
    device = prepare_device()
    started = time.perf_counter()
    timed_steps = profile_steps or timed_step_count(config, steps, dataset_size, ranks)
    timer = make_step_timer(warmup_steps, timed_steps, max_measure_s)
    profiler = make_profiler_callback(warmup_steps) if profile_steps else None
    bench = set_up(config, model_name, warmup_steps + timed_steps, dataset_size, seed, lengths,
                   callbacks=[timer] + ([profiler] if profiler else []))
    output = bench.trainer.train()
    wall_s = time.perf_counter() - started
    measured = measure(timer, bench.collator, warmup_steps, ranks)
    row = {
        **configuration_fields(config, bench.engine, bench.training_args),
        "applied": applied_fields(bench.trainer, bench.model),
        "model": model_name,
        "parameters": bench.parameters,
        "device": device,
        "world_size": ranks,
        "parallelism": parallelism(bench.trainer),
        "warmup_steps": warmup_steps,
        **speed_fields(measured, config, bench, lengths, seed, ranks),
        "final_loss": output.training_loss,
        "config_wall_s": wall_s,
    }
    if profiler:  # under DDP: rank 0's profile, its kernels on all streams (so busy can pass 100%)
        row["profile_summary"] = profiler.summary(len(measured.step_s), sum(measured.step_s))
    if measured.trainer_counted != sum(measured.real):
        row["warning"] = (f"Trainer counted {measured.trainer_counted} non-padding tokens, "
                          f"the collator {sum(measured.real)}")
    del bench
    release_memory()
    return row


def prepare_device() -> str:
    """This process's GPU chosen (its rank's under torchrun) and its memory peaks reset; the device's name."""
    import torch

    from common.training import compute_device

    if not torch.cuda.is_available():
        return "cpu"
    torch.cuda.set_device(compute_device())
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.get_device_name()


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed_step_count(config: BenchConfig, steps: int, dataset_size: int, ranks: int) -> int:
    """`steps`; for length-grouped batches at least one whole mega-batch, so the steps span PIQA's lengths."""
    if config.engine.train_sampling_strategy == "group_by_length":
        return max(steps, mega_batch_steps(dataset_size, config.batch_size, ranks))
    return steps


@dataclass
class Workload:
    """A configuration's model, engine, TrainingArguments, synthetic data and collator, as a run builds them; both
    the Trainer rows and the plain loop train it."""

    model: Any
    engine: EngineArguments  # what the engine became on this machine (usable_engine)
    training_args: Any
    collator: CountingCollator
    features: list[dict]
    parameters: int
    step_engine: Any  # common.engine.Engine: the engine as applied (its precision, its activation budget)


def prepare_workload(config: BenchConfig, model_name: str, total_steps: int, dataset_size: int, seed: int,
                     lengths: dict[str, Any]) -> Workload:
    import torch
    from transformers import TrainingArguments

    from common.data import PadToLongest
    from common.engine import apply_engine, usable_engine
    from common.models import count_parameters, load_model, load_tokenizer
    from common.precision import resolve_precision
    from common.preflight import check_mixed_precision
    from common.training import training_argument_values

    tokenizer = load_tokenizer(model_name)
    with torch.device("cuda") if torch.cuda.is_available() else contextlib.nullcontext():
        model = load_model(model_name, tokenizer)  # fp32 weights, as the scripts load them
    engine, _ = usable_engine(config.engine)  # set up as run() does it
    precision = resolve_precision(config.profile.precision)
    step_engine = apply_engine(model, engine, precision)
    features = synthetic_features(dataset_size, model.config.vocab_size, lengths, seed)
    run_dir = tempfile.mkdtemp(prefix="bench-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in config.name))
    experiment = ExperimentArguments(model=model_name, batch_size=config.batch_size, max_steps=total_steps, seed=seed)
    values = training_argument_values(experiment, engine, config.profile, precision, run_dir)
    training_args = TrainingArguments(**{**values, **TIMING_ONLY})
    check_mixed_precision(training_args.mixed_precision, precision)  # an accelerate config's cannot override it
    collator = CountingCollator(step_engine.collator(PadToLongest(tokenizer.pad_token_id,
                                                                  pad_to_multiple_of=engine.pad_to_multiple_of)))
    return Workload(model, engine, training_args, collator, features, count_parameters(model), step_engine)


def set_up(config: BenchConfig, model_name: str, total_steps: int, dataset_size: int, seed: int,
           lengths: dict[str, Any], callbacks: list) -> TrainerSetup:
    """The workload in the Trainer the run uses (without its evaluation and checkpoint writer)."""
    from common.engine import EngineTrainer
    from common.training import configure_ddp_communication

    work = prepare_workload(config, model_name, total_steps, dataset_size, seed, lengths)
    trainer = EngineTrainer(model=work.model, args=work.training_args, train_dataset=work.features,
                            data_collator=work.collator, callbacks=callbacks, engine=work.step_engine)
    configure_ddp_communication(trainer, work.engine)
    return TrainerSetup(trainer, work.model, work.engine, work.training_args, work.collator, work.parameters,
                        work.step_engine)


def configuration_fields(config: BenchConfig, engine: EngineArguments, training_args) -> dict[str, Any]:
    """What ran: the configuration, the engine as set up, and the TrainingArguments the Trainer got."""
    return {
        "name": config.name,
        "group": config.group,
        "engine_path": config.engine_path,  # "HF Trainer", or "plain loop" (plain_loop.py)
        "description": config.description,
        "row": config.row,
        "profile": dataclasses.asdict(config.profile),
        "engine": dataclasses.asdict(engine),
        "batch_size": config.batch_size,
        "micro_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "pad_to_multiple_of": config.engine.pad_to_multiple_of,
        "training_arguments": {
            "bf16": training_args.bf16, "fp16": training_args.fp16, "tf32": training_args.tf32,
            "optim": str(getattr(training_args.optim, "value", training_args.optim)),
            "gradient_checkpointing": training_args.gradient_checkpointing,
            "use_liger_kernel": training_args.use_liger_kernel,
            "torch_compile": training_args.torch_compile,
            "train_sampling_strategy": training_args.train_sampling_strategy,
            "dataloader_pin_memory": training_args.dataloader_pin_memory,
            "ddp_bucket_cap_mb": training_args.ddp_bucket_cap_mb,
            "ddp_static_graph": training_args.ddp_static_graph,
            "ddp_comm_hook": config.engine.ddp_comm_hook,
        },
    }


def applied_fields(trainer, model) -> dict[str, Any]:
    """What the Trainer really applied, read from the model and optimizer rather than from the arguments."""
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return {
        "liger_patched_modules": liger_patched_modules(model),
        "compiled": hasattr(trainer.model_wrapped, "_orig_mod") or hasattr(trainer.model, "_orig_mod"),
        "optimizer": type(optimizer).__name__,
        # DDP keeps the hooks it registered (a private list: empty where absent)
        "ddp_comm_hooks": [hook.__qualname__ for hook, _ in getattr(trainer.model_wrapped, "_comm_hooks", [])],
    }


def liger_patched_modules(model) -> int:
    """Modules whose forward is Liger's: it binds its own forward to the modules it patches (and to the model)."""
    return sum(1 for m in model.modules()
               if getattr(getattr(m, "forward", None), "__module__", "").startswith("liger_kernel"))


def speed_fields(m: Measured, config: BenchConfig, bench: TrainerSetup, lengths: dict[str, Any], seed: int,
                 ranks: int) -> dict[str, Any]:
    """Times, tokens/s, padding, MFU, memory peaks and what they mean for one epoch of PIQA's training split.
    `bench`: a TrainerSetup, or plain_loop's PlainSetup (its parameters, training_args and step_engine are read)."""
    tokens_per_s = sum(m.real) / sum(m.step_s)
    budget = bench.step_engine.budget
    recomputed = recomputed_share(m, config, budget)
    flops_per_token = (6 + 2 * recomputed) * bench.parameters
    micro_batch_size = bench.training_args.per_device_train_batch_size
    piqa_lengths = sample_lengths(lengths["train_sequence"], PIQA_TRAIN_EXAMPLES, random.Random(seed))
    return {
        "warmup_s": m.warmup_s,
        "timed_steps": len(m.step_s),
        "planned_timed_steps": m.planned_steps,  # more than timed_steps: --max-measure-s cut the row short
        "step_ms_median": 1000 * statistics.median(m.step_s),
        "step_ms": [round(1000 * s, 2) for s in m.step_s],
        "compute_ms_median": 1000 * statistics.median(m.compute_s),
        "nonpad_tokens_per_step_mean": statistics.fmean(m.real),
        "nonpad_tokens_per_step": m.real,
        "tokens_per_step_mean": statistics.fmean(m.total),
        "trainer_counted_nonpad_tokens": m.trainer_counted,
        "tokens_per_s": tokens_per_s,  # all GPUs together
        "tokens_per_s_per_gpu": tokens_per_s / ranks,
        "tokens_per_s_median_step": statistics.median(r / s for r, s in zip(m.real, m.step_s)),
        "padding_share_pct": 100.0 * (1 - sum(m.real) / sum(m.total)),  # of the batches as collated
        "decoder_padding_share_pct": 100.0 * (1 - sum(b[0] for b in m.micro_batches)
                                              / max(1, sum(b[2] for b in m.micro_batches))),  # what it computed
        "epoch_padding_share_pct": epoch_padding_share(piqa_lengths, config, seed, micro_batch_size),
        "recomputed_layer_share": recomputed,  # of the decoder layers, weighted by non-padding tokens
        "layer_activations_bytes_per_position": dataclasses.asdict(budget.activations) if budget else None,
        "flops_per_token": flops_per_token,
        "mfu_pct": 100.0 * tokens_per_s / ranks * flops_per_token / H100_BF16_DENSE_PEAK_FLOPS,  # per GPU
        "peak_allocated_gib": m.peak_allocated,
        "peak_reserved_gib": m.peak_reserved,
        "epoch_steps": math.ceil(PIQA_TRAIN_EXAMPLES / config.batch_size),
        "epoch_s": PIQA_TRAIN_EXAMPLES * mean_length(lengths["train_sequence"]) / tokens_per_s,
    }


def recomputed_share(m: Measured, config: BenchConfig, budget) -> float:
    """The share of decoder-layer work recomputed in the timed steps (weighted by non-padding tokens): 1 where every
    layer is checkpointed, 0 without checkpointing. A step's FLOPs are 6 x parameters x tokens, plus 2 x that share."""
    if not config.engine.gradient_checkpointing:
        return 0.0
    if budget is None or not m.micro_batches:
        return 1.0
    real = sum(b[0] for b in m.micro_batches)
    return sum(r * budget.checkpointed_share(positions) for r, _, positions in m.micro_batches) / max(1, real)
