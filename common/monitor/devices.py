"""NVML: start and stop it, find the GPUs this process sees (CUDA_VISIBLE_DEVICES), read one sample of each."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common.memory import MIB


@dataclass(frozen=True)
class GpuInfo:
    index: int  # CUDA index in this process
    nvml_index: int
    name: str
    uuid: str
    memory_total_mib: float

    @property
    def label(self) -> str:
        return f"GPU{self.index}"

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, **asdict(self)}


@dataclass(frozen=True)
class Reading:
    """One GPU at one moment."""

    used_mib: float
    total_mib: float
    gpu_util_pct: int
    memctl_util_pct: int
    power_w: float | None
    proc_used_mib: float | None


@dataclass(frozen=True)
class _Handle:
    nvml_handle: Any
    # Optional fields, probed once so that a GPU without them is not an error every sample.
    has_power: bool
    has_procs: bool


class MonitorOff(Exception):
    """Monitoring cannot start; the message is the reason shown to the user and written to the log."""


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns bytes in old releases, str in newer ones.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def map_visible_devices(visible: str | None, uuids: Sequence[str]) -> tuple[list[int], list[str]]:
    """NVML indices of the GPUs this process sees, in CUDA order, and the MIG entries skipped.

    `visible` is CUDA_VISIBLE_DEVICES (None: unset, every GPU); `uuids` are NVML's, by NVML index.
    Entries are GPU indices or UUIDs (`GPU-...`, or a unique prefix, with or without `GPU-`).
    Raises ValueError(reason) for an entry that names no GPU, more than one, or a GPU twice.
    """
    if visible is None:
        return list(range(len(uuids))), []
    if not visible.strip():
        raise ValueError("CUDA_VISIBLE_DEVICES is empty: this process sees no GPU")
    bare_uuids = [u.lower().removeprefix("gpu-") for u in uuids]
    indices: list[int] = []
    skipped_mig: list[str] = []
    for entry in (e.strip() for e in visible.split(",")):
        where = f"CUDA_VISIBLE_DEVICES={visible!r}: entry {entry!r}"
        if not entry:
            raise ValueError(f"{where} is empty")
        if entry.upper().startswith("MIG-"):
            skipped_mig.append(entry)
            continue
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if not 0 <= index < len(uuids):
                raise ValueError(f"{where} is not a GPU index (NVML sees {len(uuids)} GPU(s): 0..{len(uuids) - 1})")
        else:
            prefix = entry.lower().removeprefix("gpu-")
            matches = [i for i, u in enumerate(bare_uuids) if prefix and u.startswith(prefix)]
            if len(matches) != 1:
                problem = "matches no GPU UUID" if not matches else f"matches {len(matches)} GPU UUIDs"
                raise ValueError(f"{where} {problem} (NVML sees: {', '.join(uuids)})")
            index = matches[0]
        if index in indices:
            raise ValueError(f"{where} names GPU {index} a second time")
        indices.append(index)
    if not indices:
        raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r} names only MIG instances; they are not monitored")
    return indices, skipped_mig


class NvmlGpus:
    """NVML and the GPUs this process sees, in CUDA order (`gpus[i]` is torch's cuda:i)."""

    def __init__(self, nvml_module: Any = None) -> None:
        self.gpus: list[GpuInfo] = []
        self._nvml = nvml_module  # None: import pynvml at start(); the tests pass a fake
        self._handles: list[_Handle] = []
        self._up = False
        self._pid = os.getpid()

    def start(self, print_fn: Callable[[str], None]) -> None:
        """Start NVML and list the visible GPUs; MonitorOff(reason) if that cannot be done."""
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as e:
                raise MonitorOff(f"nvidia-ml-py (module pynvml) is not importable: {e}") from e
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise MonitorOff(f"NVML did not start ({type(e).__name__}: {e}); no NVIDIA driver or GPU here?") from e
        self._up = True
        try:
            self._list_visible(print_fn)
        except self._nvml.NVMLError as e:
            raise MonitorOff(f"NVML error while listing GPUs: {e}") from e

    def _list_visible(self, print_fn: Callable[[str], None]) -> None:
        nvml = self._nvml
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise MonitorOff("NVML found no GPU")
        all_handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in all_handles]
        try:
            nvml_indices, skipped_mig = map_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
        except ValueError as e:
            raise MonitorOff(str(e)) from e
        if skipped_mig:
            print_fn(f"GPU monitor: MIG instances not monitored: {', '.join(skipped_mig)}")
        get_procs = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses", None)
        for cuda_index, nvml_index in enumerate(nvml_indices):
            handle = all_handles[nvml_index]
            total_mib = nvml.nvmlDeviceGetMemoryInfo(handle).total / MIB
            name = _text(nvml.nvmlDeviceGetName(handle))
            self.gpus.append(GpuInfo(cuda_index, nvml_index, name, uuids[nvml_index], round(total_mib, 1)))
            has_power = self._probe(nvml.nvmlDeviceGetPowerUsage, handle)
            has_procs = get_procs is not None and self._probe(get_procs, handle)
            self._handles.append(_Handle(handle, has_power, has_procs))

    def _probe(self, fn: Callable[[Any], Any], handle: Any) -> bool:
        try:
            fn(handle)
        except self._nvml.NVMLError:
            return False
        return True

    def read_all(self) -> list[Reading]:
        """One reading per GPU; raises what NVML raises."""
        return [self._read(h) for h in self._handles]

    def _read(self, h: _Handle) -> Reading:
        nvml = self._nvml
        mem = nvml.nvmlDeviceGetMemoryInfo(h.nvml_handle)
        util = nvml.nvmlDeviceGetUtilizationRates(h.nvml_handle)
        power_w = nvml.nvmlDeviceGetPowerUsage(h.nvml_handle) / 1000 if h.has_power else None
        proc_used_mib = None
        if h.has_procs:
            mine = [
                p.usedGpuMemory
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(h.nvml_handle)
                if p.pid == self._pid and p.usedGpuMemory is not None
            ]
            proc_used_mib = sum(mine) / MIB if mine else None
        return Reading(mem.used / MIB, mem.total / MIB, int(util.gpu), int(util.memory), power_w, proc_used_mib)

    def shutdown(self) -> None:
        """Stop NVML if start() started it; idempotent."""
        if self._up:
            self._up = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
