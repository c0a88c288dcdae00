"""What a configuration's row is measured with: Trainer callbacks that time optimizer steps and profile them, a
collator that counts real and padded tokens, and the arithmetic over them (ranks combined, an epoch's padding)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from common.memory import GIB
from tools.benchmark.configurations import BenchConfig


class CountingCollator:
    """The run's training collator, counting real and padded tokens of every batch it builds, and the positions the
    decoder passes over (fewer where the batch's plan splits it by length: common/engine/plan.py)."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, int, int]] = []  # (non-padding tokens, all tokens, decoder positions)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        mask = batch["attention_mask"]
        plan = batch.get("plan")
        self.batches.append((int(mask.sum()), mask.numel(), plan.decoder_positions if plan else mask.numel()))
        return batch


@dataclass
class Measured:
    """The timed steps (every rank's combined under DDP)."""

    step_s: list[float]  # end to end: data, forward/backward, optimizer
    compute_s: list[float]  # from the step's begin: batches already on the device
    real: list[int]  # non-padding tokens per step
    total: list[int]  # all tokens per step
    trainer_counted: int  # the Trainer's own count of non-padding tokens (all ranks)
    micro_batches: list[tuple[int, int, int]]  # this rank's timed micro-batches, as CountingCollator counts them
    warmup_s: float  # from the start of training to the end of the warm-up steps (compilation would fall here)
    peak_allocated: float | None
    peak_reserved: float | None
    planned_steps: int = 0  # the timed steps asked for; fewer ran where --max-measure-s stopped the row


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing on the CPU), so that a wall clock reading means the work is done."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> tuple[float | None, float | None]:
    """torch's peak allocated and reserved GPU memory since the last reset, in GiB (None, None without CUDA)."""
    from common.memory import peak_bytes

    peaks = peak_bytes()
    return (None, None) if peaks is None else (peaks[0] / GIB, peaks[1] / GIB)


def make_step_timer(warmup_steps: int, steps: int, max_measure_s: float):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Synchronised wall clock at every optimizer step's begin and end; stops training when enough is timed."""

        def __init__(self) -> None:
            self.planned_steps = steps
            self.train_begin = 0.0
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.tokens_seen: list[int] = []
            self.micro_batches_done: list[int] = []  # at each step's end: micro-batches so far (an epoch's last step
            self._micro_batches = 0                  # may have fewer than the accumulation steps)

        def on_substep_end(self, args, state, control, **kwargs):
            self._micro_batches += 1

        def on_train_begin(self, args, state, control, **kwargs):
            synchronize()
            self.train_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            now = time.perf_counter()
            self.ends.append(now)
            self.tokens_seen.append(state.num_input_tokens_seen)
            self._micro_batches += 1
            self.micro_batches_done.append(self._micro_batches)
            timed = len(self.ends) - warmup_steps
            if timed >= 3 and timed < steps and now - self.ends[warmup_steps - 1] > max_measure_s:
                control.should_training_stop = True  # slow configuration: enough steps for a median
            return control

    return StepTimer()


def make_profiler_callback(warmup_steps: int):
    """torch.profiler over the timed steps: device-busy time against wall time, and what the host spent it on."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class ProfilerCallback(TrainerCallback):
        def __init__(self) -> None:
            self.profiler = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup_steps and self.profiler is None:
                activities = [ProfilerActivity.CPU]
                import torch

                if torch.cuda.is_available():
                    activities.append(ProfilerActivity.CUDA)
                self.profiler = profile(activities=activities)
                self.profiler.__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            if self.profiler is not None:
                synchronize()
                self.profiler.__exit__(None, None, None)

        def summary(self, steps: int, wall_s: float) -> dict[str, Any]:
            return {} if self.profiler is None else profile_summary(self.profiler, steps, wall_s)

    return ProfilerCallback()


def profile_summary(profiler, steps: int, wall_s: float) -> dict[str, Any]:
    """Per timed step: wall and device-busy time, NCCL kernels, CUDA runtime calls, the top host operators and
    kernels."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    # Kernels only: operators carry their kernels' time again, and record_function regions (the
    # optimizer step, DDP's forward, the collectives' names) appear on the device timeline too.
    raw = profiler.events()
    host_names = {e.name for e in raw if e.device_type == DeviceType.CPU}
    kernel_us: dict[str, float] = {}
    for e in raw:
        if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False) \
                and e.name not in host_names:
            kernel_us[e.name] = kernel_us.get(e.name, 0.0) + e.time_range.elapsed_us()
    device_us = sum(kernel_us.values())
    # Collectives (DDP's all-reduce) run on their own stream, overlapping the backward pass's kernels.
    nccl_us = sum(us for name, us in kernel_us.items() if name.lower().startswith("nccl"))
    runtime = {}
    for e in events:
        if e.key.startswith(("cuda", "cu")) and e.count:
            runtime[e.key] = {"count": e.count, "cpu_ms": round(e.cpu_time_total / 1000, 2)}
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "steps": steps,
        "wall_ms_per_step": round(1000 * wall_s / max(1, steps), 1),
        "device_busy_ms_per_step": round(device_us / 1000 / max(1, steps), 1),
        "device_busy_pct": round(100 * device_us / 1e6 / wall_s, 1) if wall_s else None,
        "nccl_kernels_ms_per_step": round(nccl_us / 1000 / max(1, steps), 1),
        "runtime_calls_per_step": {k: {"count": v["count"] / steps, "cpu_ms": v["cpu_ms"] / steps}
                                   for k, v in sorted(runtime.items(), key=lambda kv: -kv[1]["cpu_ms"])[:12]},
        "top_self_cpu_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / steps, 2) for e in top_cpu},
        "top_kernels_ms_per_step": {
            name[:80]: round(us / 1000 / steps, 2)
            for name, us in sorted(kernel_us.items(), key=lambda kv: -kv[1])[:10]
        },
    }


