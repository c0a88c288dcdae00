"""Checkpoints written in the background: training stops only to copy the state to host memory.

A checkpoint of the 1B model is 14 GiB (fp32 weights + AdamW state); the Trainer writes it on the training thread,
which left the GPU idle for ~20 s at each epoch's end. Here the training thread copies the weights and the optimizer
state into page-locked host buffers (0.3 s on an H200; the buffers are allocated in the background while the run
sets up, since page-locking 14 GiB takes ~7 s), writes the small files itself, and a background thread writes the two
large ones. The final model's files are hard links to the checkpoint holding the same weights. The layout is the
Trainer's own (`--resume` and load_best_model_at_end read it as usual). A checkpoint is written as
`tmp-checkpoint-<step>` and renamed to `checkpoint-<step>` only once complete, so a crash mid-write never leaves a
checkpoint that resume or the best-model load would pick up. (Like the Trainer, it leaves flushing to the operating
system: a power loss is not covered.)
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.artifacts import CHECKPOINT_PREFIX

STAGING_PREFIX = "tmp-" + CHECKPOINT_PREFIX  # not matched by checkpoint-* globs: invisible to resume and rotation
OPTIMIZER_FILE = "optimizer.pt"  # transformers' OPTIMIZER_NAME
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")  # save_pretrained's, + weights


def link_model_files(checkpoint: Path, directory: Path) -> None:
    """`directory` gets the model files of a complete checkpoint as hard links: the same bytes without writing the
    weights a second time (copies where the file system has no hard links)."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in checkpoint.iterdir():
        if source.name in MODEL_FILES or source.suffix == ".safetensors":
            target = directory / source.name
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)


def adam_moments(optim: str) -> int:
    """Tensors the optimizer keeps per parameter, each the parameter's shape and dtype (AdamW: two moments)."""
    return 2 if "adam" in optim and "8bit" not in optim else 0


def staging_dir(checkpoint_dir: Path) -> Path:
    return checkpoint_dir.parent / (STAGING_PREFIX + checkpoint_dir.name[len(CHECKPOINT_PREFIX):])


