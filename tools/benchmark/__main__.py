"""python3 -m tools.benchmark: the command line. Plans the rows (configurations, the evaluation row, a profiled
row), runs each in its own process while NVML samples the GPUs, writes the JSON after every row, prints the tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import tools.benchmark
from common.config import ConfigError, micro_batch_size
from tools.benchmark.configurations import BENCHMARK_MODEL, PLAIN_LOOP, BenchConfig, configurations
from tools.benchmark.eval_row import run_eval
from tools.benchmark.isolation import fork_server, run_distributed, run_isolated, worker
from tools.benchmark.plain_loop import run_plain_loop
from tools.benchmark.report import new_report
from tools.benchmark.tables import evaluation_lines, format_grid, format_table, reference_lines, row_lines
from tools.benchmark.train_row import run_config
from tools.benchmark.workload import (
    LENGTHS_PATH,
    PIQA_TRAIN_EXAMPLES,
    PIQA_VALID_EXAMPLES,
    load_lengths,
    measure_lengths,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m tools.benchmark",
                                     description=tools.benchmark.__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="all", help="comma-separated configuration names, or 'all' (see --list)")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per configuration "
                        "(group_by_length: at least one mega-batch of the length-grouped sampler)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--max-measure-s", type=float, default=20.0,
                        help="stop timing a configuration after this many seconds (at least 3 timed steps)")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per optimizer step (the experiment's)")
    parser.add_argument("--model", default=BENCHMARK_MODEL,
                        help="'llama-3.2-1b-random' (default) or 'smoke' (tiny, CPU)")
    parser.add_argument("--dataset-size", type=int, default=PIQA_TRAIN_EXAMPLES,
                        help="synthetic training examples (default: PIQA's training split size)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-examples", type=int, default=PIQA_VALID_EXAMPLES,
                        help="synthetic examples for the evaluation-speed row (0: skip it)")
    parser.add_argument("--eval-batch-sizes", default="64,256", help="evaluation batch sizes to time")
    parser.add_argument("--config-timeout-s", type=float, default=300.0, help="give up on a configuration after this")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no configuration once this many seconds have passed (the rest are skipped)")
    parser.add_argument("--json-out", default="runs/benchmark/benchmark.json", help="rows and environment, as JSON")
    parser.add_argument("--log-dir", default=None, help="NVML log folder (default: next to --json-out)")
    parser.add_argument("--nvml-interval-s", type=float, default=0.1)
    parser.add_argument("--profile", default=None,
                        help="also run this configuration for a few steps under torch.profiler (its own row)")
    parser.add_argument("--no-fork", action="store_true", help="run configurations in this process (tests, debugging)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="GPUs per configuration: above 1, torchrun runs each one data-parallel (DDP) on that "
                             "many GPUs of this machine, the batch split across them (--batch-size is the total)")
    parser.add_argument("--fsdp", action="store_true",
                        help="with --nproc: launch with accelerate and common/fsdp.yaml (FSDP, full sharding) "
                             "instead of torchrun (DDP)")
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)  # one torchrun rank
    parser.add_argument("--measure-lengths", action="store_true",
                        help="rebuild tools/benchmark/piqa_lengths.json and exit")
    parser.add_argument("--tokenizer", default="llama-3.2-1b-random",
                        help="with --measure-lengths: 'llama-3.2-1b-random' (Llama 3's, the default), a tokenizer "
                             "directory or a .gguf file")
    parser.add_argument("--data-dir", help="with --measure-lengths: PIQA in its release layout (valid.jsonl)")
    return parser


def check_options(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    if options.nproc < 1:
        parser.error("--nproc must be at least 1")
    if options.warmup_steps < 1:
        parser.error("--warmup-steps must be at least 1: a timed step is measured from the end of the one before it")
    if options.steps < 1:
        parser.error("--steps must be at least 1")
    if options.fsdp and options.nproc < 2:
        parser.error("--fsdp shards over several GPUs: give --nproc 2 or more")
    if options.nproc > 1 and options.no_fork:
        parser.error("--nproc runs every configuration under torchrun; --no-fork does not apply")
    if options.measure_lengths and not options.data_dir:
        parser.error("--measure-lengths needs --data-dir")


def model_problem(model: str) -> tuple[str, str | None]:
    """--model as the rows will load it, and why it cannot be loaded (None: it can), found once before any row runs:
    a mistyped name must not fail every configuration in turn."""
    from common import hub
    from common.models import ModelLoadError, check_model_path, is_hub_id, load_tokenizer, resolve_model_argument

    try:
        model, _ = resolve_model_argument(model)
        check_model_path(model)
        hub.check_reachable({model: hub.MODEL_FIX} if is_hub_id(model) else {})
        load_tokenizer(model)
    except ModelLoadError as err:
        return model, str(err)
    return model, None


def gpu_present() -> bool:
    """Whether NVML sees a GPU; asked without starting CUDA here, since the configurations are forked from this process."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except (ImportError, OSError):
        return False
    except pynvml.NVMLError:  # no driver: no GPU this machine can use
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


