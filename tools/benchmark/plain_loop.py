"""The reference row: a configuration's workload trained by a plain PyTorch loop instead of the HF Trainer.

The same as train_row.py's Trainer path: the workload (prepare_workload: the model, the engine applied by
common.engine.apply_engine with the profile's Precision, the TrainingArguments from training_argument_values, the
synthetic PIQA-length features and the engine's collator), micro-batch x accumulation, the batch order
(transformers' LengthGroupedSampler, or a random permutation, seeded as the Trainer seeds them), the engine's call
before each forward (Engine.before_forward, as EngineTrainer.compute_loss makes it), and the Trainer's arithmetic:
AdamW (fused for 'adamw_torch_fused'), the cosine schedule with warm-up (get_scheduler), clipping at
max_grad_norm, the loss averaged over the step's answer tokens (num_items_in_batch), the precision's autocast and
GradScaler, gradient checkpointing as the Trainer enables it. Timed by the Trainer rows' StepTimer and measure(),
so the rows compare.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from common.config import EngineArguments
from common.precision import Precision
from tools.benchmark.configurations import BenchConfig
from tools.benchmark.timing import CountingCollator, make_step_timer, measure
from tools.benchmark.train_row import (
    configuration_fields,
    liger_patched_modules,
    prepare_device,
    prepare_workload,
    release_memory,
    speed_fields,
    timed_step_count,
)


@dataclass
class PlainSetup:
    """A configuration made ready for the plain loop (the attributes speed_fields reads are TrainerSetup's)."""

    model: Any
    engine: EngineArguments  # what the engine became on this machine (usable_engine)
    training_args: Any  # where the hyperparameters come from; no Trainer is built
    collator: CountingCollator
    parameters: int
    features: list[dict]
    device: Any
    precision: Precision
    optimizer: Any
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    step_engine: Any  # common.engine.Engine


def run_plain_loop(config: BenchConfig, model_name: str, steps: int, warmup_steps: int, max_measure_s: float,
                   dataset_size: int, seed: int, lengths: dict[str, Any], profile_steps: int = 0) -> dict[str, Any]:
    """Train `config` in a plain loop for warm-up + timed optimizer steps; a row with the Trainer rows' keys."""
    if profile_steps:
        raise ValueError("the plain loop has no profiled variant (--profile profiles the Trainer's rows)")
    from common.training import configure_allocator

    configure_allocator(config.engine)  # before prepare_device starts CUDA
    device_name = prepare_device()
    started = time.perf_counter()
    timed_steps = timed_step_count(config, steps, dataset_size, ranks=1)  # one GPU only
    timer = make_step_timer(warmup_steps, timed_steps, max_measure_s)
    bench = set_up(config, model_name, warmup_steps + timed_steps, dataset_size, seed, lengths)
    final_loss = train(bench, config, warmup_steps + timed_steps, timer, seed)
    wall_s = time.perf_counter() - started
    measured = measure(timer, bench.collator, warmup_steps, 1)
    row = {
        **configuration_fields(config, bench.engine, bench.training_args),
        "trainer_twin": config.twin,
        "applied": {
            "liger_patched_modules": liger_patched_modules(bench.model),
            "compiled": False,
            "optimizer": type(bench.optimizer).__name__,
            "optimizer_fused": bool(bench.optimizer.defaults.get("fused")),
            "gradient_checkpointing": checkpointing_on(bench.model),
            "autocast": str(bench.precision.autocast_dtype).removeprefix("torch.") if bench.precision.autocast_dtype
            else None,
            "grad_scaler": bench.scaler is not None,
            "ddp_comm_hooks": [],
        },
        "model": model_name,
        "parameters": bench.parameters,
        "device": device_name,
        "world_size": 1,
        "parallelism": "single process",
        "warmup_steps": warmup_steps,
        **speed_fields(measured, config, bench, lengths, seed, 1),
        "final_loss": final_loss,
        "config_wall_s": wall_s,
    }
    del bench
    release_memory()
    return row


def set_up(config: BenchConfig, model_name: str, total_steps: int, dataset_size: int, seed: int,
           lengths: dict[str, Any]) -> PlainSetup:
    """The workload the Trainer rows train (prepare_workload); the optimizer, schedule and scaler as the Trainer
    builds them from the same TrainingArguments."""
    import torch
    from transformers import get_scheduler, set_seed

    from common.training import enable_checkpointing

    if config.engine.torch_compile or config.engine.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError("the plain loop implements AdamW without torch.compile only")
    work = prepare_workload(config, model_name, total_steps, dataset_size, seed, lengths)
    model, engine, args = work.model, work.engine, work.training_args  # TrainingArguments set TF32 as the run's do
    precision = work.step_engine.precision
    set_seed(args.seed)  # as the Trainer's __init__ does
    if engine.gradient_checkpointing:
        enable_checkpointing(model)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        weight_decay=args.weight_decay, fused=True if engine.optim == "adamw_torch_fused" else None)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total_steps),
                              num_training_steps=total_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    scaler = torch.amp.GradScaler("cuda") if precision.grad_scaler else None
    return PlainSetup(model, engine, args, work.collator, work.parameters, work.features,
                      next(model.parameters()).device, precision, optimizer, scheduler, scaler, work.step_engine)


