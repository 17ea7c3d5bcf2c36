"""Opacus' per-patient gradient store, without its zero-fill and copy.

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

import torch
from opacus.grad_sample import grad_sample_module

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
