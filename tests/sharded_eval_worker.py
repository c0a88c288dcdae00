"""Run by torchrun from test_distributed.py: evaluation split over two ranks runs level and scores as one process.

A tiny logits budget makes the batch plan uneven (an odd number of batches, of several sizes); each rank counts its
forward passes. Rank 0 writes what both saw, and a single-process evaluation, as JSON to argv[1].
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from common import evaluation
from common.data import load_split
from common.distributed import evaluate_on_all_ranks, init, rank
from common.evaluation import evaluate
from common.models import load_model, load_tokenizer


def main(out_path: str) -> None:
    init()
    tokenizer = load_tokenizer("smoke")
    model = load_model("smoke", tokenizer)
    examples = load_split("validation", None, True)[:21]
    vocab = model.get_output_embeddings().weight.shape[0]
    evaluation.LOGITS_BUDGET_BYTES = 2 * 4 * vocab * 200  # (examples + 1) x longest continuation <= 200 per batch
    calls = {"forward": 0}
    model.register_forward_hook(lambda *args: calls.__setitem__("forward", calls["forward"] + 1))

    together = evaluate_on_all_ranks(model, tokenizer, examples, method="loglik", batch_size=4)
    generated = evaluate_on_all_ranks(model, tokenizer, examples, method="generate", batch_size=4, max_new_tokens=2)
    seen: list = [None, None]
    dist.all_gather_object(seen, {"forward_passes": calls["forward"]})
    if rank() == 0:
        calls["forward"] = 0
        alone = evaluate(model, tokenizer, examples, method="loglik", batch_size=4)
        alone_passes = calls["forward"]
        alone_generated = evaluate(model, tokenizer, examples, method="generate", batch_size=4, max_new_tokens=2)
        Path(out_path).write_text(json.dumps({
            "ranks": seen,
            "loglik_passes_alone": alone_passes,
            "together": together.predictions,
            "alone": alone.predictions,
            "generated_together": generated.predictions,
            "generated_alone": alone_generated.predictions,
        }))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
