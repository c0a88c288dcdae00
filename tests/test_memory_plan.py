"""The memory plan: the engine's defaults where the card has room, a smaller micro-batch and budget where it has not,
an error before training where nothing fits (common/memory_plan.py)."""

import pytest

from common.config import ConfigError, EngineArguments
from common.engine.budget import LayerActivations
from common.memory_plan import GIB, longest_micro_batch_positions, plan_memory

PARAMETERS = 1_235_814_400  # Llama-3.2-1B
HEAD_PARAMETERS = 128_256 * 2048  # its output projection (tied to the input embeddings)
LAYERS = 16
ACTIVATIONS = LayerActivations(kept_bytes=160 * 1024, checkpointed_bytes=8 * 1024)  # measured on the H200, fp32
LENGTHS = [245] + [30 + i % 90 for i in range(16_000)]  # PIQA-like: one long outlier


VOCABULARY = 128_256


def plan(card_gib: float, engine: EngineArguments | None = None, world_size: int = 1):
    return plan_memory(engine or EngineArguments(), int(card_gib * GIB), PARAMETERS, LAYERS, ACTIVATIONS, LENGTHS, 128,
                       world_size, HEAD_PARAMETERS, VOCABULARY)


@pytest.mark.parametrize("card_gib", [38.0, 78.0, 139.0])
def test_a_card_with_room_keeps_the_engine_defaults(card_gib):
    fitted = plan(card_gib)
    assert (fitted.gradient_accumulation_steps, fitted.activation_budget_gib) == (1, 7.0)
    assert fitted.changes == ()
    assert fitted.eval_logits_bytes == 4 * GIB


def test_a_24gb_card_gets_smaller_micro_batches_and_budget_and_says_so():
    fitted = plan(22.0)
    assert fitted.gradient_accumulation_steps > 1 and 128 % fitted.gradient_accumulation_steps == 0
    assert fitted.activation_budget_gib < 7.0
    assert fitted.eval_logits_bytes < 4 * GIB
    assert "--gradient-accumulation-steps 1 -> " in fitted.describe()
    roomier = plan(30.0)
    assert roomier.gradient_accumulation_steps <= fitted.gradient_accumulation_steps
    assert roomier.activation_budget_gib >= fitted.activation_budget_gib


@pytest.mark.parametrize("budget_gib", [0.5, 1.0, 2.0])
def test_values_the_card_can_hold_are_kept(budget_gib):
    engine = EngineArguments(gradient_accumulation_steps=4, activation_budget_gib=budget_gib)
    fitted = plan(78.0, engine)
    assert (fitted.gradient_accumulation_steps, fitted.activation_budget_gib) == (4, budget_gib)
    assert fitted.changes == ()


def room_left_gib(fitted, engine: EngineArguments, per_position_bytes: int) -> float:
    """What the longest planned micro-batch leaves of the card after the state, the headroom and what it keeps."""
    from common.memory_plan import HEADROOM_BYTES

    return (fitted.usable_bytes - fitted.state_bytes - HEADROOM_BYTES - fitted.longest_positions * per_position_bytes) / GIB


def test_without_checkpointing_every_layer_keeps_its_activations_in_the_plan():
    """Off, each layer keeps kept_bytes a position: the plan must split the batch finer than with checkpointing."""
    on, off = plan(30.0), plan(30.0, EngineArguments(gradient_checkpointing=False))
    assert off.gradient_accumulation_steps > on.gradient_accumulation_steps
    assert room_left_gib(off, EngineArguments(), LAYERS * ACTIVATIONS.kept_bytes) > 0


def test_the_models_own_loss_over_every_position_is_counted():
    """--loss full-logits holds logits of every position over the vocabulary: 38 GiB cannot keep micro-batches of 128."""
    chunks, full = plan(38.0), plan(38.0, EngineArguments(loss="full-logits"))
    assert chunks.gradient_accumulation_steps == 1 and full.gradient_accumulation_steps > 1
    assert room_left_gib(full, EngineArguments(), VOCABULARY * 10) > 0


def test_padding_to_a_multiple_is_planned_as_the_collator_pads():
    padded = plan(30.0, EngineArguments(pad_to_multiple_of=512))
    assert padded.longest_positions % 512 == 0
    assert padded.gradient_accumulation_steps > plan(30.0).gradient_accumulation_steps


def test_evaluation_only_needs_no_room_for_training():
    """16 GiB cannot train the 1B model, but holds it for evaluation: the plan bounds the logits and changes nothing."""
    from common.memory_plan import eval_only_plan

    fitted = eval_only_plan(EngineArguments(), int(16 * GIB), PARAMETERS)
    assert not fitted.training and fitted.changes == ()
    assert GIB <= fitted.eval_logits_bytes <= 4 * GIB
    assert "(evaluation only)" in fitted.describe()


def test_micro_batches_divide_the_batch_over_every_gpu():
    fitted = plan(22.0, world_size=2)
    assert 128 % (fitted.gradient_accumulation_steps * 2) == 0


def test_a_card_too_small_for_the_state_is_an_error_before_training():
    with pytest.raises(ConfigError, match="cannot train here"):
        plan(16.0)


def test_the_longest_micro_batch_is_bounded_by_its_longest_example():
    assert longest_micro_batch_positions([5, 9, 3, 7], 2) == 18
    assert longest_micro_batch_positions([], 4) == 0
