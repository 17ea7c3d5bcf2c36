"""One local DP-SGD training pass at a site, and risk scoring of patients.

Privacy unit = the patient. The dataset is indexed by patient and each draw picks one of the
patient's photos, so a patient with several photos still contributes one clipped gradient per
step; with the per-patient loss in fahr_core.survival.losses, Opacus' per-sample clipping then
bounds each patient's influence and the accountant's epsilon is a patient-level guarantee.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fahr_core.config import PrivacyConfig, TrainConfig
from fahr_core.faces.images import to_input
from fahr_core.models.vit import SurvivalViT
from fahr_core.privacy.ledger import PrivacyLedger
from fahr_core.survival.losses import LOSSES, require_dp_valid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SurvivalData:
    """Decoded faces and outcomes of one set of patients (a site's train or test split)."""

    images: np.ndarray  # uint8 (n_photos, 3, H, W)
    photos: tuple[tuple[int, ...], ...]  # per patient: indices into `images`
    time: np.ndarray  # float (n_patients,)
    event: np.ndarray  # int (n_patients,)

    def __len__(self) -> int:
        return len(self.photos)


class _PatientDataset(Dataset):
    def __init__(self, data: SurvivalData, seed: int):
        self.data = data
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        photo = self.data.photos[i][self.rng.integers(len(self.data.photos[i]))]
        return (
            torch.from_numpy(self.data.images[photo]),
            torch.tensor(self.data.time[i], dtype=torch.float32),
            torch.tensor(self.data.event[i], dtype=torch.float32),
        )


@dataclass(frozen=True)
class RoundStats:
    n: int
    loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float
    delta: float
    seconds: float


def site_delta(privacy: PrivacyConfig, n: int) -> float:
    """The configured delta, or 1/(10 n): delta must stay well below 1/n to mean anything."""
    return privacy.delta if privacy.delta > 0 else 1.0 / (10 * max(n, 1))


def _run_epochs(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    horizon: float,
    loss_name: str,
) -> float:
    """The training loop shared by private and non-private training; returns the mean loss."""
    model.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        for x, t, e in loader:
            if len(x) == 0:  # an empty Poisson batch: skipping it releases less than was accounted
                continue
            optimizer.zero_grad(set_to_none=True)
            eta, alpha = model(to_input(x))
            loss = LOSSES[loss_name].compute(eta, alpha, t, e, horizon)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
            seen += len(x)
    return total / max(seen, 1)


def _optimizer(model: SurvivalViT, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the tensors the fine-tuning mode left trainable (fahr_core.models.finetune.prepare)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def train_nonprivate(
    model: SurvivalViT, data: SurvivalData, train: TrainConfig, horizon: float, seed: int
) -> float:
    """Plain (non-DP) training, for central baselines and the privacy-utility benchmark's 'no DP' arm.

    Never used at a site: a site's update must come from `train_dp`.
    """
    torch.manual_seed(seed)
    loader = DataLoader(_PatientDataset(data, seed), batch_size=train.batch_size, shuffle=True)
    return _run_epochs(model, loader, _optimizer(model, train), train.local_epochs, horizon, train.loss)


def train_dp(
    model: SurvivalViT,
    data: SurvivalData,
    train: TrainConfig,
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    rounds_left: int,
    horizon: float,
    seed: int,
    round_info: dict,
) -> RoundStats:
    """Run `train.local_epochs` of DP-SGD (Poisson sampling) and record the spend in `ledger`.

    The noise multiplier is calibrated so that this and the `rounds_left - 1` rounds after it fit
    the remaining budget; the ledger refuses the round (BudgetExceeded) before any step is taken
    if it would not fit.
    """
    from opacus import PrivacyEngine  # heavy import: only sites that train pay for it

    require_dp_valid(train.loss)
    start = time.perf_counter()
    n = len(data)
    if n < 2:
        raise ValueError(f"site has {n} training patient(s); DP-SGD needs at least 2")
    torch.manual_seed(seed)
    # Opacus' Poisson sampler draws each patient with rate 1 / len(loader) for len(loader) steps an
    # epoch; the ledger accounts exactly that (checked against the sampler below).
    steps_per_epoch = math.ceil(n / train.batch_size)
    q = 1.0 / steps_per_epoch
    steps = steps_per_epoch * train.local_epochs
    sigma = ledger.calibrate(q, steps, rounds_left)
    ledger.check((sigma, q, steps))

    loader = DataLoader(_PatientDataset(data, seed), batch_size=train.batch_size, shuffle=True)
    optimizer = _optimizer(model, train)
    model.train()  # Opacus validates the module in training mode
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        # Opacus warns about secure RNG (not used: torch's PRNG, see docs/privacy.md).
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        dp_model, optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )
    if abs(dp_loader.sample_rate - q) > 1e-12 or len(dp_loader) != steps_per_epoch:
        raise RuntimeError(
            f"sampler (rate {dp_loader.sample_rate}, {len(dp_loader)} steps) differs from the "
            f"accounted (rate {q}, {steps_per_epoch} steps); refusing to train"
        )
    mean_loss = _run_epochs(dp_model, dp_loader, optimizer, train.local_epochs, horizon, train.loss)
    dp_model.remove_hooks()
    epsilon = ledger.record((sigma, q, steps), round_info)
    return RoundStats(
        n=n,
        loss=mean_loss,
        steps=steps,
        sample_rate=q,
        noise_multiplier=sigma,
        epsilon=epsilon,
        delta=ledger.delta,
        seconds=time.perf_counter() - start,
    )


def patient_risk(model: SurvivalViT, data: SurvivalData, batch_size: int = 64) -> np.ndarray:
    """Risk score per patient: the mean of eta over the patient's photos."""
    eta = model.risk(to_input(data.images), batch_size).numpy()
    return np.array([eta[list(idx)].mean() for idx in data.photos])
