"""common/evaluation.py on a tiny random Llama and an offline byte-level tokenizer (CPU, no network)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common.data import PiqaExample
from common.evaluation import evaluate, parse_choice, score_loglik, write_predictions
from common.prompts import encode_pair, format_context, format_continuation


def make_tokenizer(merges: list[tuple[str, str]] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE, one token per byte unless `merges` says otherwise; prepends <bos> like Llama-3's tokenizer.

    Token id 0 is the byte "2", so a model whose logits are all equal greedily generates "2".
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    alphabet.remove("2")
    alphabet.insert(0, "2")
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for a, b in merges or []:
        vocab[a + b] = len(vocab)
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges or [])))
    # No regex split when merges are given, so a merge can straddle the context/continuation boundary.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=merges is None)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def make_model(tokenizer, seed: int = 0, uniform: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).float()
    if uniform:  # every next-token distribution is uniform: log-prob of each token is exactly -log(vocab)
        with torch.no_grad():
            model.lm_head.weight.zero_()
    return model.eval()


EXAMPLES = [
    PiqaExample("t-1", "How do I open a jar?", "Twist the lid.", "Bake the jar for an hour at high heat.", 0),
    PiqaExample("t-2", "Keep bread fresh", "Leave it in the rain.", "Store it in a sealed bag.", 1),
    PiqaExample("t-3", "Cool soup quickly", "Stir it in a pot set in cold water.", "Cover it.", 0),
    PiqaExample("t-4", "Dry wet shoes", "Stuff them with newspaper. ", "Fill them with water", 0),
    PiqaExample("t-5", "x", "a", "bb", 1),
    PiqaExample("t-6", "Sharpen a pencil with nothing but a rough stone", "Rub the tip on it.", "Throw it.", 0),
] * 3  # 18 examples: more than one batch at batch_size=16, and repeats


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


def direct_logprob_sum(model, tokenizer, context: str, continuation: str) -> float:
    """One unbatched, unpadded forward over context+continuation; sum the continuation tokens' log-probs."""
    context_ids = tokenizer(context)["input_ids"]
    whole_ids = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole_ids])).logits[0]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[t - 1, whole_ids[t]].item() for t in range(len(context_ids), len(whole_ids)))


def test_loglik_sums_equal_direct_per_token_computation(model, tokenizer):
    scores = score_loglik(model, tokenizer, EXAMPLES[:6], batch_size=4)
    for example, pair in zip(EXAMPLES[:6], scores):
        for solution, score in zip((example.sol1, example.sol2), pair):
            expected = direct_logprob_sum(model, tokenizer, format_context(example.goal), format_continuation(solution))
            assert score == pytest.approx(expected, abs=1e-4)


def test_batch_size_and_tokenizer_padding_side_do_not_change_scores(model, tokenizer):
    one_at_a_time = score_loglik(model, tokenizer, EXAMPLES, batch_size=1)
    for padding_side in ("left", "right"):
        tokenizer.padding_side = padding_side
        batched = score_loglik(model, tokenizer, EXAMPLES, batch_size=16)
        assert tokenizer.padding_side == padding_side  # never changed behind the caller's back
        for a, b in zip(one_at_a_time, batched):
            assert a == pytest.approx(b, abs=1e-4)


def test_logits_budget_splits_batches_without_changing_scores(model, tokenizer, monkeypatch):
    from common import evaluation

    whole = score_loglik(model, tokenizer, EXAMPLES, batch_size=16)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    longest_solution_tokens = max(len(tokenizer(" " + s)["input_ids"]) for e in EXAMPLES for s in (e.sol1, e.sol2))
    budget_bytes = 2 * 2 * longest_solution_tokens * vocab_size * 4  # two examples' logits at most
    calls = []
    real_score_batch = evaluation._score_batch

    def recording_score_batch(m, sequences, *args):
        calls.append(len(sequences) * max(len(continuation) for _, continuation in sequences) * vocab_size * 4)
        return real_score_batch(m, sequences, *args)

    monkeypatch.setattr(evaluation, "_score_batch", recording_score_batch)
    split = score_loglik(model, tokenizer, EXAMPLES, batch_size=16, logits_bytes=budget_bytes)
    assert len(calls) > 1 and max(calls) <= budget_bytes
    for a, b in zip(whole, split):
        assert a == pytest.approx(b, abs=1e-4)


