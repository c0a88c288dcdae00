"""Several processes (torchrun, accelerate launch): who writes what, and evaluation split across ranks.

A plain `python3 baseline.py` is one process and every function here is a no-op for it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from common.data import PiqaExample
from common.evaluation import EvalResult, evaluate, summarise


def world_size() -> int:
    """Processes taking part (torchrun / accelerate set WORLD_SIZE); 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 writes metrics.json, predictions, config.json and the console summary."""
    return rank() == 0


def one_gpu_unless_distributed() -> str | None:
    """A plain `python3 baseline.py` uses one GPU: with several visible, the Trainer would wrap the model in
    DataParallel and multiply the batch. torchrun / accelerate launch (WORLD_SIZE set) use one GPU per process.
    Must run before CUDA is first touched; returns a note for the console when it narrowed the choice."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if "WORLD_SIZE" in os.environ or (visible is not None and "," not in visible):
        return None
    first = "0" if visible is None else visible.split(",")[0].strip()
    os.environ["CUDA_VISIBLE_DEVICES"] = first
    if visible is None:
        return None
    return f"note: one process uses one GPU: CUDA_VISIBLE_DEVICES={first} (use torchrun for {visible})"


def init() -> None:
    """Join the process group early, so ranks can wait for one another while the run directory is prepared.

    accelerate's PartialState picks the backend (NCCL on GPUs, gloo on CPUs); the Trainer reuses it.
    """
    if world_size() > 1 and not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def evaluate_on_all_ranks(
    model, tokenizer, examples: Sequence[PiqaExample], method: str, **options
) -> EvalResult:
    """Each rank scores every world_size-th example; the records are gathered and merged in input order.

    Shards are padded to equal length (the padding is scored and dropped) and evaluated in lock-step (the same
    number of forward passes on every rank, see `evaluate`): FSDP needs it. No example is scored twice or lost.
    """
    if not dist.is_initialized() or world_size() == 1:
        return evaluate(model, tokenizer, examples, method=method, **options)
    start_s = time.perf_counter()
    ranks = world_size()
    shard_size = math.ceil(len(examples) / ranks)
    mine = list(range(rank(), len(examples), ranks))
    padded = mine + [mine[0] if mine else 0] * (shard_size - len(mine))
    result = evaluate(model, tokenizer, [examples[i] for i in padded], method=method, lockstep=True, **options)
    shard = list(zip(mine, result.predictions[: len(mine)]))
    gathered: list = [None] * ranks
    dist.all_gather_object(gathered, shard)
    records = [record for _, record in sorted((pair for part in gathered for pair in part), key=lambda p: p[0])]
    return summarise(method, records, seconds=time.perf_counter() - start_s)
