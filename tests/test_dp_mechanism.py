"""The DP-SGD mechanism itself, measured on real faces: noise level, clipping, secret randomness, steps.

Each test trains through `train_dp`, the function a site runs. Where the released update must be
linear in the noisy gradient, the optimizer is swapped for SGD with lr 1 (AdamW would normalise the
noise away); the sampler, clipping and noise under test are untouched.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from fahr_client.cli import app as client_app
from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.config import PrivacyConfig, TrainConfig
from fahr_core.faces.images import load_faces, to_input
from fahr_core.models.vit import SurvivalViT
from fahr_core.privacy import randomness
from fahr_core.privacy.dpsgd import PoissonBatches, SamplingPlan, SecureGhostOptimizer, SecureNoiseOptimizer
from fahr_core.privacy.ledger import PrivacyLedger
from fahr_core.privacy.randomness import TEST_RNG_ENV, SecureStream, fresh_stream
from fahr_core.privacy.secagg import Quantiser
from fahr_core.train import local
from fahr_core.train.local import SurvivalData, train_dp
from fahr_core.workdir import SITE_WORKDIR, SiteWorkdir

IMG = 32
HORIZON = 10.0


@pytest.fixture(scope="module")
def faces() -> SurvivalData:
    """24 real demo faces; survival outcomes from their labels (time from age, event from sex)."""
    records = load_labelled_faces(demo_faces_dir())[:24]
    return SurvivalData(
        images=load_faces([r.path for r in records], IMG),
        photos=tuple((i,) for i in range(len(records))),
        time=np.array([0.5 + r.age % 12 for r in records], dtype=np.float32),
        event=np.array([r.sex == "M" for r in records], dtype=np.int64),
    )


def subset(data: SurvivalData, n: int) -> SurvivalData:
    return SurvivalData(data.images, data.photos[:n], data.time[:n], data.event[:n])


def start_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return SurvivalViT("vit_micro", IMG, n_intervals=4).state_dict()


def _sgd(model: SurvivalViT, train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)


class Release:
    """One `train_dp` call from the same start: the released weight change and the clean clipped sums."""

    def __init__(self, data, tmp_path, name, train, privacy=None):
        privacy = privacy or PrivacyConfig(epsilon=8.0, max_grad_norm=1.0)
        start = start_weights()
        model = SurvivalViT("vit_micro", IMG, n_intervals=4)
        model.load_state_dict(start)
        ledger = PrivacyLedger.open(tmp_path / f"{name}.json", privacy.epsilon, 1e-5)
        self.stats = train_dp(model, data, train, privacy, ledger, 1, HORIZON, {"server_round": 1})
        self.plan = SamplingPlan.for_data(len(data), train.batch_size, train.local_epochs)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        after = model.state_dict()
        self.delta = torch.cat([(after[n] - start[n]).reshape(-1).double() for n in names])


@pytest.fixture
def linear_release(monkeypatch):
    """SGD with lr 1 in train_dp, and the clipped (pre-noise) sums each step recorded."""
    monkeypatch.setattr(local, "_optimizer", _sgd)
    sums: list[torch.Tensor] = []
    add_noise = SecureNoiseOptimizer.add_noise

    def recording(self):
        sums.append(torch.cat([p.summed_grad.reshape(-1).double() for p in self.params]))
        add_noise(self)

    monkeypatch.setattr(SecureNoiseOptimizer, "add_noise", recording)
    return sums


def released_noise(release: Release, sums: list[torch.Tensor]) -> torch.Tensor:
    """The noise on the sum of clipped gradients: -update * expected batch size - clipped sum (one step)."""
    (summed,) = sums
    return -release.delta * release.plan.expected_batch_size - summed


def test_released_update_noise_is_sigma_times_clip(faces, tmp_path, linear_release):
    clip = 0.5
    train = TrainConfig(batch_size=16, local_epochs=1)  # n = 16: q = 1, one step, expected batch 16
    release = Release(subset(faces, 16), tmp_path, "a", train, PrivacyConfig(epsilon=4.0, max_grad_norm=clip))
    assert release.stats.steps == 1 and release.plan.expected_batch_size == 16
    assert release.stats.images == 16  # q = 1: every patient's photo went through the step
    noise = released_noise(release, linear_release)
    want = release.stats.noise_multiplier * clip  # std on the sum; the update's is this / 16
    d = noise.numel()
    assert release.stats.noise_multiplier > 0.3
    assert float(noise.std()) == pytest.approx(want, rel=0.01)  # 1% is > 10 standard errors at d=892k
    assert abs(float(noise.mean())) < 5 * want / math.sqrt(d)
    tail = float((noise.abs() > 2 * want).double().mean())  # Gaussian: P(|z| > 2) = 0.0455
    assert tail == pytest.approx(2 * scipy_stats.norm.sf(2), abs=10 * math.sqrt(0.0455 / d))


@pytest.mark.parametrize("clipping", ["hooks", "ghost"])
def test_one_patient_with_a_huge_gradient_moves_the_update_by_at_most_the_clipping_bound(
    faces, tmp_path, linear_release, monkeypatch, clipping
):
    monkeypatch.setenv(TEST_RNG_ENV, "3")  # both runs draw the same noise: their difference is noise-free
    clip = 1e-3
    data = subset(faces, 8)
    other = SurvivalData(  # patient 0 replaced: inverted face, early event
        np.concatenate([data.images, 255 - data.images[:1]]),
        ((len(data.images),), *data.photos[1:]),
        np.concatenate([[0.1], data.time[1:]]).astype(np.float32),
        np.concatenate([[1], data.event[1:]]),
    )
    train = TrainConfig(batch_size=8, local_epochs=1, clipping=clipping)
    privacy = PrivacyConfig(epsilon=4.0, max_grad_norm=clip)
    a = Release(data, tmp_path, "a", train, privacy)
    b = Release(other, tmp_path, "b", train, privacy)
    moved = float((a.delta - b.delta).norm()) * a.plan.expected_batch_size
    # patient 0's own gradient (plain autograd, no Opacus) is far above the clip...
    model = SurvivalViT("vit_micro", IMG, n_intervals=4)
    model.load_state_dict(start_weights())
    eta, alpha = model(local.to_input(torch.from_numpy(other.images[-1:])))
    local.LOSSES["discrete_hazard"].compute(
        eta, alpha, torch.tensor([0.1]), torch.tensor([1.0]), HORIZON
    ).backward()
    raw = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None))
    assert raw > 100 * clip
    # ...yet swapping the patient changes the sum of clipped gradients by at most 2 clips
    assert clip / 2 < moved <= 2 * clip * (1 + 1e-3)


def test_two_trainings_draw_independent_noise_and_only_the_test_switch_repeats_it(
    faces, tmp_path, linear_release, monkeypatch
):
    train = TrainConfig(batch_size=12, local_epochs=1)
    data = subset(faces, 12)
    first = released_noise(Release(data, tmp_path, "a", train), linear_release)
    linear_release.clear()
    second = released_noise(Release(data, tmp_path, "b", train), linear_release)
    d = first.numel()
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 5 / math.sqrt(d)
    monkeypatch.setenv(TEST_RNG_ENV, "7")
    linear_release.clear()
    third = released_noise(Release(data, tmp_path, "c", train), linear_release)
    linear_release.clear()
    fourth = released_noise(Release(data, tmp_path, "d", train), linear_release)
    assert float(torch.corrcoef(torch.stack([third, fourth]))[0, 1]) > 0.9999  # the check can see a repeat


@pytest.mark.slow
def test_replaying_every_seed_config_and_round_could_give_does_not_reproduce_a_release(
    faces, tmp_path, monkeypatch
):
    data, train = subset(faces, 16), TrainConfig(batch_size=8, local_epochs=1)
    release = Release(data, tmp_path, "site", train).delta
    # the old derivation split_seed * 100003 + round, for split_seed 0 (the default) and 1, rounds 1-3
    for seed in sorted({s * 100_003 + r for s in range(2) for r in range(1, 4)}):
        torch.manual_seed(seed)
        np.random.seed(seed)
        replay = Release(data, tmp_path, f"replay{seed}", train).delta
        assert float((replay - release).abs().max()) > 1e-5, seed
    monkeypatch.setenv(TEST_RNG_ENV, "1")  # control: with a known key the replay does reproduce
    assert torch.equal(Release(data, tmp_path, "x", train).delta, Release(data, tmp_path, "y", train).delta)


@pytest.mark.parametrize("clipping", ["hooks", "ghost"])
def test_empty_poisson_batches_still_take_a_noise_step(
    faces, tmp_path, linear_release, monkeypatch, clipping
):
    monkeypatch.setenv(TEST_RNG_ENV, "2")  # a fixed draw that has empty batches (some 30% of them)
    empty = []
    noise_only = SecureNoiseOptimizer.noise_only_step
    monkeypatch.setattr(
        SecureNoiseOptimizer, "noise_only_step", lambda self: (empty.append(type(self)), noise_only(self))
    )
    # n = 3: q = 1/3, 12 steps, P(empty) = 8/27
    train = TrainConfig(batch_size=1, local_epochs=4, clipping=clipping)
    release = Release(subset(faces, 3), tmp_path, "a", train)
    assert release.stats.steps == 12 and release.stats.sample_rate == pytest.approx(1 / 3)
    assert len(linear_release) == 12  # every accounted step added noise, empty or not
    assert 0 < len(empty) < 12
    assert set(empty) == {SecureGhostOptimizer if clipping == "ghost" else SecureNoiseOptimizer}


def _noise_only_noise(model: torch.nn.Module, sigma: float, clip: float, batch: float) -> list[torch.Tensor]:
    """Each parameter's noise (on the sum, so times the expected batch) from one noise-only step."""
    before = [p.detach().clone() for p in model.parameters()]
    GradSampleModule(model)
    opt = SecureNoiseOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        stream=fresh_stream("test"),
    )
    opt.noise_only_step()
    return [((b - p.detach()) * batch).reshape(-1) for b, p in zip(before, model.parameters(), strict=True)]


