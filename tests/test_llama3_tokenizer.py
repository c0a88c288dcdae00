"""common/llama3_tokenizer.py: Llama 3's tokenizer for llama-3.2-1b-random, checked against tiktoken's own encoder
built as llama_models/llama3/tokenizer.py builds it (offline, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from common import llama3_tokenizer as llama3
from common.data import IGNORE_INDEX, read_release_split, tokenize_for_training
from common.models import LLAMA_3_2_1B_RANDOM, ModelLoadError, llama_3_2_1b_config, load_tokenizer
from common.prompts import format_choice_prompt, format_context, format_continuation

SAMPLE = Path(__file__).resolve().parent.parent / "common" / "sample"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(LLAMA_3_2_1B_RANDOM)


@pytest.fixture(scope="module")
def meta():
    """Meta's reference: llama_models' own Tokenizer, whose .model is a tiktoken.Encoding."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(llama3.tokenizer_model_path())


def sample_examples():
    return read_release_split(SAMPLE, "train") + read_release_split(SAMPLE, "validation")


def sample_texts() -> list[str]:
    """Every text of the sample, alone and as training and evaluation format them."""
    texts = []
    for e in sample_examples():
        texts += [e.goal, e.sol1, e.sol2, format_context(e.goal), format_continuation(e.sol1),
                  format_context(e.goal) + format_continuation(e.correct_solution),
                  format_choice_prompt(e.goal, e.sol1, e.sol2)]
    return texts


def test_the_known_example(tokenizer):
    text = "Question: How do I keep my bread fresh longer?\nAnswer: Store it in a paper bag in the freezer."
    ids = [128000, 14924, 25, 2650, 656, 358, 2567, 856, 16385, 7878, 5129, 5380, 16533, 25, 9307, 433, 304, 264,
           5684, 9145, 304, 279, 50685, 13]
    assert tokenizer(text)["input_ids"] == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_matches_tiktoken_on_every_sample_text(tokenizer, meta):
    texts = sample_texts()
    assert len(texts) == 7 * 120
    ours = tokenizer(texts)["input_ids"]
    for text, ids in zip(texts, ours):
        assert ids == [128000] + meta.model.encode(text, disallowed_special=()), text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_training_sequences_are_bos_prompt_answer_eos(tokenizer, meta):
    for e in sample_examples():
        context, answer = format_context(e.goal), format_continuation(e.correct_solution)
        features = tokenize_for_training(e, tokenizer, max_length=512)
        assert features["input_ids"] == [128000] + meta.model.encode(context + answer) + [128001]
        masked = features["labels"].count(IGNORE_INDEX)
        assert masked == 1 + len(meta.model.encode(context))  # BOS + the question: no loss there
        assert max(features["input_ids"]) < llama3.VOCAB_SIZE


def test_special_tokens_are_llama_3s(tokenizer, meta):
    assert len(tokenizer) == llama3.VOCAB_SIZE == meta.n_words == llama_3_2_1b_config().vocab_size  # every id embeds
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in llama3.special_tokens()} == meta.special_tokens
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|begin_of_text|>", 128000)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|end_of_text|>", 128001)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # as load_tokenizer pads real Llama 3 models
    assert tokenizer.convert_ids_to_tokens([128009, 128255]) == ["<|eot_id|>", "<|reserved_special_token_245|>"]
    assert tokenizer("<|eot_id|>")["input_ids"] == [128000, 128009]  # one token, as Meta's allowed_special="all"
    assert llama3.PATTERN == meta.pat_str


def test_decodes_what_generation_returns(tokenizer, meta):
    """Evaluation's generate method decodes new tokens, finished rows padded with EOS, skipping special tokens."""
    rows = [meta.model.encode(" 1\nGoal:") + [128001, 128001], meta.model.encode(" 2") + [128001] * 4]
    assert tokenizer.batch_decode(rows, skip_special_tokens=True) == [" 1\nGoal:", " 2"]
    assert tokenizer.decode([128000, 9906, 128001]) == "<|begin_of_text|>Hello<|end_of_text|>"


def test_saved_with_a_model_it_reloads_the_same(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)  # as a run's checkpoints and final_model/ hold it
    again = AutoTokenizer.from_pretrained(tmp_path)
    texts = sample_texts()[:50]
    assert again(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (128000, 128001, 128001)


@pytest.mark.parametrize("package", ["llama_models", "tiktoken"])
def test_missing_package_says_how_to_install(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(LLAMA_3_2_1B_RANDOM)
    message = str(err.value)
    assert "\n" not in message and "pip install llama-models==0.3.0" in message and package in message


def test_smoke_keeps_the_byte_level_tokenizer():
    ids = load_tokenizer("smoke")("héllo", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("héllo".encode())


def test_the_cached_conversion_is_the_conversion(tmp_path, monkeypatch):
    """The converted tokenizer is kept in the cache directory; read back, it is the same tokenizer."""
    from tokenizers import Tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    llama3.converted_file.cache_clear()
    try:
        cached_file = llama3.converted_file(llama3.tokenizer_model_path())
    finally:
        llama3.converted_file.cache_clear()
    assert cached_file.parent == tmp_path / "piqa-finetune" and not list(tmp_path.rglob("*.tmp"))
    converted, cached = llama3._convert(llama3.tokenizer_model_path()), Tokenizer.from_file(str(cached_file))
    assert cached.to_str() == converted.to_str()
    texts = sample_texts()
    assert [e.ids for e in cached.encode_batch(texts)] == [e.ids for e in converted.encode_batch(texts)]


def test_a_gguf_tokenizer_is_the_files_own_whatever_shares_its_folder(tmp_path, monkeypatch):
    """transformers prefers a tokenizer.json beside a .gguf to the GGUF's vocabulary: the file is loaded from a
    folder of its own, so a model's tokenizer always comes with it."""
    import transformers

    from common import models

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "tokenizer.json").write_text("{}")  # another model's, say a run's final_model/
    seen = {}

    class Tokenizer:
        pad_token, eos_token, eos_token_id, bos_token_id = "<pad>", "</s>", 2, 1

        def __call__(self, text):
            return {"input_ids": [1, 5]}

    def from_pretrained(folder, gguf_file=None, **kwargs):
        seen["files"] = sorted(p.name for p in Path(folder).iterdir())
        seen["target"] = (Path(folder) / gguf_file).resolve()
        return Tokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    models.load_tokenizer(str(tmp_path / "model.gguf"))
    assert seen == {"files": ["model.gguf"], "target": (tmp_path / "model.gguf").resolve()}


def test_a_tokenizer_that_ends_every_text_with_eos_is_refused(monkeypatch):
    """The prompt and the answer are split by encoding the prompt alone: an EOS after it would end the sequence there
    (and take the answer's first token's place)."""
    import transformers

    from common import models

    class AppendsEos:
        pad_token, eos_token, eos_token_id, bos_token_id = None, "</s>", 2, 1

        def __call__(self, text):
            return {"input_ids": [1, 5, 2]}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: AppendsEos())
    with pytest.raises(ModelLoadError, match="ends every text with its end-of-sequence token"):
        models.load_tokenizer("some-org/appends-eos")
