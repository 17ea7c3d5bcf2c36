"""Central, non-private age regression on public faces (L1 loss): a quick encoder warm start.

FAHR-FaceAge proper (age-balanced oversampling, layer-wise lr decay, evaluation by decade) builds
on this; here it produces the small encoder the demo ships, so the demo's DP fine-tuning starts
from features that know something about faces (a stand-in for MAE pre-training at CPU scale).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from fahr_core.faces.images import to_input
from fahr_core.models.vit import build_encoder

log = logging.getLogger(__name__)


def train_age_encoder(
    images: np.ndarray,
    ages: np.ndarray,
    arch: str,
    img_size: int,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Fit encoder + linear age head with AdamW and a cosine schedule; return the encoder."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    encoder = build_encoder(arch, img_size)
    head = nn.Linear(encoder.embed_dim, 1)
    nn.init.constant_(head.bias, float(np.mean(ages)))
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    y = torch.as_tensor(ages, dtype=torch.float32)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        total = 0.0
        for b in range(len(images) // batch_size):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = to_input(images[idx])
            if rng.random() < 0.5:
                x = x.flip(-1)  # faces are left-right symmetric enough for age
            loss = (head(encoder(x)).squeeze(-1) - y[idx]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        log.info(
            "age epoch %d/%d: train L1 %.2f y (%.0f s)",
            epoch + 1,
            epochs,
            total / max(1, len(images) // batch_size),
            time.perf_counter() - start,
        )
    return encoder
