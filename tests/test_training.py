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