def test_noise_only_step_has_the_noise_of_a_real_step():
    weight, _ = _noise_only_noise(torch.nn.Linear(400, 250), sigma=1.3, clip=2.0, batch=5.0)
    assert float(weight.std()) == pytest.approx(1.3 * 2.0, rel=0.02)  # > 7 standard errors at 100k values


def test_every_parameter_tensor_gets_its_own_independent_noise():
    """The step's noise is one draw split among the tensors: each must get its own part, at full scale."""
    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 300), torch.nn.Linear(300, 7))
    noise = _noise_only_noise(model, sigma=1.0, clip=1.0, batch=1.0)
    for z in noise:
        assert float(z.std()) == pytest.approx(1.0, rel=max(0.02, 6 / math.sqrt(z.numel())))
    first, second = noise[0], noise[2]  # the two 300 x 300 weights
    r = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    assert abs(r) < 5 / math.sqrt(first.numel())


@pytest.mark.parametrize("batch_size", [32, 16, 7])
def test_steps_and_rate_are_what_the_ledger_accounts_for_every_n(batch_size):
    old_opacus_short = []
    for n in range(2, 6001):
        plan = SamplingPlan.for_data(n, batch_size, epochs=2)
        per_epoch = math.ceil(n / batch_size)
        assert (plan.steps_per_epoch, plan.steps, plan.sample_rate) == (
            per_epoch,
            2 * per_epoch,
            1 / per_epoch,
        )
        assert plan.expected_batch_size <= batch_size
        if int(1 / plan.sample_rate) != per_epoch:  # what Opacus' own Poisson sampler would have run
            old_opacus_short.append(n)
    if batch_size == 32:  # the sizes the audit found stuck are covered, and were indeed stuck before
        assert {*range(2945, 2977), *range(3137, 3169)} <= set(old_opacus_short)


