"""The answer-token loss (common/engine/loss.py) is the model's own loss, value and gradients, computed with less work."""

import copy

import pytest
import torch

from common.config import ConfigError, EngineArguments
from common.data import IGNORE_INDEX
from common.engine import plan as plan_module
from common.engine.loss import answer_token_loss, use_answer_token_loss
from common.engine.plan import plan_batch
from common.models import load_model, load_tokenizer


def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 200, (4, 20), generator=generator)
    labels = input_ids.clone()
    labels[:, :8] = IGNORE_INDEX  # the context
    labels[0, 15:] = IGNORE_INDEX  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 15:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    own = load_model("smoke", load_tokenizer("smoke"))
    own.train()
    answers = copy.deepcopy(own)
    use_answer_token_loss(answers)
    return own, answers


@pytest.mark.parametrize("half", [None, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 70])
def test_loss_and_gradients_equal_the_models_own(models, half, num_items):
    """fp32 and bf16 autocast, divided by the step's answer tokens (num_items_in_batch) or by the batch's own."""
    own, answers = models
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    losses = []
    for model in (own, answers):
        model.zero_grad()
        with torch.autocast("cpu", dtype=half, enabled=half is not None):
            loss = model(**batch(), **kwargs).loss
        loss.backward()
        losses.append(loss)
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
    for p_own, p_answers in zip(own.parameters(), answers.parameters()):
        torch.testing.assert_close(p_answers.grad, p_own.grad, rtol=1e-5, atol=1e-7)


def test_without_labels_the_model_returns_its_own_logits(models):
    """Evaluation and generation call the model without labels: the model's forward, every position's logits."""
    own, answers = models
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(answers(**inputs).logits, own(**inputs).logits)
    assert own(**batch()).logits is not None and answers(**batch()).logits is None


def test_chunks_sum_to_the_whole():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 8, generator=generator, requires_grad=True)
    weight = torch.randn(30, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 30, (2, 6), generator=generator)
    labels[0, :3] = IGNORE_INDEX
    reference = torch.nn.functional.cross_entropy((hidden @ weight.T)[:, :-1].reshape(-1, 30),
                                                  labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(reference, (hidden, weight))
    for chunk_bytes in (4 * 30 * 1, 4 * 30 * 3, 1 << 30):  # 1 row, 3 rows, all rows per chunk
        loss = answer_token_loss(hidden, weight, labels, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(loss, reference)
        for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), grads):
            torch.testing.assert_close(got, want)


