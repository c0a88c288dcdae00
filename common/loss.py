"""The training loss with the LM head's logits computed at the answer tokens only.

The loss is the mean cross-entropy over the answer tokens (the context's and padding's labels are IGNORE_INDEX),
exactly as the model's own forward computes it; only the work differs. The model's forward projects every position
onto the 128k-token vocabulary and keeps those logits (float32 for the loss) until the backward pass: about 1.5 MB
a token, tens of GiB for a long batch, and a third of them at positions without a loss. Here the decoder's output
is gathered at the answer positions and projected a chunk of rows at a time; each chunk's logits are recomputed in
the backward pass (activation checkpointing on the head alone), so at most one chunk's logits exist at once.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from common.config import ConfigError
from common.data import IGNORE_INDEX

CHUNK_LOGITS_BYTES = 1 << 30  # bound on one chunk's float32 logits [rows x vocabulary]
# Model types whose logits are the output projection of the decoder's last hidden state and nothing more (Gemma
# soft-caps its logits, Cohere and Granite scale them: their loss is not this one).
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def answer_token_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_bytes: int = CHUNK_LOGITS_BYTES,
) -> torch.Tensor:
    """Cross-entropy of next-token prediction at the positions whose next label is not IGNORE_INDEX.

    hidden: [batch, positions, hidden] decoder output; head_weight: [vocabulary, hidden]; labels: [batch, positions].
    Summed, then divided by `num_items_in_batch` (the answer tokens of the whole optimizer step, as the Trainer
    passes it) or, without it, by this batch's answer tokens: transformers' ForCausalLMLoss, term for term.
    """
    targets = labels[:, 1:].reshape(-1)
    answers = targets.ne(IGNORE_INDEX).nonzero().squeeze(1)  # the one wait for the GPU: how many answer tokens
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, answers)  # [answer tokens, hidden]
    targets = targets.index_select(0, answers)
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


def use_answer_token_loss(model: torch.nn.Module) -> None:
    """Train `model` (a causal LM: a decoder and an output projection) with answer_token_loss: its forward is
    rebound, on this instance only, so that a call with labels returns the loss without logits. Calls without
    labels (evaluation, generation) go to the model's own forward."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        raise ConfigError(
            f"--loss answer-chunks computes the logits as the decoder's output projection alone, which is what "
            f"{', '.join(PLAIN_HEAD_MODEL_TYPES)} models do; this model is {model_type or type(model).__name__}: "
            "run it with --loss full-logits")
    model.forward = MethodType(_answer_token_forward, model)


def _answer_token_forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None,
                          **kwargs) -> CausalLMOutputWithPast:
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    kwargs.setdefault("use_cache", False)
    hidden = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    weight = self.get_output_embeddings().weight
    return CausalLMOutputWithPast(loss=answer_token_loss(hidden, weight, labels, num_items_in_batch))
