"""Run by torchrun from test_distributed.py: evaluation on two ranks stays in lock-step and equals one process.

A tiny logits budget makes the length-dependent batching differ between the ranks' shards; each rank records
how many forward passes it ran. Rank 0 writes what both saw as JSON to argv[1].
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
    examples = load_split("validation", None, True)[:20]  # two shards of 10
    vocab = model.get_output_embeddings().weight.shape[0]
    evaluation.LOGITS_BUDGET_BYTES = 2 * 4 * vocab * 200  # (examples + 1) x longest continuation <= 200: 5 vs 7 batches
    calls = {"forward": 0}
    model.register_forward_hook(lambda *args: calls.__setitem__("forward", calls["forward"] + 1))

    together = evaluate_on_all_ranks(model, tokenizer, examples, method="loglik", batch_size=4)
    in_lockstep = calls["forward"]
    calls["forward"] = 0
    evaluate(model, tokenizer, examples[rank()::2], method="loglik", batch_size=4)  # this rank's shard alone
    seen: list = [None, None]
    dist.all_gather_object(seen, {"forward_passes": in_lockstep, "forward_passes_alone": calls["forward"]})
    if rank() == 0:
        alone = evaluate(model, tokenizer, examples, method="loglik", batch_size=4)
        Path(out_path).write_text(json.dumps({
            "ranks": seen,
            "together": [r["logprob_sum"] for r in together.predictions],
            "alone": [r["logprob_sum"] for r in alone.predictions],
            "ids_together": [r["id"] for r in together.predictions],
            "ids_alone": [r["id"] for r in alone.predictions],
        }))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