def test_a_batch_without_answer_tokens_has_zero_loss_and_zero_gradients():
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss = answer_token_loss(hidden, weight, labels, num_items_in_batch=3)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_models_that_transform_their_logits_are_refused():
    """Gemma soft-caps its logits: projecting the hidden states alone would train it on another loss."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    with pytest.raises(ConfigError, match="--loss full-logits"):
        use_answer_token_loss(Gemma2ForCausalLM(config))


def test_liger_fused_loss_needs_liger():
    EngineArguments(loss="answer-chunks", liger=False).validate()
    with pytest.raises(ConfigError, match="--loss liger-fused"):
        EngineArguments(loss="liger-fused", liger=False).validate()
    with pytest.raises(ConfigError, match="--loss must be one of"):
        EngineArguments(loss="fused").validate()


def test_length_groups_cut_the_padding_of_batches_whose_rows_differ_much():
    from common.engine.plan import length_groups

    similar = [40] * 120 + [44] * 8
    assert length_groups(similar) == [(sorted(range(128), key=lambda r: -similar[r]), 44)]  # not worth a pass
    lengths = [60] * 112 + [240] * 16  # a mega-batch's longest step: a few long rows, many shorter ones
    groups = length_groups(lengths)
    assert sorted(row for rows, _ in groups for row in rows) == list(range(128))  # every row once
    assert all(max(lengths[r] for r in rows) == length for rows, length in groups)
    assert [(len(rows), length) for rows, length in groups] == [(16, 240), (112, 60)]
    assert length_groups(lengths, split_cost=10**6) == [(groups[0][0] + groups[1][0], 240)]


@pytest.mark.parametrize("half", [None, torch.bfloat16])
def test_a_batch_split_by_length_has_the_loss_and_gradients_of_the_whole(models, half, monkeypatch):
    """The same rows in two decoder passes, each padded to its own longest: the same loss, the same gradients."""
    own, answers = models
    generator = torch.Generator().manual_seed(1)
    lengths = [30] * 2 + [8] * 14
    input_ids = torch.randint(5, 200, (16, 30), generator=generator)
    attention_mask = torch.tensor([[1] * n + [0] * (30 - n) for n in lengths])
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    monkeypatch.setattr(plan_module, "SPLIT_COST_POSITIONS", 16)
    monkeypatch.setattr(plan_module, "GROUP_ROWS", 2)
    assert [len(rows) for rows, _ in plan_module.right_padded_groups(attention_mask)] == [2, 14]
    assert plan_batch(attention_mask, labels).decoder_positions == 2 * 30 + 14 * 8
    losses = []
    for model in (own, answers):
        model.zero_grad()
        with torch.autocast("cpu", dtype=half, enabled=half is not None):
            loss = model(**inputs).loss
        loss.backward()
        losses.append(loss)
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5 if half is None else 1e-2)
    for p_own, p_answers in zip(own.parameters(), answers.parameters()):
        if half is None:
            torch.testing.assert_close(p_answers.grad, p_own.grad, rtol=1e-4, atol=1e-6)
        else:  # bf16's rounding differs between the shapes
            assert torch.linalg.vector_norm(p_answers.grad - p_own.grad) <= 0.05 * torch.linalg.vector_norm(p_own.grad)


def test_a_split_batch_casts_the_output_projection_once_under_autocast(models, monkeypatch):
    """Each length group's loss keeps the bf16 head for the backward pass: one shared copy, not one per group."""
    _, answers = models
    lengths = [30] * 2 + [8] * 14
    input_ids = torch.randint(5, 200, (16, 30), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.tensor([[1] * n + [0] * (30 - n) for n in lengths])
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    monkeypatch.setattr(plan_module, "SPLIT_COST_POSITIONS", 16)
    monkeypatch.setattr(plan_module, "GROUP_ROWS", 2)
    head_shape = answers.get_output_embeddings().weight.shape
    saved_heads = set()

    def pack(tensor):
        if tensor.shape == head_shape and tensor.dtype == torch.bfloat16:
            saved_heads.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        answers(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                plan=plan_batch(attention_mask, labels))
    assert len(saved_heads) == 1


def test_a_sharded_model_runs_its_batches_whole(monkeypatch):
    """Under FSDP each pass through a layer gathers its parameters again: no split, and the checkpointing budget
    counts the whole batch."""
    import common.engine
    from common.config import EngineArguments
    from common.precision import resolve_precision

    lengths = [240] * 16 + [60] * 112
    mask = torch.tensor([[1] * n + [0] * (240 - n) for n in lengths])
    inputs = {"input_ids": torch.zeros(128, 240, dtype=torch.long), "attention_mask": mask,
              "labels": mask.masked_fill(mask == 0, IGNORE_INDEX), "plan": plan_batch(mask, mask)}
    assert inputs["plan"].decoder_positions == 16 * 240 + 112 * 60
    engine = common.engine.Engine(EngineArguments(), resolve_precision("fp32", on_cuda=False))
    model = torch.nn.Linear(1, 1)
    assert engine.before_forward(model, inputs)["plan"] is inputs["plan"]
    monkeypatch.setattr(common.engine, "_sharded", lambda model: True)  # what it finds in a model FSDP wrapped
    assert engine.before_forward(model, inputs)["plan"].decoder_positions == 128 * 240


def test_length_groups_keep_the_padding_multiple():
    """With --pad-to-multiple-of, each group is padded to a multiple of it too (never past the batch's width)."""
    from common.engine.plan import right_padded_groups

    lengths = [61] * 112 + [237] * 16
    mask = torch.tensor([[1] * n + [0] * (240 - n) for n in lengths])
    assert [length for _, length in right_padded_groups(mask)] == [237, 61]
    assert [length for _, length in right_padded_groups(mask, 16)] == [240, 64]
    assert [length for _, length in right_padded_groups(mask, 128)] == [240, 128]


def test_a_batch_is_grouped_once_on_the_host_when_collated(models, monkeypatch):
    """The collator makes the batch's plan; the forward follows it and groups nothing itself."""
    from common.data import PadToLongest
    from common.engine.plan import PlannedCollator

    _, answers = models
    calls = []
    original = plan_module.right_padded_groups
    monkeypatch.setattr(plan_module, "right_padded_groups", lambda *a: calls.append(1) or original(*a))
    features = [{"input_ids": list(range(5, 5 + n)), "labels": [IGNORE_INDEX] * 3 + list(range(8, 5 + n))}
                for n in (12, 9, 20, 7)]
    batch = PlannedCollator(PadToLongest(0))(features)
    assert len(calls) == 1 and batch["plan"].decoder_positions == 4 * 20
    answers(**batch).loss.backward()
    assert len(calls) == 1


def test_answer_positions_given_by_the_caller_give_the_same_loss():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 12, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)
    labels = torch.randint(0, 50, (3, 12), generator=generator)
    labels[:, :5] = IGNORE_INDEX
    answers = labels[:, 1:].reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)
    expected = answer_token_loss(hidden, weight, labels)
    assert answer_token_loss(hidden, weight, labels, answers=answers).item() == expected.item()
    assert answer_token_loss(hidden, weight, labels, chunk_bytes=4 * 50 * 7, answers=answers).item() == \
        pytest.approx(expected.item(), rel=1e-6)


def test_the_models_own_loss_gets_the_batch_without_its_plan(models):
    """--loss full-logits: the collator's plan is for the activation budget only; the model's forward never sees it,
    and its plan is one pass (only the answer-token loss splits a batch)."""
    from common.config import EngineArguments
    from common.data import PadToLongest
    from common.engine import Engine
    from common.precision import resolve_precision

    own, _ = models
    engine = Engine(EngineArguments(loss="full-logits"), resolve_precision("fp32", on_cuda=False))
    features = [{"input_ids": list(range(5, 5 + n)), "labels": [IGNORE_INDEX] * 3 + list(range(8, 5 + n))}
                for n in [40] * 2 + [6] * 30]
    batch = engine.collator(PadToLongest(0))(features)
    assert len(batch["plan"].passes) == 1 and batch["plan"].decoder_positions == 32 * 40
    inputs = engine.before_forward(own, batch)
    assert "plan" not in inputs and own(**inputs).loss.isfinite()


def test_the_plan_stays_on_the_host_through_accelerate_and_ddp():
    """accelerate's send_to_device and DDP's input copy move tensors, dataclasses and tuples to the GPU; the plan is
    none of them, so its index tensors reach the forward as the collator made them."""
    from accelerate.utils import send_to_device
    from torch.distributed.utils import _recursive_to

    mask = torch.tensor([[1] * n + [0] * (30 - n) for n in [30] * 2 + [8] * 14])
    plan = plan_batch(mask, mask)
    batch = {"attention_mask": mask, "plan": plan}
    assert send_to_device(batch, "cpu")["plan"] is plan
    assert _recursive_to(((), batch), torch.device("cpu"), False)[0][1]["plan"] is plan
