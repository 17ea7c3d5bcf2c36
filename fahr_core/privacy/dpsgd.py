"""The DP-SGD mechanism a site runs: Poisson sampling and Gaussian noise, both from a SecureStream.

Opacus clips per-patient gradients; what it would draw from torch's global generator (its Poisson
sampler and `DPOptimizer.add_noise`) is replaced here so that every random bit comes from a
ChaCha20 stream keyed fresh for each training call (fahr_core.privacy.randomness). Owning the
sampler also means owning the step count: the plan below is exactly what the ledger accounts,
for every n (Opacus' own sampler runs int(1/q) steps, one fewer than ceil(n/B) for some n).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fahr_core.privacy.randomness import SecureStream


@dataclass(frozen=True)
class SamplingPlan:
    """Poisson sampling of one local training call: each step draws every patient with rate q.

    q = 1 / ceil(n / B), so an epoch of ceil(n / B) steps sees each patient once in expectation
    and the expected batch n * q is at most B.
    """

    n: int
    steps_per_epoch: int
    epochs: int

    @classmethod
    def for_data(cls, n: int, batch_size: int, epochs: int) -> SamplingPlan:
        if n < 1 or batch_size < 1 or epochs < 1:
            raise ValueError(f"need n, batch_size, epochs >= 1; got {n}, {batch_size}, {epochs}")
        return cls(n, math.ceil(n / batch_size), epochs)

    @property
    def sample_rate(self) -> float:
        return 1.0 / self.steps_per_epoch

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def expected_batch_size(self) -> float:
        """n q: what the sum of clipped gradients is divided by (the noisy mean gradient's denominator)."""
        return self.n / self.steps_per_epoch


class PoissonBatches:
    """Batch sampler: `steps` batches, each patient in each independently with rate q (possibly empty)."""

    def __init__(self, plan: SamplingPlan, stream: SecureStream):
        self.plan = plan
        self.stream = stream

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.plan.steps):
            yield self.stream.bernoulli(self.plan.n, self.plan.sample_rate).nonzero()[0].tolist()


class SecureNoiseOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with its Gaussian noise drawn from a SecureStream instead of torch's generator.

    Noise per coordinate: N(0, (noise_multiplier * max_grad_norm)^2) on the sum of clipped gradients,
    then divided by the expected batch size (loss_reduction "mean"), as in Opacus.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        stream: SecureStream,
    ):
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,  # a float n q: exact, not Opacus' int(n q)
            loss_reduction="mean",
        )
        self.stream = stream

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        sums = []
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            sums.append(p.summed_grad)
        for p, g, noise in zip(self.params, sums, self._noise(sums, std), strict=True):
            p.grad = (g + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    def _noise(self, like: list[torch.Tensor], std: float) -> list[torch.Tensor]:
        """N(0, std^2) shaped like each tensor: one draw per device and dtype, split among them.

        One keystream call and one Box-Muller transform per step instead of one per parameter
        tensor: with LoRA's dozens of small tensors the per-call overhead was most of the noise's cost.
        """
        noise: list[torch.Tensor] = [torch.empty(0)] * len(like)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, g in enumerate(like):
            groups.setdefault((g.device, g.dtype), []).append(i)
        for (device, dtype), members in groups.items():
            sizes = [like[i].numel() for i in members]
            flat = self.stream.normal((sum(sizes),), std=std, device=device, dtype=dtype)
            for i, part in zip(members, flat.split(sizes), strict=True):
                noise[i] = part.view(like[i].shape)
        return noise

    def noise_only_step(self) -> None:
        """The step for an empty Poisson batch: the sum of no clipped gradients (zero) plus noise.

        Skipping the step instead would release whether the batch was empty, which the accountant
        does not cover.
        """
        for p in self.params:
            p.summed_grad = torch.zeros_like(p)
        self.add_noise()
        for p in self.params:  # scale_grad's "mean" without its per-sample bookkeeping (there is none)
            p.grad /= self.expected_batch_size
        self.original_optimizer.step()


class SecureGhostOptimizer(SecureNoiseOptimizer, DPOptimizerFastGradientClipping):
    """Ghost clipping's optimizer with the same secure noise and empty-batch step.

    Its method order puts SecureNoiseOptimizer's noise ahead of DPOptimizerFastGradientClipping's
    step, which takes .grad (already the sum of clipped gradients, from the loss wrapper's second
    backward pass) as the sum to noise instead of clipping per-sample gradients itself.
    """
