"""Checkpointing within an activation budget: what a layer keeps is measured, the choice follows the batch's size,
and the gradients are those of checkpointing every layer."""

import pytest
import torch

from common.engine.budget import ActivationBudget, LayerActivations, activation_budget, decoder_layers
from common.memory import GIB
from common.models import load_model, load_tokenizer
from common.training import enable_checkpointing  # what the Trainer calls, with the arguments a run gives it


def tiny_model():
    torch.manual_seed(0)
    tokenizer = load_tokenizer("smoke")
    return load_model("smoke", tokenizer)


def test_the_probe_measures_what_a_layer_keeps_and_leaves_the_model_as_it_was():
    model = tiny_model()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    budget = activation_budget(model, 1.0, None)
    hidden = model.config.hidden_size
    assert budget.activations.checkpointed_bytes == 4 * hidden  # a float32 layer input per position
    # a layer keeps at least its input, its attention's q, k, v and output and its MLP's two intermediate tensors
    assert budget.activations.kept_bytes > 4 * (hidden * 5 + 2 * model.config.intermediate_size)
    half = activation_budget(tiny_model(), 1.0, torch.bfloat16).activations
    assert half.kept_bytes < budget.activations.kept_bytes  # bf16 autocast keeps its matmuls' operands in 2 bytes
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))


def test_layers_kept_shrink_as_batches_grow_until_every_layer_is_checkpointed():
    layers = [torch.nn.Linear(1, 1) for _ in range(16)]
    budget = ActivationBudget(layers, LayerActivations(kept_bytes=90_000, checkpointed_bytes=8_192), 6 * GIB)
    kept = [budget.layers_kept(p) for p in (100, 2_000, 5_000, 6_000, 20_000, 31_000, 10**6)]
    assert kept == sorted(kept, reverse=True) and kept[0] == 16 and kept[-1] == 0
    for positions, k in zip((100, 2_000, 5_000, 6_000, 20_000, 31_000), kept):
        held = positions * (k * 90_000 + (16 - k) * 8_192)
        assert held <= 6 * GIB or k == 0  # within the budget ...
        if k < 16:  # ... and one layer more would not be
            assert positions * ((k + 1) * 90_000 + (15 - k) * 8_192) > 6 * GIB
    assert budget.checkpointed_share(100) == 0.0 and budget.checkpointed_share(10**6) == 1.0


@pytest.mark.parametrize("kept_layers", [0, 1, 2])
def test_gradients_equal_those_of_checkpointing_every_layer(kept_layers):
    vocabulary = tiny_model().config.vocab_size
    input_ids = torch.randint(0, vocabulary, (4, 12), generator=torch.Generator().manual_seed(1))

    def train_step(kept_layers):
        model = tiny_model()
        model.train()
        enable_checkpointing(model)
        if kept_layers is not None:
            budget = activation_budget(model, 1.0, None)
            a, n = budget.activations, len(budget.layers)
            budget.budget_bytes = input_ids.numel() * (kept_layers * a.kept_bytes + (n - kept_layers) * a.checkpointed_bytes)
            assert budget.layers_kept(input_ids.numel()) == kept_layers
            budget.choose(input_ids.numel())  # what the engine does before a training forward
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
        return {n: p.grad for n, p in model.named_parameters()}, flags

    reference, every = train_step(None)  # the Trainer's checkpointing: every layer
    assert every == [True, True]
    grads, flags = train_step(kept_layers)
    assert flags == [True] * (2 - kept_layers) + [False] * kept_layers  # the first layers checkpointed, the last kept
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_the_probe_leaves_nothing_allocated(autocast):
    """The probe's graph is freed (a saved tensor that holds its own grad_fn would keep it, and in mixed precision
    the bf16 copies of every weight with it: 2.3 GiB for the 1B model, measured on the H200)."""
    import gc

    from common.engine.budget import measure_layer_activations

    model = tiny_model()

    def live_tensor_ids():
        gc.collect()
        return {id(o) for o in gc.get_objects() if torch.is_tensor(o)}

    before = live_tensor_ids()
    measure_layer_activations(model, autocast)
    assert live_tensor_ids() - before == set()


@pytest.mark.parametrize("half", [None, torch.bfloat16])
def test_the_engine_with_the_length_split_and_the_budget_has_the_models_own_gradients(half, monkeypatch):
    """The engine as a run sets it up (answer-token loss, checkpointing within a budget), on a batch that the loss
    splits into two decoder passes and the budget checkpoints one of two layers for: the model's own loss and
    gradients, computed by its own forward with every activation kept."""
    from common.config import EngineArguments
    from common.data import IGNORE_INDEX
    from common.engine import apply_engine
    from common.engine import plan as plan_module
    from common.engine.plan import plan_batch
    from common.precision import resolve_precision

    monkeypatch.setattr(plan_module, "SPLIT_COST_POSITIONS", 16)  # the smoke model's short rows: worth a split
    monkeypatch.setattr(plan_module, "GROUP_ROWS", 2)
    lengths = [30] * 2 + [8] * 14
    input_ids = torch.randint(5, 200, (16, 30), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.tensor([[1] * n + [0] * (30 - n) for n in lengths])
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # the context
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
              "num_items_in_batch": 2 * labels[:, 1:].ne(IGNORE_INDEX).sum()}  # half of a two-batch step

    own, engine = tiny_model(), tiny_model()
    applied = apply_engine(engine, EngineArguments(liger=False, activation_budget_gib=1.0),
                           resolve_precision("mixed" if half else "fp32", on_cuda=False))
    budget = applied.budget
    enable_checkpointing(engine)
    a, positions = budget.activations, 2 * 30 + 14 * 8  # the split's positions, not the batch's 16 x 30
    budget.budget_bytes = positions * (a.kept_bytes + a.checkpointed_bytes)  # one layer kept, one checkpointed
    passes = []
    engine.get_decoder().register_forward_pre_hook(  # what each decoder pass runs with
        lambda module, args: passes.append([layer.gradient_checkpointing for layer in decoder_layers(engine)]))

    losses = []
    for model in (own, engine):
        model.train()
        with torch.autocast("cpu", dtype=half, enabled=half is not None):
            if model is engine:  # as EngineTrainer calls it, with the collator's plan
                loss = model(**applied.before_forward(model, {**inputs, "plan": plan_batch(attention_mask, labels)})).loss
            else:
                loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.item())
    assert passes == [[True, False], [True, False]]  # two length groups, each with the first layer checkpointed
    assert losses[1] == pytest.approx(losses[0], rel=1e-5 if half is None else 1e-2)
    for (name, p_own), p_engine in zip(own.named_parameters(), engine.parameters()):
        if half is None:
            torch.testing.assert_close(p_engine.grad, p_own.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
        else:  # bf16's rounding differs between the shapes
            assert torch.linalg.vector_norm(p_engine.grad - p_own.grad) <= 0.05 * torch.linalg.vector_norm(p_own.grad)