@pytest.mark.parametrize("n", [*range(2945, 2977, 5), *range(3137, 3169, 5), 2, 33, 500])
def test_the_sampler_runs_exactly_the_planned_steps_with_rate_q(n):
    plan = SamplingPlan.for_data(n, 32, epochs=3)
    batches = list(PoissonBatches(plan, fresh_stream("test")))
    assert len(batches) == plan.steps
    drawn = sum(len(b) for b in batches)
    trials = n * plan.steps
    sd = math.sqrt(trials * plan.sample_rate * (1 - plan.sample_rate))
    assert abs(drawn - trials * plan.sample_rate) <= 5 * sd  # each patient in each step with rate q
    assert all(len(set(b)) == len(b) and all(0 <= i < n for i in b) for b in batches)


def test_secure_stream_draws_uniforms_and_picks():  # normals: tests/test_randomness.py
    stream = SecureStream(os.urandom(32))
    u = stream.random(200_000)
    assert u.min() > 0 and u.max() < 1
    assert scipy_stats.kstest(u, "uniform").pvalue > 1e-4
    picks = np.bincount([stream.below(3) for _ in range(6000)], minlength=3)
    assert scipy_stats.chisquare(picks).pvalue > 1e-4
    assert not np.array_equal(SecureStream(os.urandom(32)).random(8), SecureStream(os.urandom(32)).random(8))


