"""Batches for scoring a causal LM: left padding with positions that ignore it, autocast, chunks, progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / DataParallel (`.module`) or torch.compile (`._orig_mod`)."""
    inner = model
    while True:
        if isinstance(inner, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = inner.module
        elif hasattr(inner, "_orig_mod"):  # torch.compile's wrapper (read, never set here)
            inner = inner._orig_mod
        else:
            return inner


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the input embeddings' device (right for models split over devices too)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def max_length(model: torch.nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048)


def pad_id(tokenizer) -> int:
    """Any id will do for masked positions; the pad token if there is one, else EOS, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding does not shift RoPE positions."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def progress_bar(batches: list, enabled: bool, what: str):
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=f"PIQA {what}", unit="batch")
