"""Command-line options the researcher commands share, defined once so their help and meaning agree.

`fahr pretrain`, `fahr age train` and `fahr models build` choose an architecture, an input size,
alignment and threads the same way; each names its own default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fahr_core.models.archs import ARCHS

Arch = Annotated[str, typer.Option(help=f"Encoder architecture: {', '.join(ARCHS)}.")]
ImgSize = Annotated[int, typer.Option(help="Input size in pixels (multiple of 16).")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
AlignmentCache = Annotated[
    Path | None, typer.Option(help="Alignment cache (content-addressed; share it between runs).")
]
AlignmentWorkers = Annotated[int, typer.Option(help="Alignment processes (0 = one per CPU).")]
Threads = Annotated[int, typer.Option(help="torch threads (0 = torch's default).")]


def set_threads(n: int) -> None:
    """Use `n` torch threads (0: leave torch's default)."""
    import torch  # only commands that compute pay for torch

    if n:
        torch.set_num_threads(n)
