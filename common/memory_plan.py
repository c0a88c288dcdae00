"""The engine's memory settings fitted to the GPU before anything trains: gradient accumulation (the micro-batch),
the activation budget and the evaluation's logits bound.

The experiment does not change (128 examples per optimizer step, the same arithmetic): only how a step is split
and what it recomputes. The plan is the same for both profiles on the same card, as the engine must be: it counts
the larger of fp32's and mixed precision's needs (mixed adds bf16 copies of the weights; fp32 keeps larger
activations). On a card with room it keeps the engine's defaults, so the speed there is unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.config import ConfigError, EngineArguments
from common.data import round_up
from common.engine.budget import LayerActivations
from common.memory import GIB

TRAINING_STATE_BYTES_PER_PARAMETER = 4 + 4 + 8  # fp32 weight, gradient and AdamW's two moments
EVAL_STATE_BYTES_PER_PARAMETER = 4 + 4 + 8 + 2  # a selection pass: the training state (gradients may still be held), bf16 copies
BF16_COPY_BYTES_PER_PARAMETER = 2  # mixed precision's weights cast for the forward pass (autocast's cache)
EVAL_ONLY_BYTES_PER_PARAMETER = 4 + 2  # --eval-only: the fp32 weights and their bf16 copies, nothing of training
# --loss full-logits: the model's own loss over every position holds its logits (bf16 in mixed precision), their fp32
# copy and the log-softmax cross-entropy keeps for the backward pass, per position and vocabulary entry.
FULL_LOGITS_BYTES_PER_ENTRY = 2 + 4 + 4
# What the plan leaves free beyond the state and the activations: the loss's 256 MiB chunks, cuBLAS workspaces,
# allocator fragmentation.
HEADROOM_BYTES = GIB
# Below this, checkpoint every layer: the budget counts activations per position, not what a kept layer holds
# whatever the batch (its bf16 weight copies in mixed precision); on a 22 GiB cap a 0.25 GiB budget ran modified
# out of memory where accumulation 16 alone left room.
MIN_BUDGET_GIB = 2.0
EVAL_LOGITS_MAX_BYTES = 4 * GIB  # the evaluation's bound where memory allows (common/evaluation.py)
EVAL_LOGITS_MIN_BYTES = GIB // 4


@dataclass(frozen=True)
class MemoryPlan:
    usable_bytes: int  # GPU memory this process may use (the card, or --gpu-memory-gib)
    state_bytes: int  # fp32 weights, gradients and AdamW state
    longest_positions: int  # token positions of the longest micro-batch the planned split can produce
    gradient_accumulation_steps: int
    activation_budget_gib: float
    eval_logits_bytes: int
    changes: tuple[str, ...]  # what the plan changed from the flags, for the log
    training: bool = True  # False: --eval-only, whose plan is the evaluation's logits bound alone

    def describe(self) -> str:
        if not self.training:
            return (f"memory plan for {self.usable_bytes / GIB:.1f} GiB of GPU memory (evaluation only): evaluation "
                    f"logits within {self.eval_logits_bytes / GIB:.2f} GiB (weights and their bf16 copies "
                    f"{self.state_bytes / GIB:.1f} GiB)")
        changed = f"; changed from the flags: {', '.join(self.changes)}" if self.changes else ""
        return (f"memory plan for {self.usable_bytes / GIB:.1f} GiB of GPU memory: gradient accumulation "
                f"{self.gradient_accumulation_steps}, activation budget {self.activation_budget_gib:g} GiB, evaluation "
                f"logits within {self.eval_logits_bytes / GIB:.2f} GiB (weights, gradients and AdamW state "
                f"{self.state_bytes / GIB:.1f} GiB; longest micro-batch about {self.longest_positions:,} "
                f"positions){changed}")

    def record(self) -> dict:
        return dataclasses.asdict(self)


def longest_micro_batch_positions(lengths: list[int], micro_batch: int) -> int:
    """Token positions of the longest micro-batch: the longest example and the next `micro_batch - 1` longest,
    padded to the longest (an upper bound for length-grouped and random batches alike)."""
    longest = sorted(lengths, reverse=True)[:micro_batch]
    return micro_batch * longest[0] if longest else 0


def transient_bytes(parameters: int, head_parameters: int, positions: int, activations: LayerActivations) -> int:
    """What comes on top of the kept activations at the peak, the larger of: in the forward pass, mixed precision's
    bf16 weight copies; in the backward pass, one checkpointed layer's recomputed activations and two fp32 gradients
    of the output projection (the loss's and the tied input embeddings', before they are summed: the 22 GiB card's
    backward asked for one more 1,002 MiB there)."""
    forward = parameters * BF16_COPY_BYTES_PER_PARAMETER
    backward = positions * activations.kept_bytes + 2 * 4 * head_parameters
    return int(max(forward, backward))


def eval_logits_bound(usable_bytes: int, held_bytes: int) -> int:
    """The evaluation's logits bound: half of what `held_bytes` (weights and whatever training keeps) leave."""
    return int(min(EVAL_LOGITS_MAX_BYTES, max(EVAL_LOGITS_MIN_BYTES, (usable_bytes - held_bytes - HEADROOM_BYTES) // 2)))


def plan_memory(engine: EngineArguments, usable_bytes: int, parameters: int, layers: int,
                activations: LayerActivations, lengths: list[int], batch_size: int, world_size: int,
                head_parameters: int = 0, vocab_size: int = 0) -> MemoryPlan:
    """The smallest gradient accumulation (at least the flag's) whose longest micro-batch fits (every layer
    checkpointed, or none with --no-gradient-checkpointing), then the largest activation budget (at most the flag's)
    that fits beside it. `activations`: the larger of both precisions' per-position bytes; `lengths`: the training
    examples' token counts; `head_parameters` and `vocab_size`: the output projection's. Raises ConfigError where even
    one example per micro-batch cannot fit."""
    state = parameters * TRAINING_STATE_BYTES_PER_PARAMETER
    room = usable_bytes - state - HEADROOM_BYTES  # for activations and transients
    lengths = [round_up(n, engine.pad_to_multiple_of) for n in lengths]  # as the collator pads them
    per_position = layers * (activations.checkpointed_bytes if engine.gradient_checkpointing else activations.kept_bytes)
    if engine.loss == "full-logits":
        per_position += vocab_size * FULL_LOGITS_BYTES_PER_ENTRY
    accumulation = engine.gradient_accumulation_steps
    while True:
        per_step = accumulation * world_size
        if batch_size % per_step == 0:
            positions = longest_micro_batch_positions(lengths, batch_size // per_step)
            needed = positions * per_position + transient_bytes(parameters, head_parameters, positions, activations)
            if needed <= room:
                break
        if per_step >= batch_size:
            raise ConfigError(
                f"this GPU offers {usable_bytes / GIB:.1f} GiB: the model's weights, gradients and AdamW state need "
                f"{state / GIB:.1f} GiB, and one example per micro-batch {needed / GIB:.2f} GiB more; the experiment "
                "cannot train here (a GPU with more memory, or several with FSDP: common/fsdp.yaml)")
        accumulation += 1
    budget = engine.activation_budget_gib
    if engine.gradient_checkpointing:
        spare_gib = max(0.0, (room - transient_bytes(parameters, head_parameters, positions, activations)) / GIB)
        fitted = float(int(spare_gib * 4) / 4)  # quarter-GiB steps
        if fitted < budget:
            budget = fitted if fitted >= MIN_BUDGET_GIB else 0.0  # below the minimum: every layer checkpointed
    logits = eval_logits_bound(usable_bytes, parameters * EVAL_STATE_BYTES_PER_PARAMETER)
    changes = []
    if accumulation != engine.gradient_accumulation_steps:
        changes.append(f"--gradient-accumulation-steps {engine.gradient_accumulation_steps} -> {accumulation}")
    if budget != engine.activation_budget_gib:
        changes.append(f"--activation-budget-gib {engine.activation_budget_gib:g} -> {budget:g}")
    return MemoryPlan(usable_bytes, state, positions, accumulation, budget, logits, tuple(changes))


def planned_engine(engine: EngineArguments, plan: MemoryPlan) -> EngineArguments:
    return dataclasses.replace(engine, gradient_accumulation_steps=plan.gradient_accumulation_steps,
                               activation_budget_gib=plan.activation_budget_gib)


def usable_gpu_bytes(device, gpu_memory_gib: float | None) -> int:
    """What this process may use: the GPU's free memory plus what it already holds, within --gpu-memory-gib."""
    import torch

    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    usable = free_bytes + torch.cuda.memory_reserved(device)
    return int(min(usable, gpu_memory_gib * GIB if gpu_memory_gib else total_bytes))


def eval_only_plan(engine: EngineArguments, usable_bytes: int, parameters: int) -> MemoryPlan:
    """--eval-only: the evaluation's logits bound beside the weights alone; the training settings as given."""
    held = parameters * EVAL_ONLY_BYTES_PER_PARAMETER
    return MemoryPlan(usable_bytes, held, 0, engine.gradient_accumulation_steps, engine.activation_budget_gib,
                      eval_logits_bound(usable_bytes, held), (), training=False)


def fit_to_gpu(model, engine: EngineArguments, lengths: list[int], batch_size: int, world_size: int,
               eval_only: bool = False) -> MemoryPlan | None:
    """The plan for this model, data and GPU; None on a CPU, with --no-fit-memory, or under FSDP (sharded state)."""
    import os

    import torch

    from common.engine.budget import decoder_layers, measure_layer_activations
    from common.models import count_parameters

    sharded = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if not torch.cuda.is_available() or not engine.fit_memory or sharded:
        return None
    device = next(model.parameters()).device
    if eval_only:
        return eval_only_plan(engine, usable_gpu_bytes(device, engine.gpu_memory_gib), count_parameters(model))
    fp32, bf16 = (measure_layer_activations(model, dtype) for dtype in (None, torch.bfloat16))
    larger = LayerActivations(max(fp32.kept_bytes, bf16.kept_bytes),
                              max(fp32.checkpointed_bytes, bf16.checkpointed_bytes))
    return plan_memory(engine, usable_gpu_bytes(device, engine.gpu_memory_gib), count_parameters(model),
                       len(decoder_layers(model)), larger, lengths, batch_size, world_size,
                       model.get_output_embeddings().weight.numel(), model.get_output_embeddings().weight.shape[0])
