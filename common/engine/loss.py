"""The training loss with the LM head's logits computed at the answer tokens only.

The loss is the mean cross-entropy over the answer tokens (the context's and padding's labels are IGNORE_INDEX),
exactly as the model's own forward computes it; only the work differs. The model's forward projects every position
onto the 128k-token vocabulary and keeps those logits (float32 for the loss) until the backward pass: about 1.5 MB
a token, tens of GiB for a long batch, and a third of them at positions without a loss. Here the decoder's output
is gathered at the answer positions and projected a chunk of rows at a time; each chunk's logits are recomputed in
the backward pass (activation checkpointing on the head alone), so at most one chunk's logits exist at once. The
decoder passes (one, or one per length group) are the batch's plan (plan.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from common.config import ConfigError
from common.data import IGNORE_INDEX
from common.engine.plan import BatchPlan, plan_batch

CHUNK_LOGITS_BYTES = 1 << 28  # bound on one chunk's float32 logits [rows x vocabulary]: 523 rows of 128k
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


def answer_token_count(labels: torch.Tensor) -> torch.Tensor:
    """The tokens with a loss: labels not IGNORE_INDEX, shifted by one (the Trainer's num_items_in_batch)."""
    return labels[..., 1:].ne(IGNORE_INDEX).sum()


def _summed_cross_entropy(rows: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(rows, head_weight)  # under autocast: a bf16 matmul, as the model's lm_head
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class AnswerTokenForward:
    """The one adapter between the Trainer and the engine's loss. The Trainer, DDP and FSDP call the model's
    forward, so that is where the loss must be: a call with labels (a training step) runs the decoder pass by pass
    as the batch's plan says and returns the answer-token loss without logits; a call without labels (evaluation,
    generation) is the model's own forward. use_answer_token_loss gives a model this forward by making its class a
    subclass of the model's own with this forward first (same name, same state dict, same saved files)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None,
                plan: BatchPlan | None = None, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        if labels is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                                   **kwargs)
        kwargs.setdefault("use_cache", False)
        decoder, weight = self.get_decoder(), self.get_output_embeddings().weight
        if input_ids is None or attention_mask is None:  # inputs_embeds, or no mask: the batch as it is
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            return CausalLMOutputWithPast(loss=answer_token_loss(hidden, weight, labels, num_items_in_batch))
        if num_items_in_batch is None:
            num_items_in_batch = answer_token_count(labels)
        if plan is None:  # a caller without the collator's plan: made here, a wait for the GPU
            plan = plan_batch(attention_mask.cpu(), labels.cpu())
        device, loss = input_ids.device, 0.0
        if torch.is_autocast_enabled(device.type):  # one cast for every pass: each copy is held until the backward
            weight = weight.to(torch.get_autocast_dtype(device.type))
        for p in plan.passes:
            if p.rows is None:
                pass_ids, pass_mask, pass_labels = input_ids, attention_mask, labels
            else:
                rows = p.rows.to(device)
                pass_ids, pass_mask, pass_labels = (t.index_select(0, rows)[:, : p.length]
                                                    for t in (input_ids, attention_mask, labels))
            hidden = decoder(input_ids=pass_ids, attention_mask=pass_mask, **kwargs).last_hidden_state
            loss = loss + answer_token_loss(hidden, weight, pass_labels, num_items_in_batch,
                                            answers=p.answers.to(device))
        return CausalLMOutputWithPast(loss=loss)


def use_answer_token_loss(lm: torch.nn.Module) -> None:
    """Train `lm` (a causal LM: a decoder and an output projection) with answer_token_loss: its class becomes
    AnswerTokenForward over its own class (the adapter; nothing else of the instance changes)."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        raise ConfigError(
            f"--loss answer-chunks computes the logits as the decoder's output projection alone, which is what "
            f"{', '.join(PLAIN_HEAD_MODEL_TYPES)} models do; this model is {model_type or type(lm).__name__}: "
            "run it with --loss full-logits")
    if not isinstance(lm, AnswerTokenForward):
        lm.__class__ = _with_answer_token_forward(type(lm))


@functools.cache
def _with_answer_token_forward(cls: type) -> type:
    # The model's own class name: save_pretrained writes it into config.json's "architectures".
    return type(cls.__name__, (AnswerTokenForward, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