def write_measured_lengths(options: argparse.Namespace) -> int:
    result = measure_lengths(options.tokenizer, options.data_dir)
    LENGTHS_PATH.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {LENGTHS_PATH}: {result['examples']} examples, {json.dumps(result['summary'])}")
    return 0


def print_configurations(every: list[BenchConfig], gpus: int) -> int:
    for c in every:
        try:
            per_gpu = micro_batch_size(c.batch_size, c.engine.gradient_accumulation_steps, gpus)
            shape = f"{per_gpu} x {c.engine.gradient_accumulation_steps}" + (f" x {gpus} GPUs" if gpus > 1 else "")
        except ConfigError:
            shape = f"? (not divisible over {gpus} GPUs)"
        print(f"{c.name:<28} {c.group:<9} batch {c.batch_size:>3} = {shape}  {c.description}")
    return 0


def choose(parser: argparse.ArgumentParser, options: argparse.Namespace, every: list[BenchConfig]) -> list[BenchConfig]:
    """The configurations --configs names ('evaluation' is a row, not a configuration)."""
    if options.configs == "all":
        return every
    names = [n.strip() for n in options.configs.split(",") if n.strip()]
    known = {c.name: c for c in every}
    unknown = [n for n in names if n not in known and n != "evaluation"]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; --list shows them")
    return [known[n] for n in names if n in known]


def config_job(options: argparse.Namespace, config: BenchConfig, lengths: dict, profile_steps: int = 0) -> tuple:
    target = run_plain_loop if config.engine_path == PLAIN_LOOP else run_config
    return (config.name, target, {
        "config": config, "model_name": options.model, "steps": options.steps,
        "warmup_steps": options.warmup_steps,
        "max_measure_s": 1e9 if profile_steps else options.max_measure_s,
        "dataset_size": options.dataset_size, "seed": options.seed, "lengths": lengths,
        "profile_steps": profile_steps,
    })


def plan_jobs(options, every: list[BenchConfig], chosen: list[BenchConfig], lengths: dict, parser) -> list[tuple]:
    """(name, function, kwargs) per row, in --configs order ('evaluation' where named; with 'all': after the
    configurations and before the rows that compile, which may take minutes). --profile adds a profiled row."""
    jobs = [config_job(options, c, lengths) for c in chosen]
    if options.profile:
        target = next((c for c in every if c.name == options.profile), None)
        if target is None or target.engine_path == PLAIN_LOOP:
            parser.error(f"--profile {options.profile}: no such configuration of the HF Trainer")
        position = next((i + 1 for i, job in enumerate(jobs) if job[0] == options.profile), len(jobs))
        profiled = dataclasses.replace(target, name=f"{options.profile}[profiled]", group="profiled")  # not in the grid
        jobs.insert(position, config_job(options, profiled, lengths, 3))
    names = [n.strip() for n in options.configs.split(",")]
    if options.eval_examples > 0 and (options.configs == "all" or "evaluation" in names):
        sizes = [int(s) for s in options.eval_batch_sizes.split(",") if s.strip()]
        eval_job = ("evaluation", run_eval, {
            "model_name": options.model, "examples_count": options.eval_examples, "batch_sizes": sizes,
            "seed": options.seed, "lengths": lengths,
        })
        if options.configs == "all":
            slow = [j for j in jobs if j[2]["config"].engine.torch_compile]
            jobs = [j for j in jobs if j not in slow] + [eval_job] + slow
        else:
            before = [n for n in names[: names.index("evaluation")] if n != "evaluation"]
            position = max((i + 1 for i, job in enumerate(jobs) if job[0].removesuffix("[profiled]") in before),
                           default=0)
            jobs.insert(position, eval_job)
    return jobs


