"""Training speed and memory of the profiles and the engine's settings on one GPU (or N with --nproc), through the
experiment's own code path.

    python3 -m tools.benchmark                          # every configuration + evaluation speed, one GPU
    python3 -m tools.benchmark --configs baseline,modified --steps 10
    python3 -m tools.benchmark --list                   # the configurations, without running them
    python3 -m tools.benchmark --configs modified --nproc 2   # DDP over 2 GPUs of this machine (torchrun)
    python3 -m tools.benchmark --configs modified --nproc 2 --fsdp   # FSDP: accelerate launch with common/fsdp.yaml
    python3 -m tools.benchmark --measure-lengths --data-dir DIR   # rebuild piqa_lengths.json (Llama 3's tokenizer)

Each configuration is a profile (common/profiles.py: baseline's fp32 or modified's mixed) and an engine
(`EngineArguments`: the shared defaults, or the grid's rows that add them one at a time to the HF Trainer's
defaults), set up as a run sets them up (`common.engine.apply_engine` with the profile's `Precision`) and turned
into TrainingArguments by `training_argument_values`, run by the run's `EngineTrainer` with evaluation and
checkpoints turned off, on the random-weight Llama-3.2-1B (`llama-3.2-1b-random`, no download), with the run's
collator (`PadToLongest` and the engine's batch plan). The batches are synthetic token ids whose lengths follow
PIQA's (`tools/benchmark/piqa_lengths.json`, measured with Llama 3's tokenizer); the loss is on the answer part only.

Every configuration runs in its own process (forked from a clean fork server) (Liger's patches, torch.compile caches
and allocator state never leak into the next row); the parent samples GPU memory with NVML
(`common.monitor.GpuMonitor`) meanwhile.
Per configuration: a few warm-up optimizer steps, then `--steps` timed ones (torch.cuda.synchronize at every step
end; for `group_by_length`, one whole mega-batch of the length-grouped sampler so the timed steps span PIQA's
length distribution). See docs/benchmarks.md for the results and how to read them.

The files, in the order a configuration meets them:

    configurations.py   what is measured: the grid (engine rows x the two profiles), the seed's, DDP probes
    workload.py         PIQA's token lengths (piqa_lengths.json) and the synthetic batches that follow them
    timing.py           the Trainer callbacks that time steps and profile, the token-counting collator
    train_row.py        one configuration trained for a few steps -> one row of measurements
    plain_loop.py       the same, trained by a plain PyTorch loop instead of the Trainer (the reference rows)
    eval_row.py         evaluation speed -> the 'evaluation' row
    isolation.py        each row in its own process: a fork server, or torchrun / accelerate launch
    tables.py           the rows as the printed tables and progress lines
    __main__.py         the command line: plan the rows, run them with NVML sampled, write the JSON
"""
