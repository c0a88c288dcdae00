"""Training helpers: the selection passes' memory is measured apart from training's."""

import pytest
import torch

from common.memory import SelectionPeaks


def test_selection_peaks_are_kept_apart_from_training(monkeypatch):
    readings = iter([(100, 200), (900, 1000), (150, 250)])  # MiB: train so far, selection pass, train after
    current = {}

    def read_next():
        current["allocated"], current["reserved"] = next(readings)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: current["allocated"] * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: current["reserved"] * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)

    peaks = SelectionPeaks()
    read_next()
    peaks.begin_selection()
    read_next()
    peaks.end_selection()
    read_next()
    after_last_selection = {"max_allocated_mib": 150.0, "max_reserved_mib": 250.0}
    assert peaks.select == {"max_allocated_mib": 900.0, "max_reserved_mib": 1000.0}
    assert peaks.training_peaks(after_last_selection) == {"max_allocated_mib": 150.0, "max_reserved_mib": 250.0}


def test_training_peaks_do_not_inherit_the_selection_passs_cached_blocks(monkeypatch):
    """A reset sets each peak to what is held now: the selection's cache is handed back first, or training's
    reserved peak would be the selection pass's (torch's allocator modelled in MiB)."""
    held = {"allocated": 0, "reserved": 0}
    peak = dict(held)

    def hold(allocated: int, reserved: int) -> None:
        held.update(allocated=allocated, reserved=reserved)
        peak.update({k: max(peak[k], held[k]) for k in held})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak["allocated"] * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: peak["reserved"] * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peak.update(held))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: held.update(reserved=held["allocated"]))

    peaks = SelectionPeaks()
    hold(10_000, 12_288)  # training
    peaks.begin_selection()
    hold(30_000, 32_768)  # the selection pass's logits
    hold(10_000, 32_768)  # freed, still cached
    peaks.end_selection()
    hold(10_000, 12_288)  # training again
    after_last_selection = {"max_allocated_mib": peak["allocated"], "max_reserved_mib": peak["reserved"]}
    assert peaks.select == {"max_allocated_mib": 30_000, "max_reserved_mib": 32_768}
    assert peaks.training_peaks(after_last_selection) == {"max_allocated_mib": 10_000, "max_reserved_mib": 12_288}


def test_without_cuda_training_peaks_pass_through():
    none = {"max_allocated_mib": None, "max_reserved_mib": None}
    assert SelectionPeaks().training_peaks(none) == none


@pytest.mark.skipif(torch.cuda.is_available(), reason="without CUDA the engine turns Liger off")
def test_engine_kernels_are_patched_in_before_any_evaluation(monkeypatch):
    """Liger is patched into the loaded model (the run does it before its zero-shot evaluation) and not at all where
    the engine does not use it; without CUDA the engine turns Liger off and says so once."""
    import dataclasses
    import sys
    import types

    from common import engine as engine_module
    from common.config import EngineArguments
    from common.precision import resolve_precision

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model, **kernels: calls.append((model, kernels))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = torch.nn.Linear(2, 2)  # no decoder: the model's own loss (--loss full-logits) leaves its forward alone

    fp32 = resolve_precision("fp32")
    engine_module.apply_engine(model, EngineArguments(liger=False, loss="full-logits"), fp32)
    assert calls == []
    engine_module.apply_engine(model, EngineArguments(liger=True, loss="full-logits"), fp32)
    engine_module.apply_engine(model, EngineArguments(liger=True, loss="liger-fused"), fp32)
    assert [m for m, _ in calls] == [model, model]
    assert [k["fused_linear_cross_entropy"] for _, k in calls] == [False, True]
    assert all(k["swiglu"] and k["rope"] and not k["rms_norm"] and not k["cross_entropy"] for _, k in calls)

    usable, notes = engine_module.usable_engine(EngineArguments(liger=True))  # this machine has no CUDA
    assert not usable.liger and len(notes) == 1 and "CUDA" in notes[0]
    assert usable == dataclasses.replace(EngineArguments(), liger=False)
    assert engine_module.usable_engine(EngineArguments(liger=False)) == (EngineArguments(liger=False), [])
    usable, notes = engine_module.usable_engine(EngineArguments(liger=True, loss="liger-fused"))
    assert (usable.liger, usable.loss) == (False, "answer-chunks") and "fused loss" in notes[1]


def test_ddp_comm_hook_is_handed_to_accelerate():
    import types

    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    from common.config import EngineArguments
    from common.training import configure_ddp_communication

    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(ddp_handler=DistributedDataParallelKwargs()))
    configure_ddp_communication(trainer, EngineArguments())
    assert trainer.accelerator.ddp_handler.comm_hook == DDPCommunicationHookType.NO
    configure_ddp_communication(trainer, EngineArguments(ddp_comm_hook="bf16"))
    assert trainer.accelerator.ddp_handler.comm_hook == DDPCommunicationHookType.BF16


def test_the_allocator_setting_leaves_a_users_own_alone(monkeypatch):
    import os

    from common.config import EngineArguments
    from common.training import configure_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    configure_allocator(EngineArguments(expandable_segments=False))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    configure_allocator(EngineArguments())
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    configure_allocator(EngineArguments())
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_the_optimizer_state_is_freed_before_the_fine_tuned_evaluation():
    """After training nothing reads AdamW's moments again (the checkpoints hold them): the fine-tuned evaluation's
    memory peak must not carry them. Through a wrapper like accelerate's, as the Trainer holds the optimizer."""
    from types import SimpleNamespace

    from common.training import PiqaTrainer

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert len(optimizer.state) == 2  # weight and bias, each with its moments
    PiqaTrainer.free_optimizer_state(SimpleNamespace(optimizer=SimpleNamespace(optimizer=optimizer)))
    assert len(optimizer.state) == 0
