"""The training loss with the LM head's logits computed at the answer tokens only.

The loss is the mean cross-entropy over the answer tokens (the context's and padding's labels are IGNORE_INDEX),
exactly as the model's own forward computes it; only the work differs. The model's forward projects every position
onto the 128k-token vocabulary and keeps those logits (float32 for the loss) until the backward pass: about 1.5 MB
a token, tens of GiB for a long batch, and a third of them at positions without a loss. Here the decoder's output
is gathered at the answer positions and projected a chunk of rows at a time; each chunk's logits are recomputed in
the backward pass (activation checkpointing on the head alone), so at most one chunk's logits exist at once.

A batch whose rows differ much in length (the longest of each length-grouped mega-batch: PIQA's longest examples,
243 tokens, with ones of 60) is split into groups of similar length, each padded only to its own longest, when
that saves more padded positions than another pass of the decoder costs. The loss is the same sum over the same
answer tokens; only padding is skipped.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from common.checkpointing import batch_positions
from common.config import ConfigError
from common.data import IGNORE_INDEX

CHUNK_LOGITS_BYTES = 1 << 28  # bound on one chunk's float32 logits [rows x vocabulary]: 523 rows of 128k
# What one more decoder pass costs, in padded positions: on an H200 a step's fixed cost (~100 ms of kernel launches)
# is worth a few thousand positions of a long batch's work (~55 positions a millisecond).
SPLIT_COST_POSITIONS = 4096
MAX_LENGTH_GROUPS = 4
GROUP_ROWS = 8  # groups are whole multiples of this many rows (but the last)
# Model types whose logits are the output projection of the decoder's last hidden state and nothing more (Gemma
# soft-caps its logits, Cohere and Granite scale them: their loss is not this one).
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def answer_token_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_bytes: int = CHUNK_LOGITS_BYTES,
    answers: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of next-token prediction at the positions whose next label is not IGNORE_INDEX.

    hidden: [batch, positions, hidden] decoder output; head_weight: [vocabulary, hidden]; labels: [batch, positions].
    Summed, then divided by `num_items_in_batch` (the answer tokens of the whole optimizer step, as the Trainer
    passes it) or, without it, by this batch's answer tokens: transformers' ForCausalLMLoss, term for term.
    `answers`: those positions' indices into labels[:, 1:].reshape(-1), where the caller has them (else found here,
    a wait for the GPU).
    """
    targets = labels[:, 1:].reshape(-1)
    if answers is None:
        answers = targets.ne(IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, answers)  # [answer tokens, hidden]
    targets = targets.index_select(0, answers)
    if torch.is_autocast_enabled(hidden.device.type):
        # The cast autocast would make in every chunk's matmul, made once: the backward pass recomputes each chunk
        # outside this forward's autocast region, where its cache of casts is gone.
        head_weight = head_weight.to(torch.get_autocast_dtype(hidden.device.type))
    chunk_rows = max(1, chunk_bytes // (4 * head_weight.shape[0]))
    chunk_sums = [checkpoint(_summed_cross_entropy, rows[start : start + chunk_rows], head_weight,
                             targets[start : start + chunk_rows], use_reentrant=False)
                  for start in range(0, rows.shape[0], chunk_rows)]
    # A batch without answer tokens: a zero still connected to the graph, so backward runs as for any batch.
    total = torch.stack(chunk_sums).sum() if chunk_sums else hidden.sum() * 0.0
    if num_items_in_batch is None:
        return total / targets.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _summed_cross_entropy(rows: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(rows, head_weight)  # under autocast: a bf16 matmul, as the model's lm_head
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def use_answer_token_loss(model: torch.nn.Module, length_multiple: int | None = None) -> None:
    """Train `model` (a causal LM: a decoder and an output projection) with answer_token_loss: its forward is
    rebound, on this instance only, so that a call with labels returns the loss without logits. Calls without
    labels (evaluation, generation) go to the model's own forward. `length_multiple`: the collator's
    pad_to_multiple_of, which the length groups keep (each group padded to a multiple of it)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        raise ConfigError(
            f"--loss answer-chunks computes the logits as the decoder's output projection alone, which is what "
            f"{', '.join(PLAIN_HEAD_MODEL_TYPES)} models do; this model is {model_type or type(model).__name__}: "
            "run it with --loss full-logits")
    model.forward = MethodType(_answer_token_forward, model)
    model._answer_loss_length_multiple = length_multiple


def _answer_token_forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None,
                          **kwargs) -> CausalLMOutputWithPast:
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    kwargs.setdefault("use_cache", False)
    decoder, weight = self.get_decoder(), self.get_output_embeddings().weight
    if input_ids is None or attention_mask is None:  # inputs_embeds, or no mask: as the batch is, answers found on the GPU
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(loss=answer_token_loss(hidden, weight, labels, num_items_in_batch))
    if num_items_in_batch is None:
        num_items_in_batch = labels[:, 1:].ne(IGNORE_INDEX).sum()
    groups = length_groups_of(self, input_ids, attention_mask)
    # The rows and answer positions of every pass, found on the host from one copy of the labels and sent without
    # waiting: the GPU keeps the queue of work the host has already issued.
    host_labels = labels.cpu()
    loss = 0.0
    for rows, length in groups or [(None, labels.shape[1])]:
        if rows is None:
            pass_ids, pass_mask, pass_labels, host_pass = input_ids, attention_mask, labels, host_labels
        else:
            host_rows = torch.tensor(rows)
            device_rows = _to_device(host_rows, input_ids.device)
            pass_ids, pass_mask, pass_labels = (t.index_select(0, device_rows)[:, :length]
                                                for t in (input_ids, attention_mask, labels))
            host_pass = host_labels.index_select(0, host_rows)[:, :length]
        answers = _to_device(host_pass[:, 1:].reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1), input_ids.device)
        hidden = decoder(input_ids=pass_ids, attention_mask=pass_mask, **kwargs).last_hidden_state
        loss = loss + answer_token_loss(hidden, weight, pass_labels, num_items_in_batch, answers=answers)
    return CausalLMOutputWithPast(loss=loss)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from page-locked memory, so that the host does not wait for the copy."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def decoder_positions(model: torch.nn.Module | None, forward_kwargs: dict, length_multiple: int | None = None) -> int:
    """The token positions the answer-token forward of `model` passes through the decoder for these arguments (a
    training forward, with labels); `model` None: a model that is not sharded, whose groups keep `length_multiple`."""
    input_ids, attention_mask = forward_kwargs.get("input_ids"), forward_kwargs.get("attention_mask")
    groups = length_groups_of(model, input_ids, attention_mask, length_multiple)
    if groups is None:
        return batch_positions(forward_kwargs)
    return sum(len(rows) * length for rows, length in groups)


def length_groups_of(model: torch.nn.Module | None, input_ids, attention_mask,
                     length_multiple: int | None = None) -> list[tuple[list[int], int]] | None:
    """The length groups of a training batch, or None to run it whole. FSDP gathers a layer's parameters for every
    pass through it, so a sharded model runs its batches whole (the split is not measured there)."""
    if input_ids is None or attention_mask is None or (model is not None and _sharded(model)):
        return None
    cached = getattr(model, "_answer_loss_groups", None)  # the checkpointing budget's, for this same batch
    if cached is not None and cached[0] is attention_mask:
        return cached[1]
    groups = right_padded_groups(attention_mask, getattr(model, "_answer_loss_length_multiple", None) or length_multiple)
    if model is not None:
        model._answer_loss_groups = (attention_mask, groups)
    return groups


def _sharded(model: torch.nn.Module) -> bool:
    if not hasattr(model, "_answer_loss_sharded"):  # FSDP wraps the model once, when training starts
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        model._answer_loss_sharded = any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())
    return model._answer_loss_sharded


def right_padded_groups(attention_mask: torch.Tensor, length_multiple: int | None = None
                        ) -> list[tuple[list[int], int]] | None:
    """The length groups of a right-padded batch (the training collator's), or None to run it as it is: one group,
    or padding not on the right. With `length_multiple`, each group is padded to a multiple of it (at most to the
    batch's width)."""
    mask = attention_mask.cpu()  # a wait for the GPU, as the Trainer's count of the batch's tokens already has
    if mask.shape[1] < 2 or not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None
    lengths = mask.sum(1).tolist()
    if length_multiple:
        lengths = [min(mask.shape[1], -(-length // length_multiple) * length_multiple) for length in lengths]
    groups = length_groups(lengths, SPLIT_COST_POSITIONS, MAX_LENGTH_GROUPS)
    return groups if len(groups) > 1 else None


def length_groups(lengths: list[int], split_cost: int = SPLIT_COST_POSITIONS,
                  max_groups: int = MAX_LENGTH_GROUPS) -> list[tuple[list[int], int]]:
    """Rows (indices into `lengths`) in groups of similar length, each with its longest length: the split with the
    fewest padded positions, each group after the first counted as `split_cost` positions more."""
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    longest = [lengths[row] for row in order]  # longest first: a group's rows are padded to its first row's length
    if len(order) * longest[0] - sum(longest) <= split_cost:  # all the padding there is would not pay for a split
        return [(order, longest[0])]
    cuts = list(range(0, len(order), GROUP_ROWS)) + [len(order)]
    # best[k][j]: the fewest positions for rows order[:cuts[j]] in k + 1 groups, and where its last group starts
    best = [[((cuts[j] * longest[0]), 0) for j in range(len(cuts))]]
    for _ in range(1, max_groups):
        best.append([min(((best[-1][i][0] + (cuts[j] - cuts[i]) * longest[cuts[i]], i) for i in range(1, j)),
                         default=(float("inf"), 0)) for j in range(len(cuts))])
    groups = min(range(max_groups), key=lambda k: best[k][-1][0] + k * split_cost)
    bounds, j = [], len(cuts) - 1
    for k in range(groups, -1, -1):
        i = best[k][j][1]
        bounds.append((cuts[i], cuts[j]))
        j = i
    return [(order[start:end], longest[start]) for start, end in reversed(bounds)]
