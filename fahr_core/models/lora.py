"""LoRA as a plain module around an nn.Linear: W x + (alpha / r) B A x, with A and B nn.Linear layers.

Why our own and not PEFT: Opacus computes per-sample gradients with a hook per module type, and
its nn.Linear hook is exact for any Linear. Keeping A and B as ordinary nn.Linear children (and the
wrapper itself without parameters of its own) means Opacus hooks them like any other layer, so the
adapter's per-sample gradients are the standard, tested ones (PEFT's LoRA layers under Opacus
corrupted updates silently: opacus#820). tests/test_finetune.py checks them against a per-patient
loop.

A is initialised from a generator the caller seeds from the model spec, so every site builds the
same A: FFA-LoRA (Sun et al., ICLR 2024) freezes it and trains only B, and then averaging B over
sites averages the adapters exactly (the mean of B_i A is (mean B_i) A). B starts at zero, so the
wrapped layer starts as the pre-trained one.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """`base` (frozen) plus a rank-`rank` update B A scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scale = alpha / rank
        with torch.no_grad():  # nn.Linear's own (Kaiming-uniform) init, drawn from the shared generator
            bound = 1.0 / math.sqrt(base.in_features)
            a = torch.empty(self.lora_A.weight.shape).uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        self.lora_A.to(base.weight.dtype)
        self.lora_B.to(base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: W + (alpha / r) B A, the same bias."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        out.weight.copy_(self.base.weight + self.scale * self.lora_B.weight @ self.lora_A.weight)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out