def run_job(options: argparse.Namespace, monitor, name: str, target, kwargs: dict) -> dict[str, Any]:
    """One row in its own process(es), under its own NVML phase; the phase's peak GPU memory added to the row."""
    phase = name.replace(",", "_")
    monitor.set_phase(phase)  # takes the row's first sample
    if options.nproc > 1 and target is run_config:
        row = run_distributed(target, kwargs, options.nproc, options.config_timeout_s, options.fsdp)
    else:
        row = run_isolated(target, kwargs, options.config_timeout_s, fork=not options.no_fork)
    monitor.sample_now()
    monitor.set_phase("idle")
    row.setdefault("name", name)
    phases = monitor.summary().get("phases", {})
    if phases.get(phase):
        row["nvml_peak_mib_per_gpu"] = {gpu: g["peak_used_mib"] for gpu, g in phases[phase].items()}
        row["nvml_peak_mib"] = max(row["nvml_peak_mib_per_gpu"].values())
    return row


def run_jobs(options: argparse.Namespace, jobs: list[tuple], monitor, report: dict, json_out: Path,
             started: float) -> None:
    """Every planned row in order (none once --deadline-s has passed), the JSON rewritten after each."""
    for name, target, kwargs in jobs:
        elapsed = time.perf_counter() - started
        if options.deadline_s is not None and elapsed > options.deadline_s:
            print(f"[{elapsed:5.0f}s] {name}: skipped (past --deadline-s {options.deadline_s:.0f})", flush=True)
            report["rows"].append({"name": name, "error": "skipped: past the deadline"})
            continue
        print(f"[{elapsed:5.0f}s] {name} ...", flush=True)
        report["rows"].append(run_job(options, monitor, name, target, kwargs))
        json_out.write_text(json.dumps(report, indent=1) + "\n")
        for line in row_lines(name, report["rows"][-1], time.perf_counter() - started):
            print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.worker:
        return worker(*options.worker)
    check_options(parser, options)
    if options.measure_lengths:
        return write_measured_lengths(options)
    every = configurations(options.batch_size, options.nproc)
    if options.list:
        return print_configurations(every, options.nproc)
    if options.model == BENCHMARK_MODEL and not gpu_present():
        print(f"error: no GPU here, and the default --model {BENCHMARK_MODEL} (1.24 B parameters, {len(every)} "
              "configurations) would take hours on a CPU: pass --model smoke to try the benchmark on a CPU",
              file=sys.stderr)
        return 2
    chosen = choose(parser, options, every)
    options.model, problem = model_problem(options.model)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from common.distributed import one_gpu_unless_distributed
    from common.monitor import GpuMonitor

    if options.nproc == 1 and (note := one_gpu_unless_distributed()):
        print(note, flush=True)  # else the Trainer would run DataParallel over every visible GPU
    lengths = load_lengths()
    json_out = Path(options.json_out)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(options.log_dir) if options.log_dir else json_out.parent
    started = time.perf_counter()
    report = new_report(options, argv, lengths)
    print(f"benchmark: {len(chosen)} configuration(s) on {report['environment']['gpu'] or 'no GPU'}", flush=True)
    monitor = GpuMonitor(log_dir / "benchmark_nvml.txt", interval_s=options.nvml_interval_s, console_every=0,
                         phase="start", print_fn=lambda line: print(line, flush=True),
                         phases=None)  # its phases are the rows' names
    if not options.no_fork:
        fork_server()  # the fork server starts now, before the monitor's thread
    with monitor:
        run_jobs(options, plan_jobs(options, every, chosen, lengths, parser), monitor, report, json_out, started)
    report["nvml"] = {k: v for k, v in monitor.summary().items() if k != "phases"}
    report["total_s"] = time.perf_counter() - started
    json_out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + format_grid(report["rows"]) + "\n\n" + format_table(report["rows"]))
    for line in reference_lines(report["rows"]) + evaluation_lines(report["rows"]):
        print(line)
    print(f"\nrows: {json_out}")
    if report["rows"] and all("error" in r for r in report["rows"]):
        print("error: every configuration failed (the rows say why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
