"""Training helpers: the selection passes' memory is measured apart from training's."""

import torch

from common.training import SelectionPeaks


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


def test_without_cuda_training_peaks_pass_through():
    none = {"max_allocated_mib": None, "max_reserved_mib": None}
    assert SelectionPeaks().training_peaks(none) == none


def test_liger_kernels_select_liger_kernel_config():
    import dataclasses

    import pytest

    import modified
    from common.config import LIGER_KERNELS, ConfigError
    from common.training import liger_kernel_config

    only_flce = dataclasses.replace(modified.PROFILE, liger_kernels=("fused_linear_cross_entropy",))
    config = liger_kernel_config(only_flce)
    assert set(config) == set(LIGER_KERNELS)
    assert [k for k, on in config.items() if on] == ["fused_linear_cross_entropy"]
    assert liger_kernel_config(dataclasses.replace(modified.PROFILE, liger_kernels=None)) is None
    with pytest.raises(ConfigError, match="flash"):
        dataclasses.replace(modified.PROFILE, liger_kernels=("flash",))


def test_profile_kernels_are_patched_in_before_any_evaluation(monkeypatch):
    """Liger is patched into the loaded model with the profile's kernel choice (the run calls this before its
    zero-shot evaluation), and not at all where the profile does not use Liger."""
    import dataclasses
    import sys
    import types

    import baseline
    import modified
    from common import training

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model, **kernels: calls.append((model, kernels))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(training, "liger_kernel_usable", lambda: True)
    model = torch.nn.Linear(2, 2)

    training.apply_profile_kernels(model, baseline.PROFILE)
    assert calls == []
    only_flce = dataclasses.replace(modified.PROFILE, liger_kernels=("fused_linear_cross_entropy",))
    training.apply_profile_kernels(model, only_flce)
    assert calls == [(model, training.liger_kernel_config(only_flce))]


def test_ddp_comm_hook_is_checked_up_front_and_handed_to_accelerate():
    import dataclasses
    import types

    import pytest
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    import modified
    from common.config import ConfigError
    from common.training import configure_ddp_communication

    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(ddp_handler=DistributedDataParallelKwargs()))
    configure_ddp_communication(trainer, modified.PROFILE)
    assert trainer.accelerator.ddp_handler.comm_hook == DDPCommunicationHookType.NO
    configure_ddp_communication(trainer, dataclasses.replace(modified.PROFILE, ddp_comm_hook="bf16"))
    assert trainer.accelerator.ddp_handler.comm_hook == DDPCommunicationHookType.BF16
    with pytest.raises(ConfigError, match="ddp_comm_hook"):
        dataclasses.replace(modified.PROFILE, ddp_comm_hook="powersgd")
