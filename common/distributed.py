"""Several processes (torchrun, accelerate launch): who writes what, and evaluation split across ranks.

A plain `python3 baseline.py` is one process and every function here is a no-op for it.
"""

from __future__ import annotations

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
    """Each rank scores its share of the batches one process would run (`evaluate(..., shard=...)`); the records
    are gathered and merged in input order. Every example is scored once, in the same batch as in a single-process
    evaluation, so the scores are the same; the ranks run equal numbers of forward passes (FSDP needs it).
    """
    if not dist.is_initialized() or world_size() == 1:
        return evaluate(model, tokenizer, examples, method=method, **options)
    start_s = time.perf_counter()
    position = {example.id: index for index, example in enumerate(examples)}
    if len(position) != len(examples):
        raise ValueError("example ids must be unique: the ranks' records are merged by id")
    result = evaluate(model, tokenizer, examples, method=method, shard=(rank(), world_size()), **options)
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, result.predictions)
    records = sorted((record for part in gathered for record in part), key=lambda record: position[record["id"]])
    if [record["id"] for record in records] != [example.id for example in examples]:
        raise RuntimeError("the ranks' records do not cover every example exactly once")
    return summarise(method, records, seconds=time.perf_counter() - start_s)


def parallelism(trainer) -> str:
    """How the Trainer actually ran the model, read from its wrapping (accelerate may fall back from FSDP to DDP)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(trainer.model, FSDPModule) or isinstance(trainer.model_wrapped, (FSDPModule, FullyShardedDataParallel)):
        return "FSDP"
    if isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel):
        return "DDP"
    return "single process"
