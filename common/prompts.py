"""The one prompt format that training and evaluation share (lm-evaluation-harness's `piqa` task), and its tokenisation."""

from collections.abc import Sequence


def format_context(goal: str) -> str:
    return f"Question: {goal}\nAnswer:"


def format_continuation(solution: str) -> str:
    return f" {solution}"


def format_choice_prompt(goal: str, sol1: str, sol2: str) -> str:
    """Structured prompt for the generate method: lists both solutions, ends `Answer: Solution`."""
    return (
        f"Goal: {goal}\n"
        f"Solution 1: {sol1}\n"
        f"Solution 2: {sol2}\n"
        "Which solution achieves the goal? Answer with 1 or 2.\n"
        "Answer: Solution"
    )


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's `_encode_pair` for causal models: encode context+continuation whole, split at len(context).

    Special tokens follow the tokenizer's own default (the harness passes none unless `add_bos_token` is given):
    Llama-3 tokenizers prepend <|begin_of_text|>, SmolLM2's adds nothing.
    """
    return encode_pairs(tokenizer, [(context, continuation)])[0]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    moved = []
    for context, continuation in pairs:
        # Trailing context whitespace moves to the continuation, as in the harness (keeps word-boundary tokens).
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    whole_ids = tokenizer([c + x for c, x in moved])["input_ids"]
    context_ids = tokenizer([c for c, _ in moved])["input_ids"]
    return [(list(ctx), list(whole[len(ctx) :])) for ctx, whole in zip(context_ids, whole_ids)]
