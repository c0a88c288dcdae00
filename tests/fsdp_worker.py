"""Run by torchrun from test_distributed.py: the model sharded with FSDP2 (fully_shard, as accelerate's FSDP2 does,
on two CPU processes with gloo), evaluated across ranks, then its full state dict gathered and saved by rank 0.

Every forward pass of a sharded model is a collective, so the ranks must run equal numbers of them; a small logits
budget splits the evaluation into many batches of uneven sizes. Rank 0 saves the model for the test to load back.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from common import evaluation
from common.data import load_split
from common.distributed import evaluate_on_all_ranks, rank
from common.models import load_model, load_tokenizer


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    tokenizer = load_tokenizer("smoke")
    model = load_model("smoke", tokenizer)
    for layer in model.model.layers:  # the Llama decoder layer as wrap unit, as common/fsdp.yaml asks
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    evaluation.LOGITS_BUDGET_BYTES = 2 * 4 * model.config.vocab_size * 200  # many small batches

    examples = load_split("validation", None, True)[:20]
    result = evaluate_on_all_ranks(model, tokenizer, examples, method="loglik", batch_size=4)
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        fresh = load_model("smoke", tokenizer)
        fresh.load_state_dict(state_dict)
        fresh.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        (Path(out_dir) / "scores.json").write_text(json.dumps(
            {"ids": [r["id"] for r in result.predictions], "scores": [r["logprob_sum"] for r in result.predictions]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
