"""One local DP-SGD training pass at a site, and risk scoring of patients.

Privacy unit = the patient. The dataset is indexed by patient and each draw picks one of the
patient's photos, so a patient with several photos still contributes one clipped gradient per
step; with the per-patient loss in fahr_core.survival.losses, Opacus' per-sample clipping then
bounds each patient's influence and the accountant's epsilon is a patient-level guarantee.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, Dataset, default_collate

from fahr_core.age.views import TEST_SHIFTS, fixed_views
from fahr_core.config import CLIPPING_METHODS, PrivacyConfig, TrainConfig
from fahr_core.faces.images import to_input
from fahr_core.models.device import placed_on
from fahr_core.models.vit import SurvivalViT
from fahr_core.privacy import grad_samples
from fahr_core.privacy.dpsgd import PoissonBatches, SamplingPlan, SecureGhostOptimizer, SecureNoiseOptimizer
from fahr_core.privacy.ledger import PrivacyLedger
from fahr_core.privacy.randomness import fresh_stream, insecure_rng_active
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
    """One item per patient: one of the patient's photos, picked by `choose(number of photos)`."""

    def __init__(self, data: SurvivalData, choose: Callable[[int], int]):
        self.data = data
        self.choose = choose

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        photo = self.data.photos[i][self.choose(len(self.data.photos[i]))]
        return (
            torch.from_numpy(self.data.images[photo]),
            torch.tensor(self.data.time[i], dtype=torch.float32),
            torch.tensor(self.data.event[i], dtype=torch.float32),
        )


def _collate_or_none(items: list) -> list[torch.Tensor] | None:
    """An empty Poisson batch collates to None (the DP step then adds noise to a zero sum)."""
    return default_collate(items) if items else None


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
    images: int  # photos through the DP steps: images / seconds is the round's DP training speed
    device: str  # where the steps ran ("cpu", "cuda"): for the site's own log


def _run_steps(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    horizon: float,
    loss_name: str,
    device: torch.device,
) -> tuple[float, int]:
    """One pass over `loader`, shared by private and non-private training: (mean loss, images seen).

    Batches travel to `device` as uint8 (a quarter of float32's bytes) and are scaled there.

    A None batch (an empty Poisson batch) is a noise-only step of the SecureNoiseOptimizer. Under
    ghost clipping the loss is Opacus' per-patient wrapper, whose backward() runs the two passes
    (per-patient gradient norms, then the sum of clipped gradients).
    """
    total, seen = 0.0, 0
    for batch in loader:
        optimizer.zero_grad(set_to_none=True)
        if batch is None:
            # only the DP path's Poisson loader yields empty batches, and it pairs them with this optimizer
            assert isinstance(optimizer, SecureNoiseOptimizer)
            optimizer.noise_only_step()
            continue
        x, t, e = (v.to(device, non_blocking=True) for v in batch)
        eta, alpha = model(to_input(x))
        if isinstance(model, GradSampleModuleFastGradientClipping):
            per_patient = LOSSES[loss_name].compute(eta, alpha, t, e, horizon, reduction="none")
            loss = DPTensorFastGradientClipping(model, optimizer, per_patient, "mean")
        else:
            loss = LOSSES[loss_name].compute(eta, alpha, t, e, horizon)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(x)
        seen += len(x)
    return total / max(seen, 1), seen


