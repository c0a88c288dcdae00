"""The profile's precision, resolved once for this machine and passed to everything that computes.

"fp32": fp32 weights and arithmetic, TF32 matmuls off on CUDA. "mixed": autocast over fp32 master weights, in
bf16 where the hardware has it (any CUDA GPU from Ampere on, and CPUs), else fp16 with a GradScaler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # the profile's: "fp32" or "mixed"
    autocast_dtype: torch.dtype | None  # None: no autocast (fp32)
    on_cuda: bool

    @property
    def bf16(self) -> bool:
        return self.autocast_dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.autocast_dtype == torch.float16

    @property
    def grad_scaler(self) -> bool:
        """fp16's gradients need loss scaling; bf16's range does not."""
        return self.fp16

    @property
    def tf32(self) -> bool | None:
        """TrainingArguments' tf32: off for fp32 on CUDA ("standard" fp32 matmuls), else torch's default."""
        return False if self.on_cuda and self.autocast_dtype is None else None

    @property
    def accelerate_name(self) -> str:
        """accelerate's name for it (its mixed_precision setting)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"

    def trainer_flags(self) -> dict:
        return {"bf16": self.bf16, "fp16": self.fp16, "tf32": self.tf32}

    def autocast(self, device_type: str):
        """The forward passes' autocast context (a no-op for fp32)."""
        return torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


def resolve_precision(name: str, on_cuda: bool | None = None) -> Precision:
    """`name` ("fp32" or "mixed") on this machine (`on_cuda` None: whether torch sees a CUDA GPU)."""
    if on_cuda is None:
        on_cuda = torch.cuda.is_available()
    if name == "fp32":
        return Precision(name, None, on_cuda)
    if name != "mixed":
        raise ValueError(f"unknown precision {name!r}")
    bf16 = not on_cuda or not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    return Precision(name, torch.bfloat16 if bf16 else torch.float16, on_cuda)
