"""PIQA accuracy: log-likelihood multiple choice (lm-evaluation-harness's `piqa` task) and structured-prompt generation.

Both methods are batched, length-sorted, run under `torch.inference_mode()`, never skip an example, and never hold
more than one batch's logits. See docs/evaluation.md for the definitions and how they match the harness.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import batching
from common.data import PiqaExample
from common.prompts import encode_pairs, format_choice_prompt, format_context, format_continuation

METHODS = ("loglik", "generate")
DEFAULT_BATCH_SIZE = 64  # examples per forward pass; the loglik method runs 2 sequences per example
DEFAULT_MAX_NEW_TOKENS = 4  # after "Answer: Solution" a BPE model typically emits " ", "1", "." (3 tokens)
LOG_SOFTMAX_CHUNK_BYTES = 1 << 30  # bound on the float32 log-softmax buffer per chunk of rows
LOGITS_BUDGET_BYTES = 4 << 30  # bound on one batch's [rows x kept positions x vocabulary] logits, counted as float32


@dataclass
class EvalResult:
    method: str  # "loglik" or "generate"
    n_examples: int
    acc_pct: float  # loglik: argmax of summed log-probs; generate: parsed answer == label (unparseable is wrong)
    acc_norm_pct: float | None  # loglik only: argmax of summed log-prob / len(solution) in characters
    parse_failure_pct: float | None  # generate only: share of answers that were neither 1 nor 2
    seconds: float  # wall time of the whole evaluation, tokenisation included
    predictions: list[dict]  # one record per example, in input order

    def metrics(self, prefix: str = "") -> dict[str, float | int]:
        """Flat metrics for logging; accuracies in percent. Keys not defined for the method are left out."""
        values: dict[str, float | int] = {"acc_pct": self.acc_pct}
        if self.acc_norm_pct is not None:
            values["acc_norm_pct"] = self.acc_norm_pct
        if self.parse_failure_pct is not None:
            values["parse_failure_pct"] = self.parse_failure_pct
        values["n_examples"] = self.n_examples
        values["eval_seconds"] = self.seconds
        return {f"{prefix}{key}": value for key, value in values.items()}


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[PiqaExample],
    method: str = "loglik",
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    shard: tuple[int, int] | None = None,
    logits_bytes: int | None = None,
) -> EvalResult:
    """Accuracy of `model` on `examples` with one method; the model's train/eval mode is restored afterwards.

    `shard=(rank, ranks)`: score only this rank's share of the batches one process would run (every `ranks`-th,
    from `rank`), so each example meets exactly the batch and padding of a single-process evaluation; the result
    holds this rank's examples only. Every rank runs the same number of forward passes (a filler pass where it has
    a batch fewer; generation goes on until every rank is done): an FSDP model all-gathers its parameters in each.

    `model` may be wrapped (DDP, torch.compile) and on any device: inputs go to its input embeddings' device.
    `autocast_dtype` (torch.bfloat16 / torch.float16) runs the forward passes under autocast, for a model the
    Trainer keeps in float32; None runs it in its own dtype. The tokenizer's padding side is never used or changed.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not examples:
        raise ValueError("no examples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    start = time.perf_counter()
    model = batching.unwrap_model(model)
    was_training = model.training
    model.eval()
    try:
        if method == "loglik":
            result = _evaluate_loglik(model, tokenizer, examples, batch_size, autocast_dtype, progress, shard,
                                      logits_bytes)
        else:
            result = _evaluate_generate(
                model, tokenizer, examples, batch_size, autocast_dtype, progress, max_new_tokens, shard
            )
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def write_predictions(path: Path, result: EvalResult) -> None:
    """One JSON record a line, in the order the examples were given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in result.predictions:
            f.write(json.dumps({"method": result.method, **record}, ensure_ascii=False) + "\n")


# --- log-likelihood multiple choice -----------------------------------------------------------------------------


def score_loglik(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[PiqaExample],
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    logits_bytes: int | None = None,
) -> list[tuple[float, float] | None]:
    """Summed log-probability of ` {sol1}` and ` {sol2}` given `Question: {goal}\\nAnswer:`, per example
    (None for the examples in other ranks' batches, with `shard`: see `evaluate`).

    The model must already be in eval mode (`evaluate` sees to that). Both choices of an example share a batch.
    """
    model = batching.unwrap_model(model)
    device = batching.model_device(model)
    max_length = batching.max_length(model)
    pairs = encode_pairs(
        tokenizer,
        [(format_context(e.goal), format_continuation(sol)) for e in examples for sol in (e.sol1, e.sol2)],
    )
    sequences: list[tuple[list[int], list[int]]] = []  # (input ids, continuation ids) per choice
    for index, (context_ids, continuation_ids) in enumerate(pairs):
        if not continuation_ids:
            raise ValueError(f"example {examples[index // 2].id}: solution {index % 2 + 1} encodes to no tokens")
        if len(continuation_ids) > max_length:
            raise ValueError(f"example {examples[index // 2].id}: a solution is longer than {max_length} tokens")
        # The harness's input: the last max_length+1 tokens of context+continuation, minus the final token.
        input_ids = (context_ids + continuation_ids)[-(max_length + 1) :][:-1]
        sequences.append((input_ids, continuation_ids))

    # Longest first, as in the harness: an out-of-memory error shows in the first batch, not the last.
    order = sorted(range(len(examples)), key=lambda i: -max(len(sequences[2 * i][0]), len(sequences[2 * i + 1][0])))
    # A PEFT wrapper's forward takes **kwargs and passes them on; ask the model inside it.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # The class's forward (the answer-token loss's adapter, common/engine/loss.py, takes it and passes it on).
    takes_logits_to_keep = "logits_to_keep" in inspect.signature(type(inner).forward).parameters
    vocab_size = inner.get_output_embeddings().weight.shape[0]
    logits_bytes = LOGITS_BUDGET_BYTES if logits_bytes is None else logits_bytes  # None: the module's bound
    batches, fillers = _share(_batches_within_budget(order, sequences, batch_size, vocab_size, logits_bytes),
                              shard)
    scores: list[float | None] = [None] * len(sequences)
    with torch.inference_mode(), batching.autocast(device, autocast_dtype):
        for batch in batching.progress_bar(batches, progress, "loglik"):
            rows = [2 * i + choice for i in batch for choice in (0, 1)]
            batch_scores = _score_batch(
                model, [sequences[r] for r in rows], device, batching.pad_id(tokenizer), takes_logits_to_keep,
                logits_bytes
            )
            for row, score in zip(rows, batch_scores):
                scores[row] = score
        for _ in range(fillers):  # scored and dropped: only the other ranks need this forward pass
            _score_batch(model, sequences[:1], device, batching.pad_id(tokenizer), takes_logits_to_keep)
    return [None if scores[2 * i] is None else (scores[2 * i], scores[2 * i + 1]) for i in range(len(examples))]


def _share(batches: list[list[int]], shard: tuple[int, int] | None) -> tuple[list[list[int]], int]:
    """This rank's batches (all of them without `shard`), and how many filler passes keep it level with the rank
    that has the most."""
    if shard is None:
        return batches, 0
    rank, ranks = shard
    if not 0 <= rank < ranks:
        raise ValueError(f"shard must be (rank, ranks) with 0 <= rank < ranks, got {shard}")
    mine = batches[rank::ranks]
    return mine, math.ceil(len(batches) / ranks) - len(mine)


def _batches_within_budget(
    order: list[int], sequences: list[tuple[list[int], list[int]]], batch_size: int, vocab_size: int, budget_bytes: int
) -> list[list[int]]:
    """At most `batch_size` examples a batch, fewer where long solutions would make the logits exceed the budget."""
    batches: list[list[int]] = []
    batch: list[int] = []
    keep = 0
    for i in order:
        example_keep = max(len(sequences[2 * i][1]), len(sequences[2 * i + 1][1]))
        grown_keep = max(keep, example_keep)
        if batch and (len(batch) == batch_size or 2 * (len(batch) + 1) * grown_keep * vocab_size * 4 > budget_bytes):
            batches.append(batch)
            batch, grown_keep = [], example_keep
        batch.append(i)
        keep = grown_keep
    if batch:
        batches.append(batch)
    return batches


def _score_batch(
    model: torch.nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    device: torch.device,
    pad_id: int,
    takes_logits_to_keep: bool,
    logits_bytes: int | None = None,
) -> list[float]:
    """Summed continuation log-probs of left-padded sequences; logits only for the last `keep` positions."""
    input_ids, attention_mask = batching.left_pad([ids for ids, _ in sequences], pad_id, device)
    # Left padding ends every row with its continuation, so one `logits_to_keep` covers the whole batch.
    keep = max(len(cont) for _, cont in sequences)
    targets = torch.zeros(len(sequences), keep, dtype=torch.long)
    target_mask = torch.zeros(len(sequences), keep, dtype=torch.bool)
    for row, (_, cont) in enumerate(sequences):
        targets[row, keep - len(cont) :] = torch.tensor(cont, dtype=torch.long)
        target_mask[row, keep - len(cont) :] = True
    targets, target_mask = targets.to(device), target_mask.to(device)

    extra = {"logits_to_keep": keep} if takes_logits_to_keep else {}
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=batching.position_ids(attention_mask),
        use_cache=False,
        **extra,
    ).logits[:, -keep:, :]

    # log_softmax in float32 on a few rows at a time: the [rows x keep x vocab] float32 buffer stays bounded.
    logits_bytes = LOGITS_BUDGET_BYTES if logits_bytes is None else logits_bytes
    chunk_bytes = min(LOG_SOFTMAX_CHUNK_BYTES, logits_bytes // 4)  # a quarter of the logits' bound, on small cards
    rows_per_chunk = max(1, chunk_bytes // (keep * logits.shape[-1] * 4))
    token_logprobs = torch.empty(targets.shape, dtype=torch.float32, device=device)
    for start in range(0, len(sequences), rows_per_chunk):
        chunk = slice(start, start + rows_per_chunk)
        logprobs = F.log_softmax(logits[chunk], dim=-1, dtype=torch.float32)
        token_logprobs[chunk] = logprobs.gather(-1, targets[chunk].unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * target_mask).sum(dim=-1).tolist()


def _evaluate_loglik(model, tokenizer, examples, batch_size, autocast_dtype, progress, shard,
                     logits_bytes: int | None = None) -> EvalResult:
    scores = score_loglik(model, tokenizer, examples, batch_size, autocast_dtype, progress, shard, logits_bytes)
    records = []
    for example, pair in zip(examples, scores):
        if pair is None:  # in another rank's batches
            continue
        score1, score2 = pair
        # The harness divides by len(choice), the solution without the leading space; np.argmax keeps the first of ties.
        per_char = (_per_char(score1, example.sol1), _per_char(score2, example.sol2))
        prediction = 0 if score1 >= score2 else 1
        prediction_norm = 0 if per_char[0] >= per_char[1] else 1
        records.append(
            {
                "id": example.id,
                "label": example.label,
                "prediction": prediction,
                "prediction_norm": prediction_norm,
                "logprob_sum": [score1, score2],
                "logprob_per_char": list(per_char),
            }
        )
    return summarise("loglik", records)


def _per_char(logprob_sum: float, solution: str) -> float:
    return logprob_sum / len(solution) if solution else -math.inf


# --- structured-prompt generation -------------------------------------------------------------------------------

_CHOICE_PATTERN = re.compile(r"^\s*(?:solution)?\s*:?\s*([12])(?![^\W_])", re.IGNORECASE)  # no letter or digit next, any script


def parse_choice(text: str) -> int | None:
    """The answer after `Answer: Solution` in label space: "1" -> 0, "2" -> 1, anything else -> None.

    Accepts "1", " 2", "2.", "Solution 2", "2 because ..."; rejects "12", "2nd", "", and text without a leading choice.
    """
    match = _CHOICE_PATTERN.match(text)
    return None if match is None else int(match.group(1)) - 1


def generate_choices(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[PiqaExample],
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    shard: tuple[int, int] | None = None,
) -> list[str | None]:
    """Greedy continuation (up to `max_new_tokens`) of each example's `format_choice_prompt`, decoded, in input order
    (None for the examples in other ranks' batches, with `shard`: see `evaluate`)."""
    model = batching.unwrap_model(model)
    device = batching.model_device(model)
    prompts = [format_choice_prompt(e.goal, e.sol1, e.sol2) for e in examples]
    prompt_ids = tokenizer(prompts)["input_ids"]
    pad_id = batching.pad_id(tokenizer)
    config = copy.deepcopy(model.generation_config)
    config.update(
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
        max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad_id,
    )  # fmt: skip
    order = sorted(range(len(examples)), key=lambda i: -len(prompt_ids[i]))
    batches, fillers = _share(list(batching.chunks(order, batch_size)), shard)
    synced = shard is not None and dist.is_initialized()  # every rank generates until the last one is done

    def new_tokens(batch: list[int]) -> list[list[int]]:
        input_ids, attention_mask = batching.left_pad([prompt_ids[i] for i in batch], pad_id, device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                synced_gpus=synced)
        return output[:, input_ids.shape[1] :].tolist()

    texts: list[str | None] = [None] * len(examples)
    with torch.inference_mode(), batching.autocast(device, autocast_dtype):
        for batch in batching.progress_bar(batches, progress, "generate"):
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens(batch), skip_special_tokens=True)):
                texts[i] = text
        for _ in range(fillers):  # generated and dropped: only the other ranks need these passes
            new_tokens(order[:1])
    return texts


def _evaluate_generate(
    model, tokenizer, examples, batch_size, autocast_dtype, progress, max_new_tokens, shard
) -> EvalResult:
    texts = generate_choices(model, tokenizer, examples, batch_size, autocast_dtype, progress, max_new_tokens, shard)
    records = [
        {"id": e.id, "label": e.label, "prediction": parse_choice(text), "generated_text": text}
        for e, text in zip(examples, texts)
        if text is not None  # None: in another rank's batches
    ]
    return summarise("generate", records)


def summarise(method: str, records: list[dict], seconds: float = 0.0) -> EvalResult:
    """Accuracy from per-example records (also used to merge the shards that several ranks scored)."""
    n = len(records)
    return EvalResult(
        method=method,
        n_examples=n,
        acc_pct=_pct(sum(r["prediction"] == r["label"] for r in records), n),
        acc_norm_pct=_pct(sum(r["prediction_norm"] == r["label"] for r in records), n) if method == "loglik" else None,
        parse_failure_pct=_pct(sum(r["prediction"] is None for r in records), n) if method == "generate" else None,
        seconds=seconds,
        predictions=records,
    )


def _pct(count: int, total: int) -> float:
    # No examples happens on a rank whose share of a small set is empty; only the merged result is reported.
    return 100.0 * count / total if total else math.nan