def _optimizer(model: SurvivalViT, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the tensors the fine-tuning mode left trainable (fahr_core.models.finetune.prepare),
    the risk bias at `train.level_lr` without weight decay, the rest at `train.lr`.

    Why a rate of its own: the server cannot know a site's hazard level, so the model starts
    wherever the global model left it (at first the head's constant baseline), often several log
    units off. Adam moves each tensor entry by about its lr per step, so at the weights' lr nothing
    would get there in a federation's few hundred steps, and until something does, every patient's
    gradient says "lower (or raise) all risks", which Adam writes into every risk weight at full
    step: a drift of the ranking that no data asked for, which from an age-model start cost 0.019 of
    held-out C on sites of 228-326 patients (docs/performance.md#the-sites-hazard-level). The bias
    shifts every patient alike and ranks no one, so a large lr costs no C. It is the bias and not
    the per-interval baseline: under DP each baseline entry's gradient is mostly noise, which a large
    lr would turn into a random walk of the calibration's shape, where the bias pools every
    interval's signal.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    level = model.head.risk.bias
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if p is not level]},
        {"params": [level], "lr": train.level_lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)


def train_nonprivate(
    model: SurvivalViT, data: SurvivalData, train: TrainConfig, horizon: float, seed: int
) -> float:
    """Plain (non-DP) training, for central baselines and the privacy-utility benchmark's 'no DP' arm.

    Never used at a site: a site's update must come from `train_dp`.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    loader = DataLoader(
        _PatientDataset(data, lambda k: int(rng.integers(k))), batch_size=train.batch_size, shuffle=True
    )
    with placed_on(model) as device:
        optimizer = _optimizer(model, train)
        model.train()
        epochs = range(train.local_epochs)
        losses = [_run_steps(model, loader, optimizer, horizon, train.loss, device)[0] for _ in epochs]
    return float(np.mean(losses))


def _private(
    model: SurvivalViT, clipping: str, max_grad_norm: float
) -> tuple[GradSampleModule | GradSampleModuleFastGradientClipping, type[SecureNoiseOptimizer]]:
    """Opacus' module wrapper and the matching secure-noise optimizer for `clipping` (TrainConfig).

    "hooks" stores every patient's gradient and clips in the optimizer; "ghost" computes each
    patient's gradient norm from activations and output gradients, then backpropagates the loss
    reweighted by the clipping factors: the same clipped sum without per-patient gradients in
    memory, for a second backward pass. Sampling, noise and step count are the same for both.
    """
    if clipping == "ghost":
        ghost = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=True,
        )
        return ghost, SecureGhostOptimizer
    if clipping == "hooks":
        grad_samples.install()
        hooks = grad_samples.PerPatientGradients(model, batch_first=True, loss_reduction="mean")
        return hooks, SecureNoiseOptimizer
    raise ValueError(f"unknown clipping {clipping!r}; use one of {', '.join(CLIPPING_METHODS)}")


def train_dp(
    model: SurvivalViT,
    data: SurvivalData,
    train: TrainConfig,
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    rounds_left: int,
    horizon: float,
    round_info: dict,
) -> RoundStats:
    """Run `train.local_epochs` of DP-SGD (Poisson sampling) and record the spend in `ledger`.

    The noise multiplier is calibrated so that this and the `rounds_left - 1` rounds after it fit
    the remaining budget; the ledger refuses the round (BudgetExceeded) before any step is taken
    if it would not fit. Sampling, noise and the photo drawn per patient come from secret streams
    keyed fresh for this call (fahr_core.privacy.randomness): no argument can make them reproducible.
    """
    require_dp_valid(train.loss)
    start = time.perf_counter()
    n = len(data)
    if n < 2:
        raise ValueError(f"site has {n} training patient(s); DP-SGD needs at least 2")
    plan = SamplingPlan.for_data(n, train.batch_size, train.local_epochs)
    sigma = ledger.calibrate(plan.sample_rate, plan.steps, rounds_left)
    ledger.check((sigma, plan.sample_rate, plan.steps))

    photos = fresh_stream("photo choice")
    loader = DataLoader(
        _PatientDataset(data, photos.below),
        batch_sampler=PoissonBatches(plan, fresh_stream("poisson sampling")),
        collate_fn=_collate_or_none,
    )
    with placed_on(model) as device:  # the GPU when there is one; the noise is drawn on it too
        optimizer = _optimizer(model, train)
        model.train()  # Opacus validates the module in training mode
        ModuleValidator.validate(model, strict=True)
        dp_model, optimizer_class = _private(model, train.clipping, privacy.max_grad_norm)
        dp_optimizer = optimizer_class(
            optimizer,
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            stream=fresh_stream("gaussian noise"),
        )
        try:
            mean_loss, images = _run_steps(dp_model, loader, dp_optimizer, horizon, train.loss, device)
        finally:  # the model is a plain module again even after a failed round (hooks, rewired layers)
            dp_optimizer.zero_grad(set_to_none=True)  # frees the per-patient and summed gradients
            dp_model.remove_hooks()
    rng = "INSECURE test seed" if insecure_rng_active() else "ChaCha20 keyed from os.urandom"
    epsilon = ledger.record((sigma, plan.sample_rate, plan.steps), {**round_info, "rng": rng})
    return RoundStats(
        n=n,
        loss=mean_loss,
        steps=plan.steps,
        sample_rate=plan.sample_rate,
        noise_multiplier=sigma,
        epsilon=epsilon,
        delta=ledger.delta,
        seconds=time.perf_counter() - start,
        images=images,
        device=device.type,
    )


def patient_risk(model: SurvivalViT, data: SurvivalData, batch_size: int = 64) -> np.ndarray:
    """Risk score per patient: the mean of eta over the patient's photos, each seen in the age
    model's ten test-time views (`fahr_core.age.views`: the face and its mirror image, each centred
    and moved 3 pixels each way).

    The aligned template is symmetric, so a mirrored face is an ordinary face of the same person,
    and the age model, the demo's start, is trained on random flips and moves of up to 6 pixels;
    averaging the views lowers the noise of one forward pass. What it is worth in held-out C, one
    pass against the mirror pair against ten views, is measured by benchmarks/start_ceiling.py for
    each shipped age model (docs/performance.md#privacy-utility-curve).
    """
    x = to_input(data.images)
    with placed_on(model):
        views = [model.risk(v, batch_size) for v in fixed_views(x, TEST_SHIFTS, mirror=True)]
    eta = torch.stack(views).mean(0).numpy()
    return np.array([eta[list(idx)].mean() for idx in data.photos])
