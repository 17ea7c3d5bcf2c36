"""Per-patient gradients under Opacus' hooks, computed and stored with less memory traffic.

`PerPatientGradients` is Opacus' GradSampleModule with one grad sampler replaced: a Linear
layer's per-patient weight gradient, backprops^T activations summed over the tokens, is one
batched matrix product either way round, and Opacus' einsum picks the orientation whose output has
the layer's output width as its rows. For a LoRA up-projection (rank 8 in, 384 out) that is a
product with 8-column outputs, about five times slower on a CPU than the transposed one with
8-row outputs (then transposed back); with the small dimension first it is the faster one
(benchmarks: docs/performance.md). The values are the same products; the sum over tokens may
round differently (a few 1e-6 relative), and clipping uses the tensor made here either way.

Opacus' per-patient gradient store, without its zero-fill and copy:

Opacus 1.6 stores each layer's per-patient gradients (`create_or_accumulate_grad_sample`) by
allocating a zero tensor the size of the batch and copying the gradients into it: one more write
and read of every per-patient gradient, the largest tensors of a DP-SGD step. On the shipped
vit_micro that was about a quarter of what DP added to a plain step (docs/performance.md, "DP
cost by fine-tuning mode"). When the gradients already cover the whole batch and nothing is stored
yet, which is every layer of every step fahr takes (one forward, one backward, no tied
weights), the tensor the grad sampler just made is kept as it is. Every other case (a shorter
block of rows, accumulation over calls) goes to Opacus' own function, unchanged.

Opacus looks the function up in its module's globals at each call, so installing replaces that
name; `install` checks it is there, so that an Opacus which moved it fails loudly here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule, grad_sample_module

# below this many rows the transposed product wins (measured: rank 8-32 against widths 128-512)
_NARROW = 32

_opacus_store: Callable[..., None] = grad_sample_module.create_or_accumulate_grad_sample


def store_grad_sample(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int) -> None:
    """`create_or_accumulate_grad_sample` with the fresh, full-batch case kept without a copy."""
    fresh = not hasattr(param, "_current_grad_sample")
    if param.requires_grad and fresh and grad_sample.shape[0] == max_batch_len:
        param._current_grad_sample = grad_sample  # type: ignore[attr-defined]
    else:
        _opacus_store(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)


def install() -> None:
    """Make Opacus' hooks (GradSampleModule) store per-patient gradients with `store_grad_sample`."""
    if getattr(grad_sample_module, "create_or_accumulate_grad_sample", None) is None:
        raise RuntimeError("opacus.grad_sample.grad_sample_module has no create_or_accumulate_grad_sample")
    grad_sample_module.create_or_accumulate_grad_sample = store_grad_sample


def linear_grad_sample(
    layer: torch.nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-patient gradients of a Linear layer's weight (B, out, in) and bias (B, out)."""
    n = backprops.shape[0]
    grad = backprops.reshape(n, -1, backprops.shape[-1])  # (B, tokens, out)
    act = activations[0].to(backprops.dtype)
    act = act.reshape(n, -1, act.shape[-1])  # (B, tokens, in)
    out: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if grad.shape[-1] > act.shape[-1] and act.shape[-1] <= _NARROW:
            out[layer.weight] = torch.bmm(act.transpose(1, 2), grad).transpose(1, 2).contiguous()
        else:
            out[layer.weight] = torch.bmm(grad.transpose(1, 2), act)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grad.sum(1)
    return out


def _per_patient_only(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` with no gradient for the layer's own tensors when `x` carries one.

    Under DP-SGD the batch's summed weight gradient, which autograd would compute for every
    trainable Linear, is thrown away: the optimizer replaces `.grad` with the noised sum of
    clipped per-patient gradients, made from the hooks' activations and output gradients. Its
    matrix product was about a third of the backward pass. With detached weights the output still
    carries the input's gradient, so the hooks fire and the layers below receive theirs. When `x`
    carries none (the first trainable layer above a frozen part), the weights are the only path
    to a gradient and stay attached.
    """
    if not x.requires_grad:
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    bias = None if layer.bias is None else layer.bias.detach()
    return torch.nn.functional.linear(x, layer.weight.detach(), bias)


class PerPatientGradients(GradSampleModule):
    """Opacus' per-sample hooks with fahr's Linear grad sampler (`linear_grad_sample`), and trainable
    Linear layers that skip the summed weight gradient nobody reads (`_per_patient_only`) until
    `remove_hooks`."""

    GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, torch.nn.Linear: linear_grad_sample}

    def __init__(self, m: torch.nn.Module, *args: Any, **kwargs: Any):
        super().__init__(m, *args, **kwargs)
        self._rewired = [
            layer
            for layer in m.modules()
            if type(layer) is torch.nn.Linear and any(p.requires_grad for p in layer.parameters())
        ]
        for layer in self._rewired:
            layer.forward = partial(_per_patient_only, layer)  # type: ignore[method-assign]

    def remove_hooks(self) -> None:
        """Opacus' hooks off, and every rewired layer back to nn.Linear's own forward."""
        super().remove_hooks()
        for layer in self._rewired:
            del layer.forward
        self._rewired = []
