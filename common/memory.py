"""torch's GPU memory, measured in one place: peaks per phase, with the selection passes apart from training.

Bytes inside; MiB (the unit metrics.json and the GPU log use) and GiB only where a figure is recorded or printed.
torch is imported inside the functions: the command line is read before torch is imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

MIB = 2**20
GIB = 2**30
NO_PEAKS = {"max_allocated_mib": None, "max_reserved_mib": None}  # without CUDA


def peak_bytes(device: int | None = None) -> tuple[int, int] | None:
    """torch's peak allocated and reserved bytes since the last reset (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def allocated_bytes() -> int | None:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def as_mib(peaks: tuple[int, int] | None) -> dict[str, float | None]:
    """A peak_bytes reading as metrics.json records it."""
    if peaks is None:
        return dict(NO_PEAKS)
    return {"max_allocated_mib": round(peaks[0] / MIB, 1), "max_reserved_mib": round(peaks[1] / MIB, 1)}


@contextlib.contextmanager
def torch_peak_memory(
    phase: str, into: dict[str, Any], device: int | None = None, empty_cache: bool = False
) -> Iterator[None]:
    """Record torch's allocator peaks for the block: `into[phase] = {max_allocated_mib, max_reserved_mib}`.

    Resets the peaks on entry, so train and eval get their own. A reset sets each peak to the
    current value, and blocks cached by an earlier phase still count as reserved: pass
    `empty_cache=True` to hand them back first. Values are None without CUDA. Per process and
    device: under torchrun each rank sees only its own device's allocator.
    """
    import torch

    if not torch.cuda.is_available():
        into[phase] = dict(NO_PEAKS)
        yield
        return
    if empty_cache:
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        try:
            into[phase] = as_mib((torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)))
        except RuntimeError:  # a broken CUDA context must not hide the block's own exception
            into[phase] = dict(NO_PEAKS)


class SelectionPeaks:
    """Torch allocator peaks of training, with the per-epoch selection evaluations measured apart (MiB).

    Without this the training peak would be the selection pass's, whose full-vocabulary logits can exceed it.
    """

    def __init__(self) -> None:
        self.train = {"max_allocated_mib": 0.0, "max_reserved_mib": 0.0}
        self.select = {"max_allocated_mib": 0.0, "max_reserved_mib": 0.0}

    def _fold_into(self, peaks: dict, empty_cache: bool = False) -> None:
        import torch

        reading = peak_bytes()
        if reading is not None:
            peaks["max_allocated_mib"] = max(peaks["max_allocated_mib"], reading[0] / MIB)
            peaks["max_reserved_mib"] = max(peaks["max_reserved_mib"], reading[1] / MIB)
            if empty_cache:
                torch.cuda.empty_cache()  # before the reset, which sets each peak to what is held now
            torch.cuda.reset_peak_memory_stats()

    def begin_selection(self) -> None:
        self._fold_into(self.train)

    def end_selection(self) -> None:
        """The selection pass's peaks; its cached blocks handed back, so that training's peaks and NVML's training
        figure are training's."""
        self._fold_into(self.select, empty_cache=True)

    def training_peaks(self, since_last_selection: dict) -> dict:
        """Combine with the peaks recorded after the last selection pass."""
        if since_last_selection.get("max_allocated_mib") is None:
            return since_last_selection
        return {k: max(v, since_last_selection[k]) for k, v in self.train.items()}

    def fold_into_phases(self, torch_peaks: dict) -> None:
        """torch_peak_memory's "train" record made training's alone, and the selection passes' as "select"."""
        torch_peaks["train"] = self.training_peaks(torch_peaks["train"])
        if torch_peaks["train"].get("max_allocated_mib") is not None:
            torch_peaks["select"] = self.select
