"""Gradient checkpointing of only as many decoder layers as a memory budget needs, chosen per micro-batch.

A checkpointed layer keeps only its input for the backward pass and runs its forward again there. On this
experiment's batches (128 PIQA examples, about 5,000 tokens) a step's time is mostly the launching of its kernels,
and the recomputed forward launches a third of them again (docs/benchmarks.md). So each micro-batch's decoder
layers keep their activations, last layer first, while everything the layers keep for the backward pass fits in
`--activation-budget-gib`; the remaining layers are checkpointed. The arithmetic is the same either way: only
what is stored and what is recomputed changes. A short batch checkpoints nothing; the longest, every layer.

What a layer keeps per token position is measured once, on the loaded model with the engine's kernels and the
profile's precision: the tensors autograd saves in two small forward passes, counted by storage.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from common.memory import GIB

PROBE_LENGTH = 32  # tokens per probe row; the probes differ in rows only, so a layer's fixed costs cancel out


@dataclass(frozen=True)
class LayerActivations:
    """Bytes per token position that one decoder layer keeps for the backward pass."""

    kept_bytes: float  # not checkpointed: every tensor its operations save
    checkpointed_bytes: float  # checkpointed: its input hidden states only


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers transformers can checkpoint one by one (its decoder layers), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def measure_layer_activations(model: torch.nn.Module, autocast_dtype: torch.dtype | None) -> LayerActivations:
    """Forward passes of 1 and 3 rows in training mode, every layer un-checkpointed; the difference of what the
    layers saved, per position. The model's state, flags and random number generators are left as they were."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    flags = [layer.gradient_checkpointing for layer in layers]
    was_training = model.training
    try:
        for layer in layers:
            layer.gradient_checkpointing = False
        model.train()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            small, small_input = _saved_by_layers(model, layers, 1, device, autocast_dtype)
            large, _ = _saved_by_layers(model, layers, 3, device, autocast_dtype)
    finally:
        for layer, flag in zip(layers, flags):
            layer.gradient_checkpointing = flag
        model.train(was_training)
    positions = 2 * PROBE_LENGTH
    return LayerActivations(kept_bytes=(large - small) / positions / len(layers),
                            checkpointed_bytes=small_input)


def _saved_by_layers(model, layers, rows: int, device, autocast_dtype) -> tuple[int, float]:
    """Bytes of the storages autograd saved inside the decoder layers for a [rows, PROBE_LENGTH] batch (one row
    ends in padding, as training batches do), and the bytes per position of a layer's input."""
    saved: dict[int, int] = {}
    inside = {"layer": False, "input_bytes": 0.0}

    def pack(tensor):
        if inside["layer"]:
            storage = tensor.untyped_storage()
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        # Detached: the storage stays alive until the output is deleted, without the reference cycle that a tensor
        # saved with its own grad_fn makes (autograd's graph, and the bf16 weight copies in it, would never be freed).
        return tensor.detach()

    def enter(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inside["layer"], inside["input_bytes"] = True, hidden.element_size() * hidden.shape[-1]

    def leave(module, args, output):
        inside["layer"] = False

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter, with_kwargs=True),
                                               layer.register_forward_hook(leave))]
    vocabulary = model.get_input_embeddings().num_embeddings
    input_ids = torch.arange(rows * PROBE_LENGTH, device=device).reshape(rows, PROBE_LENGTH) % vocabulary
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -1] = 0
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        with torch.enable_grad(), autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        del output  # the saved tensors stay alive (and their addresses unique) until here
    finally:
        for handle in handles:
            handle.remove()
    return sum(saved.values()), inside["input_bytes"]


def batch_positions(forward_kwargs: dict) -> int:
    """The token positions of a forward's batch as it is: rows x length of its input_ids (or inputs_embeds)."""
    tokens = forward_kwargs.get("input_ids")
    tokens = forward_kwargs["inputs_embeds"] if tokens is None else tokens
    return tokens.shape[0] * tokens.shape[1]


class ActivationBudget:
    """Which decoder layers keep their activations: before each training forward, `choose` is given the positions
    the forward's decoder passes will hold (the batch's plan); every pass then checkpoints its first layers and
    keeps the last ones."""

    def __init__(self, layers: list[torch.nn.Module], activations: LayerActivations, budget_bytes: float):
        self.layers = layers
        self.activations = activations
        self.budget_bytes = budget_bytes

    def layers_kept(self, positions: int) -> int:
        """How many layers can keep their activations when the decoder passes hold `positions` token positions."""
        n, kept, ckpt = len(self.layers), self.activations.kept_bytes, self.activations.checkpointed_bytes
        spare = self.budget_bytes / max(1, positions) - n * ckpt  # per position, with every layer checkpointed
        if spare <= 0:
            return 0
        if kept <= ckpt:
            return n
        return min(n, int(spare // (kept - ckpt)))

    def choose(self, positions: int) -> None:
        """Checkpoint the first layers, keep the last ones, for a forward whose passes hold `positions`. Only once
        checkpointing is enabled (by the Trainer: transformers sets each layer's checkpointing function)."""
        kept = self.layers_kept(positions)
        for index, layer in enumerate(self.layers):
            if getattr(layer, "_gradient_checkpointing_func", None) is not None:
                layer.gradient_checkpointing = index < len(self.layers) - kept

    def checkpointed_share(self, positions: int) -> float:
        """The share of a pass's decoder layers that are checkpointed (recomputed in the backward pass)."""
        return 1 - self.layers_kept(positions) / len(self.layers)

    def record(self) -> dict:
        """For metrics.json: the budget and what was measured."""
        return {"budget_gib": self.budget_bytes / GIB, "decoder_layers": len(self.layers),
                "kept_bytes_per_position_per_layer": self.activations.kept_bytes,
                "checkpointed_bytes_per_position_per_layer": self.activations.checkpointed_bytes}

    def describe(self) -> str:
        a = self.activations
        examples = ", ".join(f"{p:,} positions: {len(self.layers) - self.layers_kept(p)}" for p in (2_000, 5_000, 30_000))
        return (f"gradient checkpointing within {self.budget_bytes / GIB:g} GiB of kept activations: a decoder layer "
                f"keeps {a.kept_bytes / 1024:.1f} KiB a token position, {a.checkpointed_bytes / 1024:.1f} KiB "
                f"checkpointed (measured); layers checkpointed of {len(self.layers)} for a batch of {examples}")


def activation_budget(model: torch.nn.Module, budget_gib: float,
                      autocast_dtype: torch.dtype | None) -> ActivationBudget | None:
    """The budget for `model`, what its layers keep measured now (None for a model without checkpointable layers)."""
    layers = decoder_layers(model)
    if not layers:
        return None
    return ActivationBudget(layers, measure_layer_activations(model, autocast_dtype), budget_gib * GIB)
