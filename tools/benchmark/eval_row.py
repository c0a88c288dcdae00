"""Evaluation speed: common.evaluation's log-likelihood scoring of synthetic PIQA-length examples, timed per weight
dtype, batch size and attention kernel; the 'evaluation' row."""

from __future__ import annotations

import contextlib
from typing import Any

from tools.benchmark.timing import peak_memory_gib, synchronize
from tools.benchmark.workload import synthetic_examples, word_tokenizer


def run_eval(model_name: str, examples_count: int, batch_sizes: list[int], seed: int,
             lengths: dict[str, Any]) -> dict[str, Any]:
    """Every batch size with bf16 weights and cuDNN attention, then the first one with cuDNN attention off and
    with fp32 weights; bf16 autocast throughout."""
    import torch

    from common.models import load_model, load_tokenizer

    on_cuda = torch.cuda.is_available()
    with torch.device("cuda") if on_cuda else contextlib.nullcontext():
        model = load_model(model_name, load_tokenizer(model_name))
    words = min(4000, model.config.vocab_size - 6)
    tokenizer = word_tokenizer(words)
    examples = synthetic_examples(examples_count, lengths, seed, words)
    runs = [("bf16 weights", torch.bfloat16, size, True) for size in batch_sizes]
    runs += [("bf16 weights", torch.bfloat16, batch_sizes[0], False),
             ("fp32 weights", torch.float32, batch_sizes[0], True)]
    results = [time_evaluation(model, tokenizer, examples, *run) for run in runs]
    sequence_tokens = sum(
        2 * (len(tokenizer(f"Question: {e.goal}\nAnswer:")["input_ids"])) + len(e.sol1.split()) + len(e.sol2.split())
        for e in examples
    )
    return {"name": "evaluation", "method": "loglik", "examples": examples_count, "tokens": sequence_tokens,
            "device": torch.cuda.get_device_name() if on_cuda else "cpu", "runs": results}


def time_evaluation(model, tokenizer, examples: list, dtype_name: str, dtype, batch_size: int,
                    cudnn: bool) -> dict[str, Any]:
    """One timed evaluation of every example after a warm-up on two batches; prints one line."""
    import torch

    from common.evaluation import evaluate

    on_cuda = torch.cuda.is_available()
    model.to(dtype)
    if on_cuda:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    evaluate(model, tokenizer, examples[: 2 * batch_size], "loglik", batch_size, torch.bfloat16)  # warm-up
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    result = evaluate(model, tokenizer, examples, "loglik", batch_size, torch.bfloat16)
    synchronize()
    print(f"  evaluation: {len(examples)} examples, {dtype_name}, bf16 autocast, batch {batch_size}, "
          f"cuDNN attention {'on' if cudnn else 'off'}: {result.seconds:.2f} s", flush=True)
    return {
        "weights": dtype_name,
        "autocast": "bf16",
        "batch_size": batch_size,
        "cudnn_attention": cudnn,
        "seconds": result.seconds,
        "examples": result.n_examples,
        "peak_allocated_gib": peak_memory_gib()[0],
    }
