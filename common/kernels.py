"""PyTorch's fused RMSNorm kernel in the Llama family's RMSNorm modules.

Their forward is six elementwise kernels (cast, square, mean, rsqrt, two products); `F.rms_norm` is one kernel
forward and one backward, with the same arithmetic in float32. This experiment's steps are short enough that the
launches, not the arithmetic, set their time: on an H200 this was faster than Liger's Triton RMSNorm too, whose
Python launch costs more (docs/benchmarks.md).
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F

# Modules computing weight * x / sqrt(mean(x^2) + eps) (Gemma's scales by 1 + weight: not this kernel).
FUSED_RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def use_fused_rms_norm(model: torch.nn.Module) -> int:
    """Rebind the forward of `model`'s RMSNorm modules (this instance's only); the number rebound."""
    modules = [m for m in model.modules() if type(m).__name__ in FUSED_RMS_NORM_CLASSES]
    for module in modules:
        module.forward = MethodType(_fused_rms_norm_forward, module)
    return len(modules)


def _fused_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:  # the module's own casts (half-precision weights or inputs)
        return type(self).forward(self, hidden_states)
    with torch.autocast(hidden_states.device.type, enabled=False):  # float32 in, float32 arithmetic, as the module's
        return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