def epoch_padding_share(lengths: list[int], config: BenchConfig, seed: int, micro_batch_size: int) -> float:
    """Padding share over a whole epoch of these lengths, with the configuration's sampler and micro-batches."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from common.data import round_up

    generator = torch.Generator().manual_seed(seed)
    if config.engine.train_sampling_strategy == "group_by_length":
        order = get_length_grouped_indices(lengths, config.batch_size, generator=generator)
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    mb, multiple = micro_batch_size, config.engine.pad_to_multiple_of
    real = padded = 0
    for start in range(0, len(order), mb):
        chunk = [lengths[i] for i in order[start : start + mb]]
        longest = round_up(max(chunk), multiple)
        real += sum(chunk)
        padded += longest * len(chunk)
    return 100.0 * (1 - real / padded)


def combine_ranks(step_s, compute_s, real, total, peak_allocated, peak_reserved) -> tuple:
    """Every rank's measurements into one: tokens summed, times and memory peaks the largest rank's."""
    import torch.distributed as dist

    mine = (step_s, compute_s, real, total, peak_allocated, peak_reserved)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    steps, computes, reals, totals, allocated, reserved = zip(*everyone)

    def peak(values):
        return None if None in values else max(values)

    return ([max(s) for s in zip(*steps)], [max(s) for s in zip(*computes)], [sum(t) for t in zip(*reals)],
            [sum(t) for t in zip(*totals)], peak(allocated), peak(reserved))


def measure(timer, collator: CountingCollator, warmup_steps: int, ranks: int) -> Measured:
    """The timed steps' times, tokens (the collator's batches of each step) and memory peaks; all ranks' under DDP."""
    peak_allocated, peak_reserved = peak_memory_gib()
    done = len(timer.ends)
    if warmup_steps < 1 or done <= warmup_steps:
        raise RuntimeError(f"{done} optimizer steps ran, {warmup_steps} warm-up steps asked for: need at least one of "
                           "each")
    step_s, compute_s, real, total = [], [], [], []
    bounds = timer.micro_batches_done  # the collator's batches of step i: bounds[i - 1] to bounds[i]
    micro_batches = collator.batches[bounds[warmup_steps - 1] : bounds[done - 1]]
    for i in range(warmup_steps, done):
        step_s.append(timer.ends[i] - timer.ends[i - 1])  # end to end: data, forward/backward, optimizer
        compute_s.append(timer.ends[i] - timer.begins[i])  # batches already on the device
        batches = collator.batches[bounds[i - 1] : bounds[i]]
        real.append(sum(b[0] for b in batches))
        total.append(sum(b[1] for b in batches))
    trainer_counted = timer.tokens_seen[done - 1] - timer.tokens_seen[warmup_steps - 1]  # all ranks (Trainer gathers)
    if ranks > 1:
        step_s, compute_s, real, total, peak_allocated, peak_reserved = combine_ranks(
            step_s, compute_s, real, total, peak_allocated, peak_reserved)
    warmup_s = timer.ends[warmup_steps - 1] - timer.train_begin
    return Measured(step_s, compute_s, real, total, trainer_counted, micro_batches, warmup_s, peak_allocated,
                    peak_reserved, timer.planned_steps)


def mega_batch_steps(examples: int, batch_size: int, ranks: int = 1) -> int:
    """Optimizer steps in one mega-batch of transformers' LengthGroupedSampler (its own default multiplier). The
    Trainer gives the sampler one rank's examples per step; each step takes one such batch per rank."""
    sampler_batch = batch_size // ranks
    batches = max(1, min(examples // (sampler_batch * 4), 50))
    return math.ceil(batches / ranks)
