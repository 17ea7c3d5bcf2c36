"""Where central training and inference run: the GPU when there is one, else the CPU."""

from __future__ import annotations

import torch


def compute_device() -> torch.device:
    """CUDA device 0 when available (age training, evaluation, prediction), else the CPU.

    Pre-training picks its own device per process (`fahr_core.train.pretrain`, one GPU per rank).
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
