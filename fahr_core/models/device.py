"""Where training and inference run: the GPU when there is one, else the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def compute_device() -> torch.device:
    """CUDA device 0 when available (age training, evaluation, prediction, site training), else the CPU.

    Pre-training picks its own device per process (`fahr_core.train.pretrain`, one GPU per rank).
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def placed_on(module: torch.nn.Module, device: torch.device | None = None) -> Iterator[torch.device]:
    """Run a block with `module` on `device` (default `compute_device()`), then move it back.

    A site's model lives on the CPU: what it sends, masks and reports is read from CPU tensors.
    Only the work in between (DP-SGD, scoring) moves to the GPU, so nothing downstream has to know
    where it ran, and a failed round leaves the model where it was.
    """
    device = compute_device() if device is None else device
    home = next(module.parameters()).device
    try:  # the move itself may fail half-way (out of GPU memory): it is undone too
        module.to(device)
        yield device
    finally:
        module.to(home)
