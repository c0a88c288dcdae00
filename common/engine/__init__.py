"""How one training step is executed: apply_engine(model, engine, precision) is the one entry point.

One step, from the Trainer's call:
  PlannedCollator (plan.py)      on the host, as the batch is collated: its decoder passes (length groups), their
                                 answer positions, the positions they hold; carried in the batch as "plan"
  EngineTrainer.compute_loss     Engine.before_forward: the activation budget (budget.py) chooses which decoder
                                 layers the step checkpoints, from the plan's positions
  model(**batch)                 through DDP/FSDP to the model's forward: with --loss answer-chunks that is
                                 AnswerTokenForward (loss.py): the plan's decoder passes, logits at the answer tokens
  the decoder's modules          fused RMSNorm and Liger's SwiGLU and RoPE (kernels.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer

from common.config import EngineArguments
from common.engine.budget import ActivationBudget, activation_budget, batch_positions
from common.engine.kernels import liger_kernel_config, usable_engine, use_kernels
from common.engine.loss import use_answer_token_loss
from common.engine.plan import BatchPlan, PlannedCollator
from common.precision import Precision

__all__ = ["Engine", "EngineTrainer", "apply_engine", "liger_kernel_config", "usable_engine"]


@dataclass
class Engine:
    """The engine as applied to one model: its settings (as this hardware runs them) and its activation budget."""

    settings: EngineArguments
    precision: Precision
    budget: ActivationBudget | None = None  # None: every layer checkpointed, or none (--no-gradient-checkpointing)

    @property
    def answer_tokens(self) -> bool:
        return self.settings.loss == "answer-chunks"

    def fit(self, model: torch.nn.Module, settings: EngineArguments) -> None:
        """The settings as the memory plan left them, and the activation budget for them, measured on `model`."""
        self.settings = settings
        self.budget = budget_for(model, settings, self.precision)

    def collator(self, inner) -> PlannedCollator:
        """The training collator: `inner`'s batches with their plan. Only the answer-token loss splits a batch."""
        return PlannedCollator(inner, self.settings.pad_to_multiple_of, split=self.answer_tokens and
                               self.settings.length_split)

    def before_forward(self, model: torch.nn.Module, inputs: dict) -> dict:
        """A training forward's inputs, once the budget has chosen the layers to checkpoint for them. `model` as the
        Trainer calls it: a sharded one (FSDP gathers a layer's parameters for every pass) runs its batches whole."""
        plan: BatchPlan | None = inputs.get("plan")
        if plan is not None and len(plan.passes) > 1 and _sharded(model):
            plan = plan.unsplit()
        if self.budget is not None:
            self.budget.choose(plan.decoder_positions if plan is not None else batch_positions(inputs))
        if self.answer_tokens and plan is not None:
            return {**inputs, "plan": plan}
        return {k: v for k, v in inputs.items() if k != "plan"}  # the model's own forward takes no plan


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def apply_engine(model: torch.nn.Module, engine: EngineArguments, precision: Precision,
                 budget: bool = True) -> Engine:
    """The engine's kernels and loss on `model`, set once before the first evaluation, so that the zero-shot and
    fine-tuned evaluations (and an --eval-only run) use what training uses; and, with `budget`, the activation budget
    measured on the model as it now is. `engine` must come from usable_engine."""
    use_kernels(model, engine)
    if engine.loss == "answer-chunks":
        use_answer_token_loss(model)
    applied = Engine(engine, precision)
    if budget:
        applied.fit(model, engine)
    return applied


def budget_for(model: torch.nn.Module, engine: EngineArguments, precision: Precision) -> ActivationBudget | None:
    """The per-batch checkpointing choice within --activation-budget-gib (None where it does not apply)."""
    if engine.gradient_checkpointing and engine.activation_budget_gib > 0:
        return activation_budget(model, engine.activation_budget_gib, precision.autocast_dtype)
    return None


class EngineTrainer(Trainer):
    """The HF Trainer, calling the engine before each training forward (the activation budget's choice)."""

    def __init__(self, *args, engine: Engine, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = engine

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, self.engine.before_forward(model, inputs), return_outputs,
                                    num_items_in_batch)
