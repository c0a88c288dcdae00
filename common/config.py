"""The experiment's arguments (one dataclass, shared by both scripts) and the Profile each script passes.

`ExperimentArguments` defines the experiment and `EngineArguments` how a step is executed fast; both are
flags, identical in both runs. A `Profile` holds only what the two scripts compare: precision, checkpoint
management and pinned memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from common.cli import REDACTED, parse_command_line

DEFAULT_MODEL = "meta-llama/Llama-3.2-1B"
EVAL_METHODS = ("loglik", "generate", "both")


class ConfigError(ValueError):
    """An argument the user must fix."""


PRECISIONS = ("fp32", "mixed")
SAMPLING_STRATEGIES = ("random", "group_by_length")
LOSSES = ("answer-chunks", "liger-fused", "full-logits")
DDP_COMM_HOOKS = ("bf16", "fp16")


@dataclass(frozen=True)
class Profile:
    """The settings in which baseline.py and modified.py differ, and nothing else: precision, checkpoint
    management (save_total_limit, load_best_model_at_end) and pinned memory."""

    name: str
    precision: str  # "fp32" (TF32 off) or "mixed" (bf16 autocast over fp32 weights; fp16 + GradScaler without bf16)
    save_total_limit: int | None  # checkpoints kept on disk; None keeps every epoch's
    load_best_model_at_end: bool  # end with the best epoch by selection accuracy (else the last epoch's model)
    pin_memory: bool  # page-locked host memory for the data loader's batches

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"Profile.precision must be 'fp32' or 'mixed', got {self.precision!r}")


@dataclass
class EngineArguments:
    """How a training step is executed, shared by both scripts: each setting a flag, the same in both runs.

    The defaults are the fastest the benchmark measured for both profiles on one H200 (docs/benchmarks.md); the
    memory plan (--fit-memory) fits them to a smaller card; a flag switches a kernel off.
    """

    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per optimizer step: each is --batch-size / (this x GPUs) examples. "
                  "The experiment is unchanged; a larger value needs less GPU memory and runs slower."},
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in the backward pass (less memory, ~1/3 more compute), "
                                "in the decoder layers --activation-budget-gib cannot hold."}
    )
    activation_budget_gib: float = field(
        default=7.0,
        metadata={"help": "With gradient checkpointing: GiB a micro-batch's decoder layers may keep for the backward "
                  "pass. Layers keep their activations (no recompute), last layer first, while they fit; the others "
                  "are checkpointed (common/engine/budget.py). 0 checkpoints every layer."},
    )
    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "The Trainer's optimizer implementation (AdamW arithmetic in every adamw_torch* choice)."},
    )
    liger: bool = field(
        default=True,
        metadata={"help": "Liger's Triton kernels for SwiGLU and RoPE (and its fused loss with --loss "
                  "liger-fused); CUDA GPUs only, off elsewhere. --no-liger turns them off."},
    )
    loss: str = field(
        default="answer-chunks",
        metadata={"help": "How the answer tokens' mean cross-entropy is computed (the same loss each way): "
                  "'answer-chunks' logits at the answer tokens only, in chunks, long batches split by length (Llama, "
                  "Mistral, Qwen2/3; common/engine/loss.py); 'liger-fused' Liger's fused linear cross-entropy (needs "
                  "--liger); 'full-logits' the model's own forward."},
    )
    length_split: bool = field(
        default=True,
        metadata={"help": "With --loss answer-chunks: run a batch whose rows differ much in length as groups of similar "
                  "length, each padded to its own longest (common/engine/plan.py). --no-length-split: one pass."},
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "'group_by_length': batches of similar length (little padding); 'random': plain shuffling."},
    )
    cudnn_attention: bool = field(
        default=False,
        metadata={"help": "PyTorch's cuDNN kernel for half-precision attention; it plans anew for every sequence "
                  "length, so it is slow on per-batch padding (off by default)."},
    )
    expandable_segments: bool = field(
        default=True,
        metadata={"help": "PyTorch's expandable-segments CUDA allocator (less memory lost to fragmentation); set "
                  "before CUDA starts, unless PYTORCH_CUDA_ALLOC_CONF is already set."},
    )
    background_checkpoints: bool = field(
        default=True,
        metadata={"help": "Write checkpoints from a background thread: training stops only to copy the weights and "
                  "optimizer state into host memory (page-locked; 14 GiB for a 1B model), and a checkpoint counts "
                  "once complete (common/checkpoint_writer.py). --no-background-checkpoints: the Trainer's own save."},
    )
    fit_memory: bool = field(
        default=True,
        metadata={"help": "Fit gradient accumulation, the activation budget and the evaluation's logits to this GPU's "
                  "memory before training (common/memory_plan.py): the flags' values are kept where they fit, the "
                  "change is said in one line. --no-fit-memory: the flags exactly as given."},
    )
    gpu_memory_gib: float | None = field(
        default=None,
        metadata={"help": "Use at most this many GiB of GPU memory: caps torch's allocator, and --fit-memory plans "
                  "for it. To share a GPU, or to try a smaller card's memory (a 24 GB card less its CUDA context: "
                  "22). Default: the whole GPU."},
    )
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model with torch.compile."})
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each batch, and each length group of --loss answer-chunks, to a multiple of "
                                "this many tokens (fewer distinct shapes, more padding)."}
    )
    ddp_bucket_cap_mb: int | None = field(
        default=None, metadata={"help": "Under DDP: all-reduce gradients in buckets of this many MB (PyTorch: 25)."}
    )
    ddp_static_graph: bool | None = field(
        default=None, metadata={"help": "Under DDP: the same parameters are used in every step."}
    )
    ddp_comm_hook: str | None = field(
        default=None, metadata={"help": "Under DDP: 'bf16' or 'fp16' casts gradients for the all-reduce (half the bytes)."}
    )

    def validate(self) -> None:
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"--gradient-accumulation-steps must be at least 1, got {self.gradient_accumulation_steps}")
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ConfigError(f"--train-sampling-strategy must be one of {', '.join(SAMPLING_STRATEGIES)}, "
                              f"got {self.train_sampling_strategy!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.loss == "liger-fused" and not self.liger:
            raise ConfigError("--loss liger-fused is Liger's kernel: it needs --liger (drop --no-liger or pick another --loss)")
        if not self.activation_budget_gib >= 0 or math.isinf(self.activation_budget_gib):  # `not >=`: NaN too
            raise ConfigError(f"--activation-budget-gib must be 0 or more and finite, got {self.activation_budget_gib}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"--pad-to-multiple-of must be at least 1, got {self.pad_to_multiple_of}")
        if self.gpu_memory_gib is not None and not 0 < self.gpu_memory_gib < float("inf"):
            raise ConfigError(f"--gpu-memory-gib must be a positive number of GiB, got {self.gpu_memory_gib}")
        if self.ddp_comm_hook not in (None, *DDP_COMM_HOOKS):
            raise ConfigError(f"--ddp-comm-hook must be one of {', '.join(DDP_COMM_HOOKS)}, got {self.ddp_comm_hook!r}")


def micro_batch_size(batch_size: int, accumulation: int, world_size: int = 1) -> int:
    """Examples per device per forward pass, for `batch_size` examples per optimizer step."""
    per_step = accumulation * world_size
    if batch_size % per_step:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by gradient accumulation {accumulation} x "
                          f"{world_size} GPU(s)")
    return batch_size // per_step


@dataclass
class ExperimentArguments:
    """Arguments shared by baseline.py and modified.py. `--smoke` runs offline on a tiny model and our sample."""

    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Hub id, local model directory (a run directory means its final_model), local .gguf file, "
                  "'smoke' (tiny offline model) or 'llama-3.2-1b-random' (Llama-3.2-1B's shapes, random weights, "
                  "Llama 3's tokenizer from the llama-models package; no download)."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "PIQA in its release layout (train.jsonl + train-labels.lst, valid.jsonl + "
                  "valid-labels.lst). Default: the Hub's parquet copy ybisk/piqa."},
    )
    smoke: bool = field(
        default=False,
        metadata={"help": "Offline embedded default: tiny random Llama, the bundled sample data, a few steps, CPU ok."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Run directory (default: runs/<profile name>; with --eval-only a new "
                                     "runs/<profile name>-eval[-N])."})
    train_samples: int | None = field(
        default=None, metadata={"help": "Training examples drawn from the train split after the selection slice (default: all)."}
    )
    selection_samples: int = field(
        default=500,
        metadata={"help": "Examples held out from the train split to select the best epoch (never reported)."},
    )
    eval_samples: str = field(
        default="200",
        metadata={"help": "Validation examples reported before and after training, drawn with --seed; 'all' for every one."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for data subsets, shuffling and initialisation."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: run all epochs)."})
    batch_size: int = field(
        default=128,
        metadata={"help": "Examples per optimizer step, over all GPUs, split into micro-batches of "
                  "batch / (--gradient-accumulation-steps x GPUs)."},
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of optimizer steps spent warming up linearly."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_length: int = field(
        default=512, metadata={"help": "Longest training sequence in tokens; examples cut by it are counted and reported."}
    )
    eval_method: str = field(
        default="loglik", metadata={"help": "Accuracy method: 'loglik' (multiple choice), 'generate', or 'both'."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Examples per evaluation forward pass (both choices)."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every this many optimizer steps."})
    monitor_interval: float = field(default=1.0, metadata={"help": "Seconds between GPU memory samples."})
    pmon: bool = field(default=False, metadata={"help": "Also record `nvidia-smi pmon` into pmon.txt."})
    eval_only: bool = field(default=False, metadata={"help": "Evaluate --model without training (needs only validation files)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished or partial run in the run directory."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in the run directory."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub to run."})
    token: str | None = field(
        default=None,
        metadata={"help": "Hugging Face access token for gated models (default: HF_TOKEN or your cached login). "
                  "Never written to disk."},
    )

    def eval_sample_count(self) -> int | None:
        """The number of reported validation examples; None for all."""
        if self.eval_samples == "all":
            return None
        try:
            return int(self.eval_samples)
        except ValueError:
            raise ConfigError(f"--eval-samples must be a positive integer or 'all', got {self.eval_samples!r}") from None

    def micro_batch_size(self, engine: EngineArguments, world_size: int = 1) -> int:
        """Examples per device per forward pass; the batch per optimizer step stays --batch-size."""
        return micro_batch_size(self.batch_size, engine.gradient_accumulation_steps, world_size)

    def validate(self) -> None:
        """Check everything up front, before any data or model is loaded."""
        positive = {
            "--batch-size": self.batch_size,
            "--learning-rate": self.learning_rate,
            "--num-train-epochs": self.num_train_epochs,
            "--eval-batch-size": self.eval_batch_size,
            "--max-length": self.max_length,
            "--logging-steps": self.logging_steps,
            "--monitor-interval": self.monitor_interval,
            "--selection-samples": self.selection_samples,
        }
        for name, value in positive.items():
            if not value > 0 or math.isinf(value):  # `not >`: NaN compares false with everything
                raise ConfigError(f"{name} must be greater than 0 and finite, got {value}")
        if not self.weight_decay >= 0 or math.isinf(self.weight_decay):
            raise ConfigError(f"--weight-decay must be 0 or more and finite, got {self.weight_decay}")
        if self.train_samples is not None and self.train_samples <= 0:
            raise ConfigError(f"--train-samples must be greater than 0, got {self.train_samples}")
        count = self.eval_sample_count()
        if count is not None and count <= 0:
            raise ConfigError(f"--eval-samples must be greater than 0 or 'all', got {count}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max-steps must be -1 (all epochs) or positive, got {self.max_steps}")
        if self.eval_method not in EVAL_METHODS:
            raise ConfigError(f"--eval-method must be one of {', '.join(EVAL_METHODS)}, got {self.eval_method!r}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.data_dir is not None and not self.data_dir.strip():
            raise ConfigError("--data-dir is empty: give the folder of PIQA's files, or leave it out")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pick one")
        if self.resume and self.eval_only:
            raise ConfigError("--resume continues training and --eval-only does not train: pick one")


# --smoke changes these defaults; anything given on the command line still wins.
SMOKE_DEFAULTS = {
    "model": "smoke",
    "selection_samples": 16,
    "eval_samples": "40",
    "num_train_epochs": 2.0,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "eval_batch_size": 16,
    "logging_steps": 1,
    "monitor_interval": 0.5,
}


SECRET_KEYS = ("token", "hub_token", "password", "secret")


def redact(config: dict) -> dict:
    """Never write an access token to disk: a secret that was given becomes "<redacted>"; one not given stays null."""
    return {
        k: (REDACTED if v is not None and any(s in k.lower() for s in SECRET_KEYS) else v) for k, v in config.items()
    }


def describe(profile: Profile) -> str:
    """--help's first lines: which profile this script runs."""
    settings = ", ".join(f"{name}={value}" for name, value in asdict(profile).items() if name != "name")
    return (f"Fine-tune on PIQA with the '{profile.name}' profile ({settings}). Every option below is the same "
            "in baseline.py and modified.py.")


