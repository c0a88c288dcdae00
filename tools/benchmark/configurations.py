"""What the benchmark measures: each configuration is a profile (common/profiles.py) and an engine (EngineArguments)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.config import EngineArguments, Profile, micro_batch_size
from common.profiles import BASELINE, MODIFIED

BENCHMARK_MODEL = "llama-3.2-1b-random"  # the benchmark's default model (common.config's DEFAULT_MODEL is the scripts')
# The HF Trainer's defaults for what the engine sets (PyTorch's own for the attention kernel), batch 128 per step.
TRAINER_DEFAULTS = EngineArguments(
    gradient_accumulation_steps=16,  # per_device_train_batch_size 8
    gradient_checkpointing=False,
    activation_budget_gib=0.0,  # the Trainer's checkpointing: every decoder layer
    expandable_segments=False,  # PyTorch's allocator default
    optim="adamw_torch_fused",
    liger=False,
    loss="full-logits",  # the model's own forward: every position's logits
    train_sampling_strategy="random",
    cudnn_attention=True,
)
# The order in which the grid adds the shared engine's settings to the Trainer's defaults, one more per row.
ENGINE_STEPS = (
    ("cudnn_attention", "cuDNN attention off"),
    ("gradient_checkpointing", "gradient checkpointing"),
    ("liger", "Liger kernels (SwiGLU, RoPE)"),
    ("loss", "loss at the answer tokens only, in chunks"),
    ("train_sampling_strategy", "length-grouped batches"),
    ("gradient_accumulation_steps", "one micro-batch per optimizer step (no accumulation)"),
    ("expandable_segments", "expandable-segments allocator"),
    ("activation_budget_gib", (f"checkpointing within a {EngineArguments().activation_budget_gib:g} GiB activation "
                               "budget = the shared engine, both scripts' defaults")),
)
PROFILES = {"fp32": BASELINE, "mixed": MODIFIED}  # the grid's columns: each script's own profile
TRAINER = "HF Trainer"  # what trains a configuration (its row's engine_path)
PLAIN_LOOP = "plain loop"  # the reference: the same workload and arithmetic in a plain PyTorch loop


@dataclass(frozen=True)
class BenchConfig:
    name: str
    group: str  # "grid" (engine row x precision column), "reference", "explore" or "profiled" (--profile's copy)
    profile: Profile
    engine: EngineArguments
    row: str = ""  # the grid's row label
    batch_size: int = 128  # examples per optimizer step (the experiment's --batch-size)
    description: str = ""
    engine_path: str = TRAINER  # TRAINER, or PLAIN_LOOP (plain_loop.py)
    twin: str = ""  # a plain-loop configuration's Trainer twin: the configuration it reproduces

    @property
    def micro_batch_size(self) -> int:
        return micro_batch_size(self.batch_size, self.engine.gradient_accumulation_steps)


def configurations(batch_size: int = 128, world_size: int = 1) -> list[BenchConfig]:
    """The grid (the shared engine's settings added one at a time to the Trainer's defaults, rows, for each
    precision, columns), pinned memory flipped at the engine, the seed's configuration, and (with `world_size` > 1)
    DDP's own settings. Each column is a script's own profile: baseline.PROFILE (fp32) and modified.PROFILE (mixed).
    On one GPU, last: the scripts' configurations in a plain PyTorch loop (the reference rows; one process only)."""
    configs = grid(batch_size) + pinned_memory(batch_size) + [seed_original()]
    if world_size == 1:
        configs += engine_variants(batch_size) + plain_loops(batch_size)
    else:
        configs += ddp_probes(batch_size)
    return configs


