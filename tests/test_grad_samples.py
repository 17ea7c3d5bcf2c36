"""fahr's per-patient gradients under Opacus' hooks: the Linear grad sampler and the store.

The end-to-end check (hooks' clipped sum against one backward pass per patient, on real faces) is
in test_ghost_clipping.py; these pin each branch against what Opacus' own function builds.
"""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import grad_sample_module

from fahr_core.privacy import grad_samples
from fahr_core.train import local


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(4, 3))


def test_a_fresh_full_batch_is_stored_without_a_copy():
    param, made = _param(), torch.randn(5, 4, 3)
    grad_samples.store_grad_sample(param=param, grad_sample=made, max_batch_len=5)
    assert param._current_grad_sample is made


def test_a_shorter_block_and_an_accumulation_are_stored_as_opacus_stores_them():
    ours, theirs = _param(), _param()
    first, second = torch.randn(3, 4, 3), torch.randn(5, 4, 3)
    for param, store in ((ours, grad_samples.store_grad_sample), (theirs, grad_samples._opacus_store)):
        store(param=param, grad_sample=first, max_batch_len=5)  # rows 3 and 4 stay zero
        store(param=param, grad_sample=second, max_batch_len=5)  # added, not replaced
    assert torch.equal(ours._current_grad_sample, theirs._current_grad_sample)
    assert torch.equal(ours._current_grad_sample[3:], second[3:])


def test_a_frozen_parameter_gets_nothing():
    param = _param().requires_grad_(False)
    grad_samples.store_grad_sample(param=param, grad_sample=torch.randn(5, 4, 3), max_batch_len=5)
    assert not hasattr(param, "_current_grad_sample")


def test_the_hooks_method_installs_the_store_in_opacus(monkeypatch):
    from fahr_core.config import ModelConfig
    from fahr_core.models.finetune import build

    # as in a fresh site process (another test may have installed it already)
    monkeypatch.setattr(grad_sample_module, "create_or_accumulate_grad_sample", grad_samples._opacus_store)
    local._private(build(ModelConfig(arch="vit_micro", finetune="head")), "hooks", 1.0)
    assert grad_sample_module.create_or_accumulate_grad_sample is grad_samples.store_grad_sample


# (patients, tokens..., in, out): LoRA's down and up projections, a square layer, a head without
# tokens, several token axes; both orientations of the product are taken among them
SHAPES = [(6, 5, 8, 384), (6, 5, 384, 8), (6, 5, 128, 128), (6, 7, 40), (6, 1, 7, 3), (6, 2, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_grad_samples_are_each_patients_own_gradient(shape):
    """Against autograd run once per patient (no Opacus): weight and bias, token sequences or not."""
    *lead, d_in, d_out = shape
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(*lead, d_in)
    target = torch.randn(*lead, d_out)
    out = layer(x)
    backprops = torch.autograd.grad(((out - target) ** 2).sum(), out)[0]
    got = grad_samples.linear_grad_sample(layer, [x], backprops)
    for i in range(lead[0]):
        layer.zero_grad()
        ((layer(x[i : i + 1]) - target[i : i + 1]) ** 2).sum().backward()
        assert torch.allclose(got[layer.weight][i], layer.weight.grad, atol=1e-4)
        assert torch.allclose(got[layer.bias][i], layer.bias.grad, atol=1e-4)