def parse_arguments(argv: list[str] | None = None, description: str | None = None, prog: str | None = None,
                    profile: Profile | None = None) -> tuple[ExperimentArguments, EngineArguments]:
    """`[CONFIG.json] [--option VALUE ...]`; a mistake is one `error:` line and exit 2, a bad value a ConfigError.
    With `profile`, --help describes it and the program is named after it."""
    if profile is not None:
        description, prog = describe(profile), f"{profile.name}.py"
    args, engine = parse_command_line((ExperimentArguments, EngineArguments), argv, SMOKE_DEFAULTS, description, prog,
                                      asdict(profile) if profile else None)
    args.validate()
    engine.validate()
    return args, engine


def resolved_config(args: ExperimentArguments, engine: EngineArguments, profile: Profile) -> dict:
    return {"experiment": redact(asdict(args)), "engine": asdict(engine), "profile": asdict(profile)}


# Where and how a run was started, not what it measures: a --resume may give these differently.
HOW_STARTED = ("output_dir", "overwrite", "resume", "token", "monitor_interval", "pmon")


def check_resumes_the_same_run(saved: dict, args: ExperimentArguments, profile: Profile) -> None:
    """--resume continues the run its config.json (`saved`) records: the same profile and experiment. The engine may
    differ (another card may need another memory plan); a different seed, data or schedule would mix two experiments."""
    if saved.get("profile") not in (None, asdict(profile)):
        raise ConfigError(f"--resume: the run was made by {saved['profile'].get('name', '?')}.py, not this script")
    now = json.loads(json.dumps(redact(asdict(args))))  # as config.json holds it
    recorded = saved.get("experiment") or {}
    differing = [f"--{k.replace('_', '-')} {recorded[k]!r} -> {now[k]!r}" for k in sorted(set(now) & set(recorded))
                 if k not in HOW_STARTED and recorded[k] != now[k]]
    if differing:
        raise ConfigError(f"--resume continues the run as it was started, but {'; '.join(differing)}: give the run's "
                          "own values (python3 SCRIPT RUN_DIR/config.json --resume), or start a new run with "
                          "--output-dir")