def test_fresh_streams_are_secret_unless_the_test_switch_is_set(monkeypatch):
    monkeypatch.delenv(TEST_RNG_ENV, raising=False)
    assert not np.array_equal(fresh_stream("noise").random(16), fresh_stream("noise").random(16))
    randomness.refuse_test_rng("nothing")  # no switch: nothing to refuse
    monkeypatch.setenv(TEST_RNG_ENV, "42")
    assert np.array_equal(fresh_stream("noise").random(16), fresh_stream("noise").random(16))
    assert not np.array_equal(fresh_stream("noise").random(16), fresh_stream("sampling").random(16))
    with pytest.raises(RuntimeError, match=TEST_RNG_ENV):
        randomness.refuse_test_rng("to start a site")
    monkeypatch.setenv(TEST_RNG_ENV, "yes")
    with pytest.raises(ValueError, match="integer"):
        fresh_stream("noise")


def test_the_test_switch_works_only_under_pytest(monkeypatch):
    """A real site (no pytest around it) that carries the switch refuses to draw, so it cannot train."""
    monkeypatch.setenv(TEST_RNG_ENV, "42")
    assert np.array_equal(fresh_stream("noise").random(4), fresh_stream("noise").random(4))  # under pytest
    monkeypatch.delenv(randomness.UNDER_TEST_ENV)
    with pytest.raises(RuntimeError, match=TEST_RNG_ENV):
        fresh_stream("noise")
    draw = "from fahr_core.privacy.randomness import fresh_stream; fresh_stream('noise')"
    child = [sys.executable, "-c", draw]
    done = subprocess.run(child, capture_output=True, text=True, env={**os.environ, TEST_RNG_ENV: "42"})
    assert done.returncode != 0 and f"{TEST_RNG_ENV} is set outside a test run" in done.stderr


def test_a_real_site_refuses_to_start_with_the_test_switch(demo_site, monkeypatch):
    monkeypatch.setenv(TEST_RNG_ENV, "1")
    result = CliRunner().invoke(client_app, ["start", "--site", "site1", "--config", str(demo_site)])
    assert result.exit_code == 2 and TEST_RNG_ENV in result.output
    assert not SiteWorkdir(demo_site.parent / SITE_WORKDIR).supernode_log.exists()


def test_secagg_rounding_from_a_secure_stream_is_unbiased():
    quantiser = Quantiser.for_sites(1.0, 3)
    x = np.full(50_000, 0.3 * quantiser.step)  # a third of a step: rounds up 30% of the time
    q, _ = quantiser.quantise(x, fresh_stream("secagg"))
    ups = float(q.astype(np.int64).mean())
    assert ups == pytest.approx(0.3, abs=5 * math.sqrt(0.3 * 0.7 / x.size))


def test_a_round_that_fails_mid_training_leaves_a_plain_model(faces, tmp_path, monkeypatch):
    """Opacus' hooks and the rewired Linear layers come off even when training raises, so the model
    a caller keeps never trains without its weight gradients (AdamW skips a tensor with none)."""

    def fail(*args, **kwargs):
        raise MemoryError("out of memory in the middle of a round")

    monkeypatch.setattr(local, "_run_steps", fail)
    model = SurvivalViT("vit_micro", IMG, n_intervals=4)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", 8.0, 1e-5)
    train, privacy = TrainConfig(batch_size=8, local_epochs=1), PrivacyConfig(epsilon=8.0)
    with pytest.raises(MemoryError):
        train_dp(model, subset(faces, 16), train, privacy, ledger, 1, HORIZON, {"server_round": 1})
    assert not any("forward" in vars(m) for m in model.modules())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    eta, alpha = model(to_input(faces.images[:4]))
    (eta.sum() + alpha.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
