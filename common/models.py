"""Load a causal LM and its tokenizer: a Hub id, a local folder, a local `.gguf` file, the tiny smoke
model, or the Llama-3.2-1B architecture with random weights (for speed and memory work)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common import artifacts, hub
from common.gguf_check import gguf_problem
from common.llama3_tokenizer import MissingLlama3Tokenizer, llama3_tokenizer

SMOKE_MODEL = "smoke"  # --model value (and what --smoke selects): tiny random Llama, byte-level tokenizer
LLAMA_3_2_1B_RANDOM = "llama-3.2-1b-random"  # --model value: Llama-3.2-1B's shapes, random weights, Llama 3's tokenizer


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says how to fix it."""


def llama_3_2_1b_config(vocab_size: int = 128256) -> LlamaConfig:
    """meta-llama/Llama-3.2-1B's config.json, written out so no download is needed."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=128001,
        attention_bias=False,
        mlp_bias=False,
    )


def smoke_config(tokenizer) -> LlamaConfig:
    """A Llama small enough to train on a CPU in seconds."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (one token per byte): offline, deterministic, lossless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    return tokenizer


def load_tokenizer(model: str, trust_remote_code: bool = False, token: str | None = None):
    if model == SMOKE_MODEL:
        return byte_level_tokenizer()
    if model == LLAMA_3_2_1B_RANDOM:
        try:
            return llama3_tokenizer()  # the real job's token lengths, built offline from llama-models' BPE file
        except MissingLlama3Tokenizer as err:
            raise ModelLoadError(str(err)) from err
    path = Path(model)
    try:
        if path.suffix == ".gguf":
            with gguf_alone(path) as folder:  # transformers prefers a tokenizer.json beside the file to the GGUF's own
                tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code, token=token)
    except Exception as err:
        raise ModelLoadError(explain_load_failure(model, err)) from err
    probe = tokenizer("a")["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and eos != tokenizer.bos_token_id and probe and probe[-1] == eos:
        raise ModelLoadError(f"--model {model}: its tokenizer ends every text with its end-of-sequence token, so a "
                             "prompt would end the sequence before its answer: use a tokenizer that does not "
                             "(add_eos_token false)")
    if tokenizer.pad_token is None:
        # Llama 3 ships no pad token; padding positions are masked out, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def gguf_alone(path: Path) -> Iterator[Path]:
    """A folder holding `path` alone (a link to it), so that what loads from it is the GGUF's own and not whatever
    other files share its folder."""
    with tempfile.TemporaryDirectory(prefix="gguf-") as folder:
        (Path(folder) / path.name).symlink_to(path.resolve())
        yield Path(folder)


def looks_like_a_path(model: str) -> bool:
    """A --model value meant as a local path: `.`, `/` or `~` first, a .gguf name, or its first folder exists here
    (`runs/modfied/final_model` is a mistyped path, not a Hub id)."""
    path = Path(model).expanduser()
    first_folder = Path(model).parts[0] if len(Path(model).parts) > 1 else None
    return (model.startswith((".", "/", "~")) or path.suffix == ".gguf" or path.exists()
            or (first_folder is not None and Path(first_folder).is_dir()))


def is_local_path(model: str) -> bool:
    return model not in (SMOKE_MODEL, LLAMA_3_2_1B_RANDOM) and looks_like_a_path(model)


def is_hub_id(model: str) -> bool:
    return model not in (SMOKE_MODEL, LLAMA_3_2_1B_RANDOM) and not looks_like_a_path(model)


def resolve_model_argument(model: str) -> tuple[str, str | None]:
    """--model as it will be loaded, and a note for the log when it differs from what was typed.

    `~` is expanded; a run directory stands for its final_model/. A path that does not exist is an error here,
    so it is never sent to the Hub as a model id.
    """
    if not is_local_path(model):
        return model, None
    path = Path(model).expanduser()
    if not path.exists():
        missing = next(p for p in reversed([path, *path.parents]) if not p.exists())
        raise ModelLoadError(f"--model {model}: no such file or directory ({missing} does not exist)")
    is_run_dir = (path / artifacts.METRICS).is_file() or (path / artifacts.FINAL_MODEL).is_dir()
    if path.is_dir() and is_run_dir:
        if (path / artifacts.FINAL_MODEL / "config.json").is_file():
            final = path / artifacts.FINAL_MODEL
            return str(final), f"--model {model} is a run directory: using {final}"
        saved = [c / "config.json" for c in artifacts.checkpoints(path) if (c / "config.json").is_file()]
        advice = (f"pass one of its checkpoints, e.g. --model {saved[-1].parent}" if saved
                  else "it holds no checkpoint either: pass a model directory, .gguf file or Hub id")
        raise ModelLoadError(f"--model {model}: a run directory without final_model/ (the run did not finish); {advice}")
    return str(path), None


# A folder's tokenizer is one of these (fast, slow with its vocabulary, or sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_path(model: str) -> None:
    """Fail early, with a clear line, on a local path that cannot hold a model."""
    if not is_local_path(model):
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--model {model}: no such file or directory")
    if path.suffix == ".gguf":
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"--model {model}: not a GGUF file (it does not start with the GGUF magic bytes)")
        if problem := gguf_problem(path):
            raise ModelLoadError(f"--model {model}: {problem}")
    elif path.is_file():
        raise ModelLoadError(f"--model {model}: a file, not a model: pass the folder that holds it (config.json, the "
                             "weights and the tokenizer's files), or a .gguf file")
    elif not (path / "config.json").is_file():
        raise ModelLoadError(f"--model {model}: the directory holds no model (no config.json)")
    elif not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"--model {model}: the directory holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                             "save the tokenizer beside the model (tokenizer.save_pretrained)")


def load_model(model: str, tokenizer, trust_remote_code: bool = False, token: str | None = None,
               device: torch.device | str | None = None) -> torch.nn.Module:
    """Weights in fp32 on `device` (None: torch's default device): the Trainer's mixed precision keeps fp32 master
    weights and autocasts."""
    if model == SMOKE_MODEL:
        torch.manual_seed(0)
        return LlamaForCausalLM(smoke_config(tokenizer)).to(device)
    if model == LLAMA_3_2_1B_RANDOM:
        torch.manual_seed(0)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return LlamaForCausalLM(llama_3_2_1b_config())  # initialised where it runs: on a CPU ~10 s
    check_model_path(model)
    path = Path(model)
    try:
        if path.suffix == ".gguf":
            gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            return _as_plain_model(gguf_model).to(device)
        # Hub weights only as safetensors (no pickle); a local folder may hold .bin, which transformers
        # reads with torch.load(weights_only=True).
        loaded = AutoModelForCausalLM.from_pretrained(
            model,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            token=token,
            use_safetensors=None if path.is_dir() else True,
        )
        return loaded.to(device)
    except Exception as err:
        raise ModelLoadError(explain_load_failure(model, err)) from err


def _as_plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """GGUF tensors arrive de-quantized to fp32, yet the model stays flagged as quantized and the Trainer would
    refuse to fine-tune it. Drop the flag (and the config entry, so save_pretrained writes a plain model)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def explain_load_failure(model: str, err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    if Path(model).exists():
        return f"--model {model}: could not load it ({hub.first_line(err, 300)})"
    if hub.offline_reason() is None and any(k in text for k in ("gated", "401", "403", "restricted", "awaiting a review")):
        return (
            f"--model {model}: the model is gated. Accept its licence on https://huggingface.co/{model}, then run "
            "`hf auth login` (or pass --token), or pass a local directory or .gguf file with --model."
        )
    return hub.failure_message(f"--model {model}", err, [hub.MODEL_FIX])


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
