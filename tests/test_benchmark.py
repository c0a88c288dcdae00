"""tools.benchmark on the CPU: a tiny model for 2 timed steps through the real code path, and its building blocks."""

import dataclasses
import functools
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.data import IGNORE_INDEX
from tools.benchmark import workload
from tools.benchmark.configurations import TRAINER_DEFAULTS, configurations

ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = {
    "name", "profile", "batch_size", "micro_batch_size", "gradient_accumulation_steps", "timed_steps",
    "step_ms_median", "tokens_per_s", "padding_share_pct", "mfu_pct", "flops_per_token", "peak_allocated_gib",
    "peak_reserved_gib", "epoch_s", "nonpad_tokens_per_step_mean", "trainer_counted_nonpad_tokens", "final_loss",
    "engine_path",
}


def run_tiny_benchmark(out: Path, *options: str, timeout_s: int = 120) -> subprocess.CompletedProcess:
    """The benchmark on the smoke model: 1 warm-up and 2 timed steps of 8 examples, rows to `out`."""
    return subprocess.run(
        [sys.executable, "-m", "tools.benchmark", "--model", "smoke", "--steps", "2", "--warmup-steps", "1",
         "--batch-size", "8", "--dataset-size", "64", "--json-out", str(out), *options],
        cwd=ROOT, check=False, capture_output=True, text=True, timeout=timeout_s,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow  # starts a process of its own (seconds)
@pytest.mark.skipif(torch.cuda.is_available(), reason="its row's torch memory peaks are None without CUDA")
def test_benchmark_runs_a_tiny_model_and_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    done = run_tiny_benchmark(out, "--configs", "modified,evaluation", "--eval-examples", "12",
                              "--eval-batch-sizes", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"gpu", "versions"} <= set(report["environment"])
    rows = {r["name"]: r for r in report["rows"]}
    row = rows["modified"]
    assert "error" not in row, row.get("error")
    assert ROW_FIELDS <= set(row)
    assert row["timed_steps"] == row["planned_timed_steps"] == 2 and row["batch_size"] == 8
    assert row["micro_batch_size"] * row["gradient_accumulation_steps"] == 8
    assert row["tokens_per_s"] > 0 and row["step_ms_median"] > 0 and 0 <= row["padding_share_pct"] < 100
    # The Trainer's own count of non-padding tokens agrees with the counting collator's.
    assert row["trainer_counted_nonpad_tokens"] == round(row["nonpad_tokens_per_step_mean"] * row["timed_steps"])
    assert row["peak_reserved_gib"] is None  # no CUDA here
    assert row["profile"]["name"] == "modified"
    evaluation = rows["evaluation"]
    assert evaluation["examples"] == 12 and all(run["seconds"] > 0 for run in evaluation["runs"])
    assert all(isinstance(run["cudnn_attention"], bool) for run in evaluation["runs"])  # the engine's name for it
    assert "| modified |" in done.stdout


@pytest.mark.slow  # starts a process of its own (seconds)
def test_plain_loop_row_trains_the_same_batches_as_its_trainer_twin(tmp_path):
    """The reference row: modified's workload in a plain PyTorch loop, beside the Trainer's, in one call."""
    out = tmp_path / "rows.json"
    done = run_tiny_benchmark(out, "--configs", "modified,plain-loop/modified", "--eval-examples", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    trainer, plain = rows["modified"], rows["plain-loop/modified"]
    assert "error" not in trainer and "error" not in plain, (trainer.get("error"), plain.get("error"))
    assert (trainer["engine_path"], plain["engine_path"]) == ("HF Trainer", "plain loop")
    assert ROW_FIELDS <= set(plain) and plain["trainer_twin"] == "modified"
    # The same batches: the same micro-batches, order and padding, step by step.
    assert plain["timed_steps"] == trainer["timed_steps"] == 2
    assert plain["nonpad_tokens_per_step"] == trainer["nonpad_tokens_per_step"]
    assert plain["nonpad_tokens_per_step_mean"] == trainer["nonpad_tokens_per_step_mean"]
    assert plain["padding_share_pct"] == trainer["padding_share_pct"] and plain["tokens_per_s"] > 0
    assert plain["applied"]["autocast"] == "bfloat16" and plain["applied"]["optimizer_fused"]  # CPU: bf16 autocast
    assert plain["final_loss"] == pytest.approx(trainer["final_loss"], rel=1e-6)  # the weights: the test below
    assert "Trainer / plain loop, modified: " in done.stdout and "(the target: at least 0.95x)" in done.stdout
    assert "| plain-loop/modified |" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="measured on a CPU: the Trainer and the loop on one device")
@pytest.mark.parametrize("accumulation", [1, 4])
def test_the_plain_loop_trains_the_weights_its_trainer_twin_trains(accumulation, monkeypatch):
    """modified's workload (bf16 autocast, answer-token loss, activation budget) for 3 optimizer steps at a learning
    rate that moves every weight, by the Trainer and by the plain loop: the same weights and losses. A loop that
    skipped the optimizer, the clipping or a micro-batch would be off by about a step's learning rate."""
    from common.config import ExperimentArguments
    from tools.benchmark import plain_loop, train_row
    from tools.benchmark.timing import make_step_timer

    learning_rate, steps, seed = 1e-3, 3, 0
    monkeypatch.setattr(train_row, "ExperimentArguments",
                        functools.partial(ExperimentArguments, learning_rate=learning_rate, warmup_ratio=0.0))
    config = next(c for c in configurations(8) if c.name == "modified")
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine,
                                                                    gradient_accumulation_steps=accumulation))
    twin = train_row.set_up(config, "smoke", steps, 32, seed, workload.load_lengths(), callbacks=[])
    initial = {name: p.detach().clone() for name, p in twin.model.named_parameters()}
    trainer_loss = twin.trainer.train().training_loss
    bench = plain_loop.set_up(config, "smoke", steps, 32, seed, workload.load_lengths())
    plain_loss = plain_loop.train(bench, config, steps, make_step_timer(0, steps, math.inf), seed)
    assert plain_loss == pytest.approx(trainer_loss, rel=1e-6)
    plain = dict(bench.model.named_parameters())
    for name, weight in twin.model.named_parameters():
        assert (weight - initial[name]).abs().max() > learning_rate, name  # Adam's steps moved it
        torch.testing.assert_close(plain[name], weight, rtol=0, atol=learning_rate / 100,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_plain_loop_configurations_are_the_scripts_last_and_on_one_gpu_only():
    every = configurations()
    plain = [c for c in every if c.engine_path == "plain loop"]
    assert [c.name for c in every[-2:]] == [c.name for c in plain] == ["plain-loop/baseline", "plain-loop/modified"]
    by_name = {c.name: c for c in every}
    for c in plain:
        twin = by_name[c.twin]
        assert c.group == "reference" and twin.engine_path == "HF Trainer"
        assert (c.profile, c.engine, c.batch_size) == (twin.profile, twin.engine, twin.batch_size)
    assert not [c for c in configurations(8, world_size=2) if c.engine_path == "plain loop"]


@pytest.mark.slow  # a torchrun / accelerate launch
def test_benchmark_runs_a_configuration_data_parallel_on_two_processes(tmp_path):
    """--nproc 2: torchrun, two ranks (gloo on CPU), the batch split between them, tokens of both counted."""
    out = tmp_path / "rows.json"
    ddp_only = [c for c in configurations(8, world_size=2) if c.name not in
                {c.name for c in configurations(8)}]
    assert {c.name.removeprefix("modified")[1:].rstrip("0123456789") for c in ddp_only} == {"bucket", "static-graph", "bf16-allreduce"}
    probe = next(c for c in ddp_only if "static-graph" in c.name)  # the bf16 all-reduce needs NCCL
    done = run_tiny_benchmark(out, "--configs", "modified", "--nproc", "2", "--profile", probe.name, timeout_s=240)
    assert done.returncode == 0, done.stderr[-3000:]
    row, profiled = json.loads(out.read_text())["rows"]
    assert "error" not in row and "error" not in profiled, (row.get("error"), profiled.get("error"))
    assert profiled["name"] == probe.name + "[profiled]" and profiled["world_size"] == 2
    assert profiled["training_arguments"]["ddp_static_graph"] == probe.engine.ddp_static_graph
    assert row["training_arguments"]["ddp_static_graph"] != probe.engine.ddp_static_graph
    assert row["applied"]["ddp_comm_hooks"] == []
    assert profiled["profile_summary"]["nccl_kernels_ms_per_step"] == 0  # gloo on CPU: no NCCL kernels
    assert (row["world_size"], row["parallelism"], row["micro_batch_size"]) == (2, "DDP", 4)  # 8 = 2 ranks x 4
    assert row["tokens_per_s_per_gpu"] == row["tokens_per_s"] / 2
    # Both ranks' tokens: the Trainer's count (gathered over ranks) equals the sum of both collators'.
    assert row["trainer_counted_nonpad_tokens"] == round(row["nonpad_tokens_per_step_mean"] * row["timed_steps"])
    assert row["timed_steps"] == 2
    assert "(DDP, 2 GPUs:" in done.stdout


@pytest.mark.slow  # starts a process of its own (seconds)
def test_options_and_the_model_are_checked_up_front():
    """Before any configuration runs: a mistyped model fails once, not once per row."""
    for extra, message in ((["--nproc", "0"], "at least 1"), (["--nproc", "2", "--no-fork"], "--no-fork"),
                           (["--warmup-steps", "0"], "--warmup-steps must be at least 1"),
                           (["--model", "llama-3.2-1b-randm"], "--model llama-3.2-1b-randm: not in the local cache")):
        done = subprocess.run([sys.executable, "-m", "tools.benchmark", "--configs", "modified", *extra],
                              cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr


def test_each_timed_step_gets_its_own_micro_batches_when_an_epoch_ends_in_a_short_step():
    """Accumulation 4 over 6 micro-batches an epoch: steps of 4, 2 (the epoch's rest), 4, ... The timer counts the
    Trainer's micro-batches per step, so a short step does not shift the tokens of every step after it."""
    from types import SimpleNamespace

    from tools.benchmark.timing import CountingCollator, make_step_timer, measure

    timer, state, control = make_step_timer(1, 3, math.inf), SimpleNamespace(num_input_tokens_seen=0), None
    collator = CountingCollator(inner=None)
    timer.on_train_begin(None, state, control)
    for micro_batches in ([1, 2, 3, 4], [5, 6], [7, 8, 9, 10], [11, 12]):  # a micro-batch of k real tokens: k
        timer.on_step_begin(None, state, control)
        for k in micro_batches:
            collator.batches.append((k, 10 * k, k))
        state.num_input_tokens_seen += sum(micro_batches)
        for _ in micro_batches[1:]:
            timer.on_substep_end(None, state, control)
        timer.on_step_end(None, state, control)
    measured = measure(timer, collator, warmup_steps=1, ranks=1)
    assert measured.real == [5 + 6, 7 + 8 + 9 + 10, 11 + 12]
    assert measured.trainer_counted == sum(measured.real)
    assert [b[0] for b in measured.micro_batches] == list(range(5, 13))


def test_a_mega_batch_of_length_grouped_steps_counts_the_sampler_batch_of_one_rank():
    """The Trainer's LengthGroupedSampler groups batches of one rank's examples (128 / 2 under two GPUs) fifty at a
    time, and each optimizer step takes one such batch per rank: 50 x 64 examples are 25 steps, not 31."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from tools.benchmark.timing import mega_batch_steps

    assert mega_batch_steps(16_000, 128) == 31 and mega_batch_steps(16_000, 128, ranks=2) == 25
    # The sampler's own mega-batch: the first lengths a sorted run holds, for 64 examples a batch.
    lengths = list(range(16_000))
    indices = get_length_grouped_indices(lengths, 64, generator=torch.Generator().manual_seed(0))
    rises = [i for i in range(1, len(indices)) if lengths[indices[i]] > lengths[indices[i - 1]]]
    assert rises[0] == 50 * 64 == mega_batch_steps(16_000, 128, ranks=2) * 128


def test_a_row_cut_short_by_the_time_limit_says_so_in_the_table():
    """A length-grouped epoch starts with its longest batches: a row timed on its first steps only is not comparable
    with one timed over a whole mega-batch, and the table says which rows those are."""
    from tools.benchmark.tables import format_table

    row = {"name": "modified", "micro_batch_size": 128, "gradient_accumulation_steps": 1, "tokens_per_s": 30_000.0,
           "tokens_per_s_median_step": 31_000.0, "padding_share_pct": 1.0, "mfu_pct": 30.0, "step_ms_median": 150.0,
           "peak_allocated_gib": None, "peak_reserved_gib": None, "epoch_s": 60.0, "timed_steps": 31,
           "planned_timed_steps": 31}
    assert "| modified |" in format_table([row])
    assert "| modified (timed 5 of 31 steps: --max-measure-s) |" in format_table([{**row, "timed_steps": 5}])


def test_the_grid_adds_one_engine_setting_per_row_for_both_profiles():
    from common import profiles
    from common.config import EngineArguments

    configs = {c.name: c for c in configurations()}
    seed = configs["seed-original"]
    assert (seed.batch_size, seed.micro_batch_size, seed.engine.pad_to_multiple_of) == (4, 1, 64)
    assert seed.profile.precision == "fp32" and seed.engine.gradient_checkpointing
    assert configs["baseline"].profile == profiles.BASELINE and configs["modified"].profile == profiles.MODIFIED
    assert configs["baseline"].engine == configs["modified"].engine == EngineArguments()  # the scripts' defaults
    grid = [c for c in configs.values() if c.group == "grid" and not c.name.startswith("pin-")]
    engines = []  # the rows, in order
    for c in grid:
        if c.engine not in engines:
            engines.append(c.engine)
    assert engines[0] == TRAINER_DEFAULTS and engines[-1] == EngineArguments()  # batch 128: 8 x 16
    for earlier, later in itertools.pairwise(engines):
        changed = [f for f in dataclasses.fields(EngineArguments) if getattr(earlier, f.name) != getattr(later, f.name)]
        assert len(changed) == 1, (earlier, later, changed)  # one setting more per row
    for engine in engines:  # each row runs for both profiles: the columns
        assert sorted(c.profile.name for c in grid if c.engine == engine) == ["baseline", "modified"]
    pinned = [c for c in configs.values() if c.name.startswith("pin-")]
    assert {(c.profile.precision, c.profile.pin_memory) for c in pinned} == {("fp32", True), ("mixed", False)}
    for c in configs.values():
        assert c.batch_size % c.engine.gradient_accumulation_steps == 0


def test_lengths_file_holds_histograms_only():
    lengths = workload.load_lengths()
    for key in ("train_sequence", "train_context", "train_answer", "eval_context"):
        histogram = lengths[key]
        assert sum(histogram.values()) == lengths["examples"]
        assert all(k.isdigit() and isinstance(v, int) and v > 0 for k, v in histogram.items())
    assert sum(lengths["eval_solution"].values()) == 2 * lengths["examples"]
    assert "Llama-3" in lengths["note"] and lengths["tokenizer"]
    assert 0 < lengths["context_share"] < 1


def test_lengths_file_was_measured_with_llama_3s_tokenizer():
    lengths = workload.load_lengths()
    assert lengths["tokenizer"].startswith("Llama 3's tokenizer")
    assert "--tokenizer llama-3.2-1b-random" in lengths["command"]
    assert lengths["examples"] == 1000 and "piqa-valid-1000" in lengths["source"]


def test_measure_lengths_counts_llama_3_tokens_of_the_sample():
    """Lengths as training tokenizes: BOS + prompt + answer + EOS, the masked part BOS + prompt; no text kept."""
    from common.data import read_release_split, tokenize_for_training
    from common.models import load_tokenizer

    result = workload.measure_lengths("llama-3.2-1b-random", str(ROOT / "common" / "sample"))
    tokenizer = load_tokenizer("llama-3.2-1b-random")
    examples = read_release_split(ROOT / "common" / "sample", "validation")
    expected = [len(tokenize_for_training(e, tokenizer, 10**9)["input_ids"]) for e in examples]
    assert result["examples"] == len(examples) == sum(result["train_sequence"].values())
    assert result["train_sequence"] == workload.histogram(expected)  # the tokenizer's own BOS, counted once
    assert result["summary"]["train_sequence"]["max"] == max(expected)
    assert not any(e.goal in json.dumps(result) for e in examples)


def test_synthetic_features_follow_the_lengths_with_answer_only_labels():
    lengths = workload.load_lengths()
    features = workload.synthetic_features(500, 128256, lengths, seed=1)
    assert features == workload.synthetic_features(500, 128256, lengths, seed=1)  # seeded
    observed = sum(len(f["input_ids"]) for f in features) / len(features)
    assert abs(observed - workload.mean_length(lengths["train_sequence"])) < 4
    for f in features:
        assert len(f["labels"]) == len(f["input_ids"])
        masked = sum(label == IGNORE_INDEX for label in f["labels"])
        assert 1 <= masked < len(f["input_ids"])
        assert f["labels"][masked:] == f["input_ids"][masked:] and all(0 <= t < 128256 for t in f["input_ids"])


def test_synthetic_eval_examples_have_piqa_token_counts():
    lengths = workload.load_lengths()
    tokenizer = workload.word_tokenizer()
    example = workload.synthetic_examples(3, lengths, seed=0)[0]
    ids = tokenizer(f"Question: {example.goal}\nAnswer:")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert len(ids) == 1 + 2 + len(example.goal.split())


@pytest.mark.slow  # starts a process of its own (seconds)
@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU the profile has no device kernels")
def test_profiled_row_reports_where_the_time_went(tmp_path):
    out = tmp_path / "rows.json"
    done = run_tiny_benchmark(out, "--configs", "baseline", "--profile", "baseline", "--eval-examples", "0",
                              timeout_s=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    summary = rows["baseline[profiled]"]["profile_summary"]
    assert summary["steps"] == 3 and summary["wall_ms_per_step"] > 0
    assert summary["device_busy_ms_per_step"] == 0  # no GPU: no kernel-level events, and operators not counted
    assert summary["top_self_cpu_ms_per_step"]
    # The profiled copy is not a grid row: the grid's fp32 cell is the row timed without the profiler.
    from tools.benchmark.tables import format_grid

    assert rows["baseline[profiled]"]["group"] == "profiled"
    grid_line = next(line for line in format_grid(list(rows.values())).splitlines()
                     if line.startswith(f"| {rows['baseline']['row']} |"))
    assert grid_line.split("|")[2].strip() == f"{rows['baseline']['tokens_per_s']:,.0f}"


@pytest.mark.slow  # a torchrun / accelerate launch
def test_benchmark_fsdp_launches_with_the_repository_config_and_reports_the_engine_it_saw(tmp_path):
    """--fsdp: accelerate launch with common/fsdp.yaml. On CPUs accelerate runs DDP instead of FSDP; the row says
    what ran (read from the model's wrapping), not what was asked for."""
    out = tmp_path / "rows.json"
    done = run_tiny_benchmark(out, "--configs", "modified", "--nproc", "2", "--fsdp", timeout_s=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["launcher"] == "accelerate launch --config_file common/fsdp.yaml"
    (row,) = report["rows"]
    assert "error" not in row, row.get("error")
    assert (row["world_size"], row["parallelism"], row["micro_batch_size"]) == (2, "DDP", 4)
    assert "--fsdp shards over several GPUs" in run_tiny_benchmark(out, "--fsdp").stderr


def test_without_a_gpu_the_default_model_is_refused_in_one_line_naming_smoke(capsys):
    from tools.benchmark.__main__ import gpu_present, main

    if gpu_present():
        pytest.skip("a GPU is here")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no GPU here") and err.count("\n") == 1 and "--model smoke" in err