def test_acc_norm_divides_by_solution_characters_without_the_leading_space(tokenizer):
    # Uniform model: log-prob sum = -(tokens) * log(V), one token per byte, plus one for the leading space.
    # acc picks the shorter sol1. Per character of the solution, the longer sol2 wins (-9/8 vs -3/2 * log V);
    # dividing by len(" " + solution) instead would tie (-1 each) and pick sol1.
    uniform = make_model(tokenizer, uniform=True)
    example = PiqaExample("n-1", "Pick one", "ab", "abcdefgh", 1)
    result = evaluate(uniform, tokenizer, [example])
    record = result.predictions[0]
    log_vocab = math.log(len(tokenizer))
    assert record["logprob_sum"] == pytest.approx([-3 * log_vocab, -9 * log_vocab], rel=1e-5)
    assert record["logprob_per_char"] == pytest.approx([-3 / 2 * log_vocab, -9 / 8 * log_vocab], rel=1e-5)
    assert (record["prediction"], record["prediction_norm"]) == (0, 1)
    assert (result.acc_pct, result.acc_norm_pct) == (0.0, 100.0)


def test_ties_go_to_the_first_solution_like_numpy_argmax(tokenizer):
    uniform = make_model(tokenizer, uniform=True)
    result = evaluate(uniform, tokenizer, [PiqaExample("tie", "Pick one", "abc", "xyz", 1)])
    assert (result.predictions[0]["prediction"], result.predictions[0]["prediction_norm"]) == (0, 0)


def test_encode_pair_encodes_whole_then_splits_like_the_harness():
    # With a ":" + " " merge, "Answer:" + " x" encodes whole as [..., ": ", "x"]; the continuation is what follows
    # the context's token count (just "x"), not the separate encoding of " x".
    tokenizer = make_tokenizer(merges=[(":", "Ġ")])
    context_ids, continuation_ids = encode_pair(tokenizer, "Answer:", " x")
    whole_ids = tokenizer("Answer: x")["input_ids"]
    assert context_ids == tokenizer("Answer:")["input_ids"]
    assert continuation_ids == whole_ids[len(context_ids) :] == tokenizer.convert_tokens_to_ids(["x"])
    # Trailing context whitespace moves to the continuation.
    assert encode_pair(tokenizer, "Answer: ", "x") == encode_pair(tokenizer, "Answer:", " x")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", 0),
        ("2", 1),
        (" 2", 1),
        (" 1.", 0),
        ("2.", 1),
        ("Solution 2", 1),
        (" solution 1 is better", 0),
        (": 2", 1),
        ("12", None),
        ("2nd", None),
        ("2é", None),  # a letter of any script
        ("1\u0663", None),  # Arabic-Indic digit three
        ("3", None),
        ("garbage", None),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_generate_counts_unparseable_answers_as_wrong(tokenizer, model):
    result = evaluate(model, tokenizer, EXAMPLES, method="generate", batch_size=4)
    records = result.predictions
    assert result.method == "generate" and result.acc_norm_pct is None
    assert result.n_examples == len(records) == len(EXAMPLES)
    failures = sum(r["prediction"] is None for r in records)
    assert result.parse_failure_pct == pytest.approx(100 * failures / len(records))
    assert result.acc_pct == pytest.approx(100 * sum(r["prediction"] == r["label"] for r in records) / len(records))
    assert all(r["prediction"] == parse_choice(r["generated_text"]) for r in records)


def test_generate_parses_and_scores_a_clean_answer(tokenizer):
    # A uniform model greedily emits token 0, the byte "2": one new token parses as solution 2 (label 1) ...
    uniform = make_model(tokenizer, uniform=True)
    result = evaluate(uniform, tokenizer, EXAMPLES, method="generate", batch_size=5, max_new_tokens=1)
    assert {r["generated_text"] for r in result.predictions} == {"2"}
    assert result.parse_failure_pct == 0.0
    labels_1_pct = 100 * sum(e.label == 1 for e in EXAMPLES) / len(EXAMPLES)
    assert result.acc_pct == pytest.approx(labels_1_pct)
    # ... and two new tokens, "22", are unparseable: every example fails and counts as wrong.
    result = evaluate(uniform, tokenizer, EXAMPLES, method="generate", batch_size=5, max_new_tokens=2)
    assert (result.parse_failure_pct, result.acc_pct) == (100.0, 0.0)


