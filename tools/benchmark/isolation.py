"""Each row in its own process, so that Liger's patches, torch.compile caches and allocator state never leak into the
next: forked from a clean fork server (one GPU), or launched with torchrun / accelerate launch (several)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository: torchrun runs `python3 -m tools.benchmark` from there
FSDP_CONFIG = ROOT / "common" / "fsdp.yaml"  # what users launch FSDP runs with
_FORKSERVER = None
# torch alone: some import in transformers' Trainer stack initialises CUDA (seen on the H100 machine, even with
# PYTORCH_NVML_BASED_CUDA_CHECK=1), and a fork server that has done so hands children an unusable CUDA.
PRELOAD = ["torch"]


def fork_server():
    """A fork server started before any thread or CUDA context: children fork from a clean, preloaded process."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
    return _FORKSERVER


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
    process = fork_server().Process(target=_child, args=(target, kwargs, out_path))
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
    torchrun: the Trainer runs DDP. `fsdp`: accelerate launch with common/fsdp.yaml, as a user runs FSDP.
    Each process runs `python3 -m tools.benchmark --worker JOB OUT` (`worker` below)."""
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as folder:
        job, out = Path(folder) / "job.pickle", Path(folder) / "row.json"
        job.write_bytes(pickle.dumps((target, kwargs)))
        launcher = (["-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), f"--num_processes={nproc}"]
                    if fsdp else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
        command = [sys.executable, *launcher, "-m", "tools.benchmark", "--worker", str(job), str(out)]
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