def checkpointing_on(model) -> bool:
    """Whether checkpointing was enabled (an activation budget may have left every layer unchecked in a batch)."""
    from common.engine.budget import decoder_layers

    return any(getattr(layer, "_gradient_checkpointing_func", None) is not None for layer in decoder_layers(model))


def epoch_sampler(bench: PlainSetup, config: BenchConfig, seed: int, epoch: int):
    """An epoch's order, drawn as the Trainer's sampler draws it. Length-grouped: transformers' LengthGroupedSampler
    (get_length_grouped_indices on torch's global generator, which set_seed seeded as the Trainer's __init__ does;
    the DataLoader's iterator draws its base seed from it first, in both paths). Random: accelerate's
    SeedableRandomSampler's permutation, a generator seeded with seed + epoch."""
    import torch
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if config.engine.train_sampling_strategy == "group_by_length":
        return LengthGroupedSampler(config.batch_size, lengths=[len(f["input_ids"]) for f in bench.features])
    return RandomSampler(bench.features, generator=torch.Generator().manual_seed(seed + epoch))


def step_batches(bench: PlainSetup, config: BenchConfig, seed: int):
    """Per optimizer step: its micro-batches on the device and their non-padding tokens, epoch after epoch (an
    epoch's last step takes what is left, as the Trainer's does)."""
    from torch.utils.data import DataLoader

    for epoch in itertools.count():
        loader = DataLoader(bench.features, batch_size=bench.training_args.per_device_train_batch_size,
                            sampler=epoch_sampler(bench, config, seed, epoch), collate_fn=bench.collator,
                            pin_memory=bench.training_args.dataloader_pin_memory)
        batches = iter(loader)
        while chunk := list(itertools.islice(batches, bench.engine.gradient_accumulation_steps)):
            tokens = sum(int(b["attention_mask"].sum()) for b in chunk)
            yield [{k: v.to(bench.device) if k != "plan" else v for k, v in b.items()} for b in chunk], tokens


def optimizer_step(bench: PlainSetup, micro_batches: list[dict]):
    """Forward and backward over the micro-batches, then clip, step, schedule, zero: the step's loss (a tensor)."""
    import torch

    from common.engine.loss import answer_token_count

    model, scaler = bench.model, bench.scaler
    model.train()
    # The Trainer's num_items_in_batch: answer tokens over the whole step (labels shifted by one), so each
    # micro-batch's loss is its share of the step's token mean.
    items = sum(answer_token_count(b["labels"]) for b in micro_batches)
    step_loss = torch.zeros((), device=bench.device)
    for batch in micro_batches:
        with bench.precision.autocast(bench.device.type):
            loss = model(**bench.step_engine.before_forward(model, batch), num_items_in_batch=items).loss
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    if scaler:
        scaler.unscale_(bench.optimizer)
    if bench.training_args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), bench.training_args.max_grad_norm)
    skipped = False
    if scaler:
        before = scaler.get_scale()
        scaler.step(bench.optimizer)
        scaler.update()
        skipped = scaler.get_scale() < before  # an overflow: the Trainer does not step the schedule then
    else:
        bench.optimizer.step()
    if not skipped:
        bench.scheduler.step()
    model.zero_grad()
    return step_loss


def train(bench: PlainSetup, config: BenchConfig, total_steps: int, timer, seed: int) -> float:
    """The plain loop, timed by the Trainer rows' StepTimer (its callbacks called directly); the mean step loss, as
    the Trainer's training_loss."""
    from transformers import TrainerControl

    control, state = TrainerControl(), SimpleNamespace(num_input_tokens_seen=0)
    timer.on_train_begin(None, state, control)
    losses, done = [], 0
    for micro_batches, tokens in step_batches(bench, config, seed):
        timer.on_step_begin(None, state, control)
        losses.append(optimizer_step(bench, micro_batches))
        state.num_input_tokens_seen += tokens
        for _ in micro_batches[1:]:  # the Trainer's call after each micro-batch but the step's last
            timer.on_substep_end(None, state, control)
        done += 1
        timer.on_step_end(None, state, control)
        if control.should_training_stop or done >= total_steps:
            break
    return float(sum(loss.item() for loss in losses) / done)
