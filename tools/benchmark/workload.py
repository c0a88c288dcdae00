"""The benchmark's data: PIQA's token-length histograms (piqa_lengths.json, counts only) and synthetic examples
that follow them, for training (token ids) and for evaluation (made-up words, one token each)."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

LENGTHS_PATH = Path(__file__).parent / "piqa_lengths.json"
PIQA_TRAIN_EXAMPLES = 16_113
PIQA_VALID_EXAMPLES = 1_838
LENGTHS_ABOUT = {
    "about": (
        "Token-length histograms (length -> number of examples) of PIQA, tokenised as the experiment does; "
        "no PIQA text is stored. 'train_sequence' is common.data.tokenize_for_training's input: BOS + "
        "'Question: {goal}\\nAnswer:' + ' {correct solution}' + EOS (one BOS counted, as Llama-3's tokenizer "
        "prepends one); 'train_context' its masked part (BOS + "
        "context), 'train_answer' the part with a loss. 'eval_context' is 'Question: {goal}\\nAnswer:' and "
        "'eval_solution' ' {solution}' for both solutions, without special tokens (common.evaluation's inputs)."
    ),
    "note": (
        "The lengths are those of the tokenizer named in 'tokenizer'. With Llama 3's (--tokenizer llama-3.2-1b-random, "
        "the default), the synthetic batches have the real Llama-3.2-1B job's token counts: tokens/s, steps/s and "
        "epoch times carry over."
    ),
}


# --- PIQA's length distribution ---------------------------------------------------------------------------------


def measure_lengths(tokenizer_name: str, data_dir: str) -> dict[str, Any]:
    """Token-length histograms of PIQA examples as the experiment tokenises them; counts only, never text.
    `tokenizer_name` is a --model value (llama-3.2-1b-random: Llama 3's), a tokenizer directory or a .gguf file."""
    from common.data import read_release_split
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    examples = read_release_split(Path(data_dir), "validation")
    counts = count_tokens(tokenizer, examples)
    sequence = counts["train_sequence"]
    return {
        **LENGTHS_ABOUT,
        "tokenizer": describe_tokenizer(tokenizer_name, tokenizer),
        "command": f"python3 -m tools.benchmark --measure-lengths --tokenizer {tokenizer_name} --data-dir {data_dir}",
        "source": f"PIQA validation split, {len(examples)} examples "
                  f"({Path(data_dir).name}: valid.jsonl + valid-labels.lst)",
        "examples": len(examples),
        "context_share": round(sum(counts["train_context"]) / sum(sequence), 4),
        "summary": {key: summary(counts[key]) for key in ("train_sequence", "eval_context", "eval_solution")},
        **{key: histogram(values) for key, values in counts.items()},
    }


def describe_tokenizer(tokenizer_name: str, tokenizer) -> str:
    """Which tokenizer measured the lengths, with the versions that built it."""
    from importlib.metadata import version

    from common.models import LLAMA_3_2_1B_RANDOM

    if tokenizer_name != LLAMA_3_2_1B_RANDOM:
        return f"{tokenizer_name} ({len(tokenizer):,} tokens)"
    return (f"Llama 3's tokenizer as meta-llama/Llama-3.2-1B has it ({len(tokenizer):,} tokens: 128,000 BPE + 256 "
            f"special; <|begin_of_text|> prepended), built by common/llama3_tokenizer.py from "
            f"llama_models/llama3/tokenizer.model of llama-models=={version('llama-models')} "
            f"(tiktoken {version('tiktoken')}, transformers {version('transformers')})")


def count_tokens(tokenizer, examples: list) -> dict[str, list[int]]:
    """Per example: the training sequence, its masked context and its answer; the evaluation's context and
    both solutions (the keys of piqa_lengths.json's histograms, in its order)."""
    from common.data import IGNORE_INDEX, tokenize_for_training
    from common.prompts import format_context, format_continuation

    # Llama-3's tokenizer prepends <|begin_of_text|>; count one BOS where this tokenizer adds none itself.
    ids = tokenizer("a")["input_ids"]
    bos = 0 if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else 1
    keys = ("train_sequence", "train_context", "train_answer", "eval_context", "eval_solution")
    counts: dict[str, list[int]] = {key: [] for key in keys}

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for example in examples:
        features = tokenize_for_training(example, tokenizer, max_length=10**9)
        masked = sum(1 for label in features["labels"] if label == IGNORE_INDEX)
        counts["train_sequence"].append(len(features["input_ids"]) + bos)
        counts["train_context"].append(masked + bos)
        counts["train_answer"].append(len(features["input_ids"]) - masked)
        counts["eval_context"].append(length(format_context(example.goal)))
        for solution in (example.sol1, example.sol2):
            counts["eval_solution"].append(length(format_continuation(solution)))
    return counts


def histogram(values: list[int]) -> dict[str, int]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def summary(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(values), 3),
        "median": statistics.median(values),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "max": ordered[-1],
    }


def load_lengths(path: Path = LENGTHS_PATH) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def sample_lengths(histogram: dict[str, int], n: int, rng: random.Random) -> list[int]:
    lengths = [int(k) for k in histogram]
    return rng.choices(lengths, weights=list(histogram.values()), k=n)


def mean_length(histogram: dict[str, int]) -> float:
    return sum(int(k) * v for k, v in histogram.items()) / sum(histogram.values())


# --- Synthetic examples with those lengths ----------------------------------------------------------------------


def synthetic_features(n: int, vocab_size: int, lengths: dict[str, Any], seed: int) -> list[dict]:
    """`n` training features with PIQA's lengths: random token ids, the loss on the last (answer) part only."""
    from common.data import IGNORE_INDEX

    rng = random.Random(seed)
    share = float(lengths["context_share"])
    low, high = (1000, vocab_size - 1000) if vocab_size > 4000 else (0, vocab_size - 1)
    features = []
    for length in sample_lengths(lengths["train_sequence"], n, rng):
        ids = [rng.randint(low, high) for _ in range(length)]
        masked = min(length - 1, max(1, round(share * length)))
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * masked + ids[masked:]})
    return features


def word_tokenizer(words: int = 4000):
    """A real tokenizer with one token per word ("Question:", "Answer:", "w17"...) and a BOS, like Llama-3's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2, "<|unk|>": 3, "Question:": 4, "Answer:": 5}
    vocab.update({f"w{i}": 6 + i for i in range(words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")


def synthetic_examples(n: int, lengths: dict[str, Any], seed: int, words: int = 4000) -> list:
    """PIQA-shaped examples of made-up words: with `word_tokenizer`, PIQA's token counts (BOS aside)."""
    from common.data import PiqaExample

    rng = random.Random(seed)
    contexts = sample_lengths(lengths["eval_context"], n, rng)
    solutions = sample_lengths(lengths["eval_solution"], 2 * n, rng)

    def text(count: int) -> str:
        return " ".join(f"w{rng.randrange(words)}" for _ in range(max(1, count)))

    # "Question:" and "Answer:" are a token each, so the goal gets the context's remaining tokens.
    return [
        PiqaExample(id=f"synthetic-{i}", goal=text(contexts[i] - 2), sol1=text(solutions[2 * i]),
                    sol2=text(solutions[2 * i + 1]), label=rng.randrange(2))
        for i in range(n)
    ]
