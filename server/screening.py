"""Screening the sites' updates before they are averaged.

A site's weights are rejected when they are not a finite copy of the global model's names,
shapes and dtypes, or when the update (site weights minus global weights) is an outlier in
size: larger than an absolute cap, or, with three or more sites, more than `norm_factor` times
the median update norm. A broken or hostile site then cannot drag the global model away; each
rejection names the site and the reason.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch

from fahr_core.protocol.outbound import weights_mismatch

State = Mapping[str, torch.Tensor]


def update_norm(update: State, reference: State) -> float:
    """L2 norm of (update - reference) over floating-point tensors."""
    total = 0.0
    for name, ref in reference.items():
        if ref.dtype.is_floating_point:
            total += float(((update[name].double() - ref.double()) ** 2).sum())
    return math.sqrt(total)


def screen_updates(
    updates: Mapping[str, State], reference: State, norm_factor: float = 5.0, max_norm: float = 0.0
) -> dict[str, str]:
    """site -> reason, for every update that must not be aggregated (empty dict: all fine)."""
    rejected: dict[str, str] = {}
    norms: dict[str, float] = {}
    for site, update in updates.items():
        problem = weights_mismatch(update, reference)
        if problem:
            rejected[site] = problem
            continue
        norms[site] = update_norm(update, reference)
        if max_norm > 0 and norms[site] > max_norm:
            rejected[site] = f"update norm {norms[site]:.3g} exceeds the cap {max_norm:.3g}"
    valid = {s: n for s, n in norms.items() if s not in rejected}
    if len(valid) >= 3:
        for site, norm in valid.items():
            median = statistics.median(n for s, n in valid.items() if s != site)
            if median > 0 and norm > norm_factor * median:
                rejected[site] = (
                    f"update norm {norm:.3g} is {norm / median:.1f}x the median of the other sites "
                    f"({median:.3g}); limit {norm_factor:g}x"
                )
    return rejected
