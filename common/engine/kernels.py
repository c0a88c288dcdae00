"""The engine's kernels: PyTorch's fused RMSNorm in the Llama family's RMSNorm modules; Liger's SwiGLU and RoPE.

An RMSNorm module's forward is six elementwise kernels (cast, square, mean, rsqrt, two products); `F.rms_norm` is
one kernel forward and one backward, with the same arithmetic in float32. This experiment's steps are short enough
that the launches, not the arithmetic, set their time: on an H200 this was faster than Liger's Triton RMSNorm too,
whose Python launch costs more (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import torch
import torch.nn.functional as F

from common.config import EngineArguments

# Modules computing weight * x / sqrt(mean(x^2) + eps) (Gemma's scales by 1 + weight: not this kernel).
FUSED_RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class FusedRMSNorm(torch.nn.Module):
    """An RMSNorm module's replacement: the same weight Parameter (the same state-dict key) and epsilon."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.weight = module.weight
        self.variance_epsilon = module.variance_epsilon
        self.own_class = type(module)  # whose forward takes the inputs the kernel does not take as they are

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != self.weight.dtype:  # the module's own casts (half-precision weights or inputs)
            return self.own_class.forward(self, hidden_states)
        with torch.autocast(hidden_states.device.type, enabled=False):  # float32 in, float32 arithmetic, as the module's
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def use_fused_rms_norm(model: torch.nn.Module) -> int:
    """Replace `model`'s RMSNorm modules by FusedRMSNorm; the number replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in FUSED_RMS_NORM_CLASSES:
                setattr(parent, name, FusedRMSNorm(child))
                replaced += 1
    return replaced


def usable_engine(engine: EngineArguments) -> tuple[EngineArguments, list[str]]:
    """The engine as it can run here, and a note for each setting this hardware turns off (said once, in the log).
    Liger's kernels are Triton code: they need a CUDA GPU and the liger-kernel package."""
    notes = []
    if engine.liger and not torch.cuda.is_available():
        notes.append("Liger kernels are off: they need a CUDA GPU (Triton); the run uses PyTorch's kernels")
    elif engine.liger and importlib.util.find_spec("liger_kernel") is None:
        notes.append("Liger kernels are off: liger-kernel is not installed (pip install liger-kernel)")
    if notes:
        engine = replace(engine, liger=False)
        if engine.loss == "liger-fused":
            notes.append("Liger's fused loss is off with it: the loss projects the answer tokens only (answer-chunks)")
            engine = replace(engine, loss="answer-chunks")
    return engine, notes


def liger_kernel_config(engine: EngineArguments) -> dict[str, bool]:
    """Which of Liger's kernels the engine uses: SwiGLU and RoPE, and its fused loss with --loss liger-fused.
    (RMSNorm is PyTorch's fused kernel, above.)"""
    return {"rope": True, "rms_norm": False, "swiglu": True, "cross_entropy": False,
            "fused_linear_cross_entropy": engine.loss == "liger-fused"}


def use_kernels(model: torch.nn.Module, engine: EngineArguments) -> None:
    """The engine's attention switch, Liger's kernels (where the engine has them) and the fused RMSNorm. (The Trainer
    patches Liger in again when it is built; patching twice is harmless.)"""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(engine.cudnn_attention)
    if engine.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance  # what the Trainer calls

        _apply_liger_kernel_to_instance(model=model, **liger_kernel_config(engine))
    use_fused_rms_norm(model)
