"""PyTorch's fused RMSNorm computes what the Llama family's RMSNorm modules compute."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from common.engine.kernels import use_fused_rms_norm
from common.models import load_model, load_tokenizer


@pytest.mark.parametrize("half", [None, torch.bfloat16])
def test_fused_rms_norm_equals_the_modules_own(half):
    torch.manual_seed(0)
    own = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        own.weight.uniform_(0.5, 1.5)
    copy = LlamaRMSNorm(64, eps=1e-5)
    copy.load_state_dict(own.state_dict())
    holder = torch.nn.Sequential(copy)
    assert use_fused_rms_norm(holder) == 1
    fused = holder[0]
    assert fused.weight is copy.weight and set(holder.state_dict()) == {"0.weight"}  # the same parameter and key
    x = torch.randn(3, 7, 64, requires_grad=True)
    outputs = []
    for module in (own, fused):
        x.grad = None
        with torch.autocast("cpu", dtype=half, enabled=half is not None):
            y = module(x)
        (y * torch.linspace(-1, 1, 64)).sum().backward()
        outputs.append((y, x.grad.clone(), module.weight.grad))
    assert outputs[1][0].dtype == outputs[0][0].dtype == torch.float32
    for got, expected in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    bf16_input = torch.randn(2, 64).bfloat16()  # not the weight's dtype: the module's own forward
    torch.testing.assert_close(fused(bf16_input), own(bf16_input))


def test_every_rms_norm_of_a_llama_model_is_replaced():
    model = load_model("smoke", load_tokenizer("smoke"))
    expected = 2 * model.config.num_hidden_layers + 1
    assert use_fused_rms_norm(model) == expected