class HostSnapshot:
    """Host copies of a nested state (dicts, lists, tensors), in page-locked buffers kept from one save to the next.

    Tensors that share storage on the device (tied embeddings) share one host buffer, as save_pretrained expects.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._buffers: dict[str, torch.Tensor] = {}
        self._spare: dict[tuple, list[torch.Tensor]] = {}  # allocated ahead of the first copy, by (shape, dtype)

    def reserve(self, like: list[tuple[tuple, torch.dtype]]) -> None:
        """Allocate buffers for tensors of these shapes and dtypes now, so that the first copy finds them ready."""
        for shape, dtype in like:
            buffer = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=self.pin)
            self._spare.setdefault((tuple(shape), dtype), []).append(buffer)

    def release_spare(self) -> None:
        self._spare.clear()

    def copy(self, state: Any, prefix: str = "") -> Any:
        seen: dict[tuple, torch.Tensor] = {}
        return self._copy(state, prefix, seen)

    def _copy(self, value: Any, path: str, seen: dict) -> Any:
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
            if key in seen:
                return seen[key]
            seen[key] = self._copy_tensor(value.detach(), path)
            return seen[key]
        if isinstance(value, dict):
            return {k: self._copy(v, f"{path}/{k}", seen) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v, f"{path}/{i}", seen) for i, v in enumerate(value))
        return value

    def _copy_tensor(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            spare = self._spare.get((tuple(tensor.shape), tensor.dtype))
            if spare:
                buffer = spare.pop()
            else:
                pin = self.pin and tensor.is_cuda
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)  # asynchronous from the device; synchronised in stage()
        return buffer


@dataclass
class PendingWrite:
    staging: Path
    final: Path
    model_state: dict  # host tensors
    optimizer_state: dict | None  # host tensors; None: weights only
    after: Any  # callable run once the checkpoint is complete (rotation)
    started_s: float = field(default_factory=time.perf_counter)
    also_weights_to: list = field(default_factory=list)  # directories that get the model files too (the final model)
    closed: bool = False  # the thread took the last of also_weights_to
    complete: bool = False  # the caller wrote the small files: the checkpoint may be renamed into place


class CheckpointWriter:
    """One background thread writing one checkpoint at a time; `wait()` for the last, errors raised on the caller's
    thread at the next `stage()` or `wait()`. The host buffers are reused, so a new save first waits for the last."""

    def __init__(self, model: torch.nn.Module, pin: bool) -> None:
        self.model = model  # the unwrapped PreTrainedModel: its save_pretrained writes config and weights
        self._model_buffers = HostSnapshot(pin)
        self._optimizer_buffers = HostSnapshot(pin)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._reserving: _Thread | None = None
        self.reserve_seconds: float | None = None  # the background allocation of the host buffers, s
        self.write_seconds: list[float] = []  # each checkpoint's background write, s
        self.stage_seconds: list[float] = []  # each checkpoint's copy to host memory, on the caller's thread, s

    def reserve(self, optimizer_moments: int) -> None:
        """Allocate the host buffers in the background now: the weights, and `optimizer_moments` tensors like each
        trainable parameter (adam_moments); whatever else the optimizer holds is allocated at the first save."""
        unique = {(t.untyped_storage().data_ptr(), t.storage_offset()): t for t in self.model.state_dict().values()}
        weights = [(tuple(t.shape), t.dtype) for t in unique.values()]
        moments = [(tuple(p.shape), p.dtype) for p in self.model.parameters() if p.requires_grad] * optimizer_moments
        self._reserving = _Thread(self._reserve, weights, moments)

    def _reserved(self) -> None:
        """The background allocation finished. Where it failed (host memory), the first copy allocates the rest."""
        if self._reserving is not None:
            try:
                self._reserving.join()
            except (RuntimeError, MemoryError) as err:
                print(f"note: the checkpoint's host buffers could not be allocated ahead ({err}); the first save "
                      "allocates them")
            self._reserving = None

    def _reserve(self, weights: list, moments: list) -> None:
        started_s = time.perf_counter()
        self._model_buffers.reserve(weights)
        self._optimizer_buffers.reserve(moments)
        self.reserve_seconds = time.perf_counter() - started_s

    def stage(self, final: Path, model_state: dict, optimizer_state: dict | None, after=None) -> Path:
        """Copy the states to host memory and start writing them; returns the staging directory, where the caller
        writes the small files now (they must be there before the rename)."""
        self.wait()
        started_s = time.perf_counter()
        self._reserved()
        staging = staging_dir(final)
        if staging.exists():
            shutil.rmtree(staging)  # an earlier run's interrupted write of this step
        staging.mkdir(parents=True)
        host_model = self._model_buffers.copy(model_state)
        host_optimizer = self._optimizer_buffers.copy(optimizer_state) if optimizer_state is not None else None
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the host copies are complete before the thread reads them
        self._model_buffers.release_spare()
        self._optimizer_buffers.release_spare()
        self.stage_seconds.append(time.perf_counter() - started_s)
        pending = PendingWrite(staging, final, host_model, host_optimizer, after)
        return self._start(pending)

    def _start(self, pending: PendingWrite) -> Path:
        self._pending = pending
        self._ready = threading.Event()  # set once the caller has written the small files
        self._thread = threading.Thread(target=self._write, args=(pending,), name="checkpoint-writer", daemon=True)
        self._thread.start()
        return pending.staging

    def small_files_written(self) -> None:
        """The caller's files are in the staging directory: the rename may happen once the large ones are too."""
        self._pending.complete = True
        self._ready.set()

    def abandon(self) -> None:
        """The caller could not write the small files: the staged checkpoint is deleted, never renamed into place."""
        self._ready.set()

    def _write(self, pending: PendingWrite) -> None:
        try:
            optimizer_writer = None
            if pending.optimizer_state is not None:  # the two large files at once: each is mostly CPU-bound
                optimizer_writer = _Thread(save_without_checksum, pending.optimizer_state,
                                           pending.staging / OPTIMIZER_FILE)
            # A copy of the dict each time: save_pretrained empties the one it is given as it writes.
            self.model.save_pretrained(str(pending.staging), state_dict=dict(pending.model_state))
            if optimizer_writer is not None:
                optimizer_writer.join()
            self._ready.wait()
            if not pending.complete:  # abandoned: a checkpoint-N without its trainer state would be resumed from
                shutil.rmtree(pending.staging, ignore_errors=True)
                pending.closed = True
                return
            if pending.final.exists():
                shutil.rmtree(pending.final)  # a checkpoint of the same step from an earlier session (resume)
            os.replace(pending.staging, pending.final)
            if pending.after is not None:
                pending.after()
            self.write_seconds.append(time.perf_counter() - pending.started_s)
            while True:  # the directories also_link_model_files adds, until none is left
                with self._lock:
                    if not pending.also_weights_to:
                        pending.closed = True
                        break
                    directory = pending.also_weights_to.pop(0)
                link_model_files(pending.final, directory)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread at its next save or wait
            self._error = err
            pending.closed = True

    def also_link_model_files(self, checkpoint: Path, directory: Path) -> bool:
        """Give `directory` the model files of `checkpoint` once its write in progress is complete (link_model_files);
        False where `checkpoint` is not the one being written."""
        with self._lock:
            if self._thread is None or self._pending.closed or self._pending.final != checkpoint:
                return False
            self._pending.also_weights_to.append(directory)
            return True

    def wait(self) -> None:
        """Block until the write in progress is complete; raise its error, if it had one."""
        if self._thread is not None:
            self._ready.set()  # a caller that failed before small_files_written must not hang it: abandoned
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    def close(self) -> None:
        """Wait for the write in progress and for the background allocation: nothing of the writer outlives the run."""
        self.wait()
        self._reserved()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()



def save_without_checksum(state: dict, path: Path) -> None:
    """torch.save without the zip records' CRC-32, which torch.load never checks: without it the 1B model's
    checkpoints were written in 5.1-9.3 s instead of 7.1-14.5 s (docs/real_job)."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch before 2.6: always computed
        return torch.save(state, path)
    with config.patch({"save.compute_crc32": False}):  # process-wide: the small files saved meanwhile go without too
        torch.save(state, path)


class _Thread(threading.Thread):
    """A call in a thread of its own; join() raises its error."""

    def __init__(self, function, *args) -> None:
        super().__init__(daemon=True)
        self._call, self._error = (function, args), None
        self.start()

    def run(self) -> None:
        try:
            self._call[0](*self._call[1])
        except BaseException as err:  # noqa: BLE001 - raised on the joining thread
            self._error = err

    def join(self, timeout=None) -> None:
        super().join(timeout)
        if self._error is not None:
            raise self._error