def engine_rows(batch_size: int) -> list[tuple[str, str, EngineArguments]]:
    """(name, label, engine) per grid row: the Trainer's defaults, then one engine setting more per row."""
    defaults = dataclasses.replace(TRAINER_DEFAULTS, gradient_accumulation_steps=max(1, batch_size // 8))  # micro 8
    accumulation = defaults.gradient_accumulation_steps
    rows = [("trainer-defaults", (f"HF Trainer defaults (micro-batch {batch_size // accumulation}"
                                  f" x {accumulation}, fused AdamW)"), defaults)]
    engine = defaults
    for step, (field_name, label) in enumerate(ENGINE_STEPS, start=1):
        engine = dataclasses.replace(engine, **{field_name: getattr(EngineArguments(), field_name)})
        rows.append((f"engine-{step}", f"+ {label}", engine))
    assert engine == EngineArguments(), "the grid's last row must be the shared engine's defaults"
    return rows


def grid(batch_size: int) -> list[BenchConfig]:
    """Every engine row for both profiles; the last row (the shared engine) is named after the scripts."""
    configs = []
    for row_name, label, row_engine in engine_rows(batch_size):
        for precision, profile in PROFILES.items():
            name = {"fp32": "baseline", "mixed": "modified"}[precision] if row_engine == EngineArguments() \
                else f"{row_name}/{precision}"
            configs.append(BenchConfig(name, "grid", profile, row_engine, row=label, batch_size=batch_size,
                                       description=f"{profile.name}.py's profile, engine: {label}"))
    return configs


def pinned_memory(batch_size: int) -> list[BenchConfig]:
    """Each profile with its pin_memory flipped, at the shared engine."""
    configs = []
    for precision, profile in PROFILES.items():
        flipped = dataclasses.replace(profile, pin_memory=not profile.pin_memory)
        configs.append(BenchConfig(
            f"pin-{'on' if flipped.pin_memory else 'off'}/{precision}", "grid", flipped, EngineArguments(),
            row=f"the engine, pinned memory {'on' if flipped.pin_memory else 'off'}", batch_size=batch_size,
            description=f"{profile.name}.py's profile with pin_memory={flipped.pin_memory}, the shared engine"))
    return configs


def seed_original() -> BenchConfig:
    """The configuration the project started from, for the 'x seed' column."""
    return BenchConfig(
        "seed-original", "reference", BASELINE,
        dataclasses.replace(TRAINER_DEFAULTS, gradient_accumulation_steps=4, gradient_checkpointing=True,
                            optim="adamw_torch", pad_to_multiple_of=64),
        batch_size=4,
        description="the seed's configuration: fp32, micro-batch 1 x accumulation 4 (4 examples per step), "
                    "every sequence padded to a multiple of 64, gradient checkpointing",
    )


def engine_variants(batch_size: int) -> list[BenchConfig]:
    """The shared engine with one setting changed (the loss, Liger, the length split, the activation budget,
    checkpointing, padding to a multiple), per profile: the 'explore' rows."""
    variants = [
        ("loss-liger-fused", {"loss": "liger-fused"}, "Liger's fused linear cross-entropy over every position"),
        ("no-liger", {"liger": False}, "no Liger kernels (PyTorch's SwiGLU and RoPE)"),
        ("no-split", {"length_split": False}, "every batch in one decoder pass (no length split)"),
        ("budget-0", {"activation_budget_gib": 0.0}, "every decoder layer checkpointed (no activation budget)"),
        ("budget-3", {"activation_budget_gib": 3.0}, "checkpointing within a 3 GiB activation budget"),
        ("budget-12", {"activation_budget_gib": 12.0}, "checkpointing within a 12 GiB activation budget"),
        ("no-ckpt", {"gradient_checkpointing": False}, "no gradient checkpointing"),
        ("pad-8", {"pad_to_multiple_of": 8}, "every batch and length group padded to a multiple of 8 tokens"),
        ("pad-16", {"pad_to_multiple_of": 16}, "every batch and length group padded to a multiple of 16 tokens"),
    ]
    return [BenchConfig(f"{script}/{name}", "explore", profile, dataclasses.replace(EngineArguments(), **change),
                        batch_size=batch_size, description=f"{script} with {description}")
            for name, change, description in variants
            for script, profile in (("baseline", BASELINE), ("modified", MODIFIED))]


def plain_loops(batch_size: int) -> list[BenchConfig]:
    """baseline and modified (the scripts' profiles, the shared engine) trained by a plain PyTorch loop instead of
    the HF Trainer: the same model, data, batches and arithmetic, to show what the Trainer costs."""
    return [BenchConfig(f"plain-loop/{twin}", "reference", profile, EngineArguments(), batch_size=batch_size,
                        description=f"{twin} (same profile, engine, data and arithmetic) in a plain PyTorch loop, "
                                    "not the HF Trainer: the reference for Trainer overhead",
                        engine_path=PLAIN_LOOP, twin=twin)
            for twin, profile in (("baseline", BASELINE), ("modified", MODIFIED))]


def ddp_probes(batch_size: int) -> list[BenchConfig]:
    """Settings that act only under DDP, probed on modified.py's run."""
    probes = [
        ("modified+bucket200", {"ddp_bucket_cap_mb": 200}, "DDP's gradients all-reduced in buckets of 200 MB"),
        ("modified+static-graph", {"ddp_static_graph": True}, "DDP's static_graph=True"),
        ("modified+bf16-allreduce", {"ddp_comm_hook": "bf16"}, "gradients cast to bf16 for the all-reduce"),
    ]
    return [BenchConfig(name, "explore", MODIFIED, dataclasses.replace(EngineArguments(), **change),
                        batch_size=batch_size, description="modified with " + description)
            for name, change, description in probes]
