"""Where a run's wall clock goes: seconds per phase (common/artifacts.py TIME_PHASES), from the process's start.

Phases nest: time spent in an inner phase (a selection pass inside training) counts for it alone, so the phases
add up to the wall clock. Each boundary waits for the GPU, so a phase is charged for the work it queued.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from common.artifacts import TIME_PHASES

_IMPORTED_AT_S = time.perf_counter()

# densenetsmi.txt's label (artifacts.MONITOR_PHASES) for each phase the monitor sees.
MONITOR_LABEL = {"eval_zero_shot": "eval", "train_steps": "train", "select": "select", "checkpoint_save": "save",
                 "checkpoint_wait": "save", "load_best": "load", "eval_fine_tuned": "eval", "final_save": "save"}


def seconds_since_process_start() -> float:
    """The process's age, from the kernel's record of its start (imports included); else since this module's import."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT_S


class PhaseTimes:
    """`with times.phase("select"):` charges the block's seconds to `select` (and not to the enclosing phase)."""

    def __init__(self, on_change: Callable[[str], None] = lambda label: None) -> None:
        self.seconds = {name: 0.0 for name, _ in TIME_PHASES}
        self.seconds["startup"] = seconds_since_process_start()
        self._on_change = on_change  # gets the monitor label of the phase now running
        self._stack: list[str] = []
        self._created_s = self._since_s = time.perf_counter()

    def _switch(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now_s = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now_s - self._since_s
        self._since_s = now_s

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; known: {', '.join(self.seconds)}")
        self._switch()
        self._stack.append(name)
        self._announce()
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()
            self._announce()

    def _announce(self) -> None:
        if self._stack and self._stack[-1] in MONITOR_LABEL:
            self._on_change(MONITOR_LABEL[self._stack[-1]])

    def record(self) -> dict:
        """metrics.json's timing: the process's wall clock so far, and its phases (`other`: what none claims)."""
        wall_s = self.seconds["startup"] + time.perf_counter() - self._created_s  # one clock from here on
        phases = dict(self.seconds)
        phases["other"] = max(0.0, wall_s - sum(v for k, v in phases.items() if k != "other"))
        return {"wall_s": wall_s, "phases_s": phases}


class StartupClock:
    """Start-up's parts (data, tokenizer, model, ...): `lap(name)` charges the time since the last lap to `name`."""

    def __init__(self) -> None:
        self.laps_s: dict[str, float] = {}
        self._last_s = time.perf_counter()

    def lap(self, name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now_s = time.perf_counter()
        self.laps_s[name] = self.laps_s.get(name, 0.0) + now_s - self._last_s
        self._last_s = now_s