def test_no_example_skipped_and_records_in_input_order(model, tokenizer):
    result = evaluate(model, tokenizer, EXAMPLES, batch_size=4)
    assert result.n_examples == len(result.predictions) == len(EXAMPLES)
    assert [r["id"] for r in result.predictions] == [e.id for e in EXAMPLES]
    assert [r["label"] for r in result.predictions] == [e.label for e in EXAMPLES]


def test_model_mode_is_restored(tokenizer):
    trained = make_model(tokenizer)
    trained.train()
    evaluate(trained, tokenizer, EXAMPLES[:3], method="loglik")
    assert trained.training
    evaluate(trained, tokenizer, EXAMPLES[:3], method="generate", max_new_tokens=2)
    assert trained.training
    trained.eval()
    evaluate(trained, tokenizer, EXAMPLES[:3])
    assert not trained.training


def test_metrics_keys_and_units(model, tokenizer):
    loglik = evaluate(model, tokenizer, EXAMPLES[:6])
    assert set(loglik.metrics()) == {"acc_pct", "acc_norm_pct", "n_examples", "eval_seconds"}
    assert 0.0 <= loglik.acc_pct <= 100.0
    generate = evaluate(model, tokenizer, EXAMPLES[:6], method="generate", max_new_tokens=2)
    assert set(generate.metrics("eval_gen_")) == {
        "eval_gen_acc_pct",
        "eval_gen_parse_failure_pct",
        "eval_gen_n_examples",
        "eval_gen_eval_seconds",
    }


def test_autocast_bfloat16_runs_and_stays_close(model, tokenizer):
    full = score_loglik(model, tokenizer, EXAMPLES[:6])
    autocast = score_loglik(model, tokenizer, EXAMPLES[:6], autocast_dtype=torch.bfloat16)
    for a, b in zip(full, autocast):
        assert a == pytest.approx(b, rel=0.05)


def test_wrapped_model(model, tokenizer):
    wrapped = torch.nn.DataParallel(model)  # on CPU this only wraps; evaluate must see through it
    assert evaluate(wrapped, tokenizer, EXAMPLES[:6]).predictions == evaluate(model, tokenizer, EXAMPLES[:6]).predictions


def test_write_predictions(tmp_path, model, tokenizer):
    result = evaluate(model, tokenizer, EXAMPLES[:4])
    path = tmp_path / "out" / "predictions.jsonl"
    write_predictions(path, result)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in lines] == [e.id for e in EXAMPLES[:4]]
    assert set(lines[0]) == {"method", "id", "label", "prediction", "prediction_norm", "logprob_sum", "logprob_per_char"}


def test_bad_arguments(model, tokenizer):
    with pytest.raises(ValueError, match="method"):
        evaluate(model, tokenizer, EXAMPLES, method="mc")
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, tokenizer, [])


def test_the_answer_token_loss_leaves_evaluation_its_logits_to_keep(monkeypatch):
    """The loss's adapter forward stands before the model's own; evaluation must still ask for the answer
    positions' logits only (without it, every position's logits: the 22 GiB card's zero-shot pass ran out)."""
    import functools

    from common.engine.loss import use_answer_token_loss
    from common.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("smoke")
    model = load_model("smoke", tokenizer)
    use_answer_token_loss(model)
    kept = []
    own_forward = type(model).forward

    @functools.wraps(own_forward)
    def spy(self, *args, **kwargs):
        kept.append(kwargs.get("logits_to_keep"))
        return own_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    examples = [PiqaExample("t-1", "How do I open a jar?", "Twist the lid.", "Bake the jar for an hour.", 0)]
    score_loglik(model.eval(), tokenizer, examples)
    assert kept and all(isinstance(k, int) and k > 0 for k in kept)
