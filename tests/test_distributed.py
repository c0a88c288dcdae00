"""torchrun with two CPU processes (gloo): one run directory, written once, and the same accuracy as one process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # torchrun launches: in CI (.ci/run), not in the README's default set

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize("script", ["baseline.py", "modified.py"])
def test_torchrun_two_processes_end_to_end(tmp_path, script):
    run_dir = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         script, "--smoke", "--output-dir", str(run_dir)],
        cwd=ROOT, env=ENV, check=False, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("summary (") == 1  # only rank 0 reports

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    # 64 examples, 8 per optimizer step over both ranks, 2 epochs: as many steps as one process takes.
    assert metrics["train"]["optimizer_steps"] == 16
    predictions = [json.loads(line) for line in (run_dir / "predictions_fine_tuned.jsonl").open()]
    assert len(predictions) == 40 and len({p["id"] for p in predictions}) == 40  # none lost, none twice

    single = tmp_path / "single"
    check = subprocess.run(
        [sys.executable, script, "--smoke", "--eval-only", "--model", str(run_dir / "final_model"),
         "--output-dir", str(single)],
        cwd=ROOT, env=ENV, check=False, capture_output=True, text=True, timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    alone = json.loads((single / "metrics.json").read_text())["accuracy"]["zero_shot"]["loglik"]
    together = metrics["accuracy"]["fine_tuned"]["loglik"]
    assert together["acc_pct"] == pytest.approx(alone["acc_pct"])
    assert together["acc_norm_pct"] == pytest.approx(alone["acc_norm_pct"])


def torchrun_worker(script: str, out: Path) -> subprocess.CompletedProcess:
    """tests/<script> on two CPU processes (gloo), writing to `out`."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / script), str(out)],
        cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, check=False, capture_output=True, text=True, timeout=300,
    )


def test_evaluation_split_over_ranks_runs_level_and_scores_as_one_process(tmp_path):
    """Each rank scores every other batch of the plan one process would run: the same batches, so the same scores
    (bit for bit), and, with an odd number of batches, a filler pass keeps the ranks level (FSDP needs it)."""
    out = tmp_path / "sharded.json"
    done = torchrun_worker("sharded_eval_worker.py", out)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(out.read_text())
    batches = seen["loglik_passes_alone"]
    assert batches % 2 == 1, f"an odd batch count exercises the filler pass: {batches}"
    generate_passes = 2 * math.ceil(math.ceil(21 / 4) / 2)  # two new tokens per batch, 6 batches of at most 4
    passes = [r["forward_passes"] for r in seen["ranks"]]
    assert passes[0] == passes[1] == math.ceil(batches / 2) + generate_passes, passes
    assert seen["together"] == seen["alone"]  # ids, order, scores and predictions, exactly
    assert seen["generated_together"] == seen["generated_alone"]


def test_fsdp_sharded_model_evaluates_and_saves_a_loadable_model(tmp_path):
    """FSDP2 on two CPU processes: evaluation across ranks finishes (ranks that ran different numbers of evaluation
    passes would hang here), the full state dict gathers, and the saved model loads back and scores as the sharded
    one did."""
    from transformers import AutoModelForCausalLM

    from common.data import load_split
    from common.evaluation import evaluate
    from common.models import load_tokenizer

    out = tmp_path / "fsdp_model"
    done = torchrun_worker("fsdp_worker.py", out)
    assert done.returncode == 0, done.stderr[-4000:]
    sharded = json.loads((out / "scores.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    alone = evaluate(model, load_tokenizer("smoke"), load_split("validation", None, True)[:20], batch_size=4)
    assert [r["id"] for r in alone.predictions] == sharded["ids"]
    flat = [score for pair in sharded["scores"] for score in pair]
    assert flat == pytest.approx([score for r in alone.predictions for score in r["logprob_sum"]], abs=1e-3)
