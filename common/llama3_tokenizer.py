"""Llama 3's own tokenizer, offline: built from the tiktoken BPE file that Meta's `llama-models` package ships
(`llama_models/llama3/tokenizer.model`), so the random-weight Llama-3.2-1B sees the real job's token lengths.

The split pattern, special tokens, BOS/EOS and post-processing are those of meta-llama/Llama-3.2-1B's tokenizer
(`llama_models/llama3/tokenizer.py`; the Hub's tokenizer.json); tests/test_llama3_tokenizer.py checks the ids
against tiktoken's own encoder."""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import tempfile
from pathlib import Path

INSTALL = "pip install llama-models==0.3.0"
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
BOS_ID = 128000  # = the BPE file's 128,000 ranks; the special tokens follow them
VOCAB_SIZE = 128256  # Llama-3.2-1B's embedding rows: 128,000 BPE tokens + 256 special tokens
# llama_models/llama3/tokenizer.py's Tokenizer.pat_str
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NAMED_SPECIAL_TOKENS = [
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]


class MissingLlama3Tokenizer(ImportError):
    """llama-models (or its tiktoken) is not installed, or lacks the tokenizer file; the message says how to fix it."""


def special_tokens() -> list[str]:
    """The 256 special tokens in id order (128000...128255), as llama_models/llama3/tokenizer.py lists them."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(NAMED_SPECIAL_TOKENS))]
    return NAMED_SPECIAL_TOKENS + reserved


def tokenizer_model_path() -> Path:
    """llama-models' tiktoken BPE file; never a silent substitute when it is missing."""
    try:
        import llama_models
        import tiktoken  # noqa: F401 - transformers' converter reads the file with it
    except ImportError as err:
        raise MissingLlama3Tokenizer(
            f"--model llama-3.2-1b-random tokenizes with Llama 3's tokenizer from Meta's llama-models package "
            f"({err.name or err} is not installed): {INSTALL}"
        ) from err
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise MissingLlama3Tokenizer(f"--model llama-3.2-1b-random: {path} is missing; {INSTALL}")
    return path


@functools.lru_cache(maxsize=1)
def converted_file(model_path: Path) -> Path:
    """The converted tokenizer's tokenizer.json. Converting takes ~3 s, so the file is kept in cache_dir() (the
    temporary directory where that is read-only) and read from there while its inputs stay the same (_fingerprint)."""
    name = f"llama3-tokenizer-{_fingerprint(model_path)}.json"
    folders = [cache_dir(), Path(tempfile.gettempdir())]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    backend, error = _convert(model_path), None
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f"{name}.{os.getpid()}.tmp"
            backend.save(str(partial))
            os.replace(partial, folder / name)  # never a half-written file for another process to read
            return folder / name
        except OSError as err:
            error = err
    raise error


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "piqa-finetune"


def _fingerprint(model_path: Path) -> str:
    """What the converted tokenizer depends on: the BPE file, the split pattern, the special tokens, this code, the
    converter's and the tokenizers library's versions."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(model_path.read_bytes())
    versions = [transformers.__version__, tokenizers.__version__]
    digest.update("\n".join([PATTERN, *special_tokens(), inspect.getsource(_convert), *versions]).encode())
    return digest.hexdigest()[:16]


def _convert(model_path: Path):
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(model_path), pattern=PATTERN, extra_special_tokens=special_tokens()
    ).converted()
    # The Hub's Llama-3.2-1B tokenizer.json: byte-level offsets, then <|begin_of_text|> before every sequence.
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]
        ),
    ])
    return backend


def llama3_tokenizer():
    """Llama-3.2-1B's tokenizer: prepends <|begin_of_text|> (128000), eos <|end_of_text|> (128001), which also pads
    (Llama 3 ships no pad token; padding is masked out). Raises MissingLlama3Tokenizer without llama-models."""
    from transformers import PreTrainedTokenizerFast

    # The Hub's config asks for clean_up_tokenization_spaces, which transformers 5 ignores for BPE: decode keeps spaces.
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(converted_file(tokenizer_model_path())), bos_token=BOS,
                                        eos_token=EOS, model_max_length=131072)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
