"""Both clipping methods (`[train].clipping`, "hooks" and "ghost") release the per-patient clipped sum.

On real faces, one DP step through the site's own step loop (local._run_steps) with Opacus'
per-sample hooks (with fahr's per-sample gradient store, fahr_core.privacy.grad_samples) and with
ghost clipping, from the same weights and the same noise stream, must give the same update; and
with the noise at zero, each one's update must equal a clipped sum built from one plain backward
pass per patient (no Opacus at all).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import replace

import pytest
import torch

from fahr_core.cohort import demo_faces_dir
from fahr_core.config import ModelConfig
from fahr_core.faces.images import load_faces, to_input
from fahr_core.models.finetune import build
from fahr_core.models.lora import LoRALinear
from fahr_core.privacy.randomness import SecureStream
from fahr_core.survival.losses import discrete_hazard_nll
from fahr_core.train import local

HORIZON = 10.0
EXPECTED_BATCH = 6.5  # n q of some Poisson plan: the update divides the noisy sum by it


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    paths = sorted((demo_faces_dir() / "images").iterdir())[:6]
    x = torch.from_numpy(load_faces(paths, 112))
    return x, torch.tensor([1.0, 3.5, 7.0, 12.0, 0.5, 2.0]), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])


def _model(mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build(replace(ModelConfig(arch="vit_micro"), finetune=mode))
    with torch.no_grad():  # with a zero risk weight or B = 0, most gradients would be zero
        model.head.risk.weight.normal_(0, 0.5)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)
    return model


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _dp_step(model, clipping: str, clip: float, sigma: float, key: bytes) -> dict[str, torch.Tensor]:
    """One step of SGD (lr 1) through the site's loop; returns the parameter change."""
    model = copy.deepcopy(model)
    model.train()
    before = _trainable(model)
    dp_model, optimizer_class = local._private(model, clipping, clip)
    optimizer = optimizer_class(
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=EXPECTED_BATCH,
        stream=SecureStream(key),
    )
    local._run_steps(dp_model, [_batch()], optimizer, HORIZON, "discrete_hazard", torch.device("cpu"))
    dp_model.remove_hooks()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def _per_patient_clipped_sum(model, clip: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """sum_i g_i min(1, clip / (|g_i| + 1e-6)) from one autograd pass per patient, and the norms |g_i|."""
    x, t, e = _batch()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(len(x)):
        model.zero_grad()
        eta, alpha = model(to_input(x[i : i + 1]))
        discrete_hazard_nll(eta, alpha, t[i : i + 1], e[i : i + 1], HORIZON).backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params.values()))
        norms.append(norm)
        for n, p in params.items():
            total[n] += p.grad * min(1.0, clip / (norm + 1e-6))
    return total, norms


@pytest.mark.parametrize("clipping", ["ghost", "hooks"])
@pytest.mark.parametrize("mode", ["full", "last:1", "head", "lora", "ffa-lora"])
def test_dp_steps_release_the_per_patient_clipped_sum(mode, clipping):
    model = _model(mode)
    model.train()
    reference, norms = _per_patient_clipped_sum(copy.deepcopy(model), clip=1.0)
    clip = sorted(norms)[len(norms) // 2]  # the median: some patients are clipped, some are not
    reference, _ = _per_patient_clipped_sum(copy.deepcopy(model), clip)
    assert min(norms) < clip < max(norms)
    step = _dp_step(model, clipping, clip, sigma=0.0, key=bytes(32))
    for n, want in reference.items():
        assert torch.allclose(-step[n] * EXPECTED_BATCH, want, atol=1e-6, rtol=1e-3), n
    assert all(want.abs().max() > 0 for want in reference.values())  # no trivially equal zeros


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_ghost_and_hooks_give_the_same_noisy_update_from_the_same_stream(mode):
    model = _model(mode)
    key = os.urandom(32)
    hooks = _dp_step(model, "hooks", clip=0.05, sigma=1.3, key=key)
    ghost = _dp_step(model, "ghost", clip=0.05, sigma=1.3, key=key)
    for n, change in hooks.items():
        assert torch.allclose(ghost[n], change, atol=1e-6, rtol=1e-4), n
    other = _dp_step(model, "ghost", clip=0.05, sigma=1.3, key=os.urandom(32))
    assert not torch.allclose(other["head.risk.weight"], ghost["head.risk.weight"], atol=1e-4)  # noise


@pytest.mark.parametrize("mode", ["full", "last:1", "lora"])
def test_hooks_skip_the_summed_gradient_dp_throws_away_and_give_it_back_after(mode):
    """Under the hooks a trainable Linear whose input carries a gradient gets its per-patient
    gradients but no summed one (the optimizer replaces it by the noised clipped sum); those whose
    input carries none keep it (LoRA's first A, on the frozen embedding; the baseline hazards'
    Linear, on a constant). remove_hooks gives nn.Linear's forward back."""
    model = _model(mode)
    model.train()
    x, t, e = _batch()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.requires_grad]
    dp_model, _ = local._private(model, "hooks", 1.0)
    eta, alpha = dp_model(to_input(x))
    discrete_hazard_nll(eta, alpha, t, e, HORIZON).backward()
    kept = {m for m in linears if m.weight.grad is not None}
    first_a = [model.encoder.blocks[0].attn.qkv.lora_A] if mode == "lora" else []
    assert kept == {*first_a, model.head.baseline}
    assert all(m.weight.grad_sample.shape[0] == len(x) for m in linears)
    dp_model.remove_hooks()
    assert not any("forward" in vars(m) for m in linears)
    model.zero_grad(set_to_none=True)
    eta, alpha = model(to_input(x))
    discrete_hazard_nll(eta, alpha, t, e, HORIZON).backward()
    assert all(m.weight.grad is not None for m in linears)


def test_an_unknown_clipping_method_is_refused():
    with pytest.raises(ValueError, match="unknown clipping 'fast'"):
        local._private(_model("head"), "fast", 1.0)
