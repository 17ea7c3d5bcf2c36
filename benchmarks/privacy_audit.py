"""Empirical privacy audit of a site's DP-SGD release, in one training run (or many, for a tighter bound).

Method: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846). m canary patients are crafted; the auditor includes each in the site's
training set independently with probability 1/2, drawn from the operating system's CSPRNG (no
seed: the draw is recorded, never reproducible). The site trains once, through the real code
path (`fahr_core.train.local.train_dp` with the site's `PrivacyLedger`). The auditor then scores
each canary from the released weights alone (white box: it knows the weights it sent and the
weights it got back), guesses "in" for the k+ highest scores and "out" for the k- lowest, and
counts the correct guesses. Their Theorem 5.2 turns that count into the largest epsilon that
(epsilon, delta)-DP could still explain at the stated confidence: if the release were
(epsilon, delta)-DP, v or more correct guesses out of r would have probability at most

    P[Binomial(r, e^eps / (1 + e^eps)) >= v]
      + 2 m delta * max_{1 <= i <= v} P[v - i <= Binomial(r, e^eps / (1 + e^eps)) < v] / i,

so any epsilon whose bound is below alpha (default 0.05) is refuted at confidence 1 - alpha.

The score is the white-box gradient test: the released update (w_after - w_before) projected on
the canary's own gradient at w_before. Canaries are out-of-distribution "faces" (random
black-and-white pixels) with a mislabelled outcome (death in the first month), so their gradients
point in directions no real face shares.

Threat model, and what the number means: docs/privacy.md, section "Empirical privacy audit".

    python benchmarks/privacy_audit.py                       # the real build
    python benchmarks/privacy_audit.py --broken noise-off    # no noise is added; the ledger is unchanged
    python benchmarks/privacy_audit.py --broken no-clip      # no clipping; noise for the claimed norm
    python benchmarks/privacy_audit.py --repeated 200        # classic audit: 200 runs, one canary
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from opacus.optimizers.optimizer import DPOptimizer
from scipy import stats

from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.config import PrivacyConfig, TrainConfig
from fahr_core.faces.images import load_faces, to_input
from fahr_core.models.vit import PATCH, SurvivalViT
from fahr_core.privacy.ledger import PrivacyLedger
from fahr_core.survival.losses import LOSSES
from fahr_core.train.local import SurvivalData, train_dp
from fahr_core.workdir import SiteWorkdir

HORIZON = 10.0  # years; the canaries die in the first interval of it
CANARY_TIME = 0.05
BROKEN_MODES = ("noise-off", "no-clip")
SCORED = "encoder.patch_embed.proj.weight"  # the parameter the membership score reads
NO_CLIP_NORM = 1e6  # "no clipping": a bound no gradient reaches


# ---------------------------------------------------------------- the bound (Steinke et al. 2023)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct of r guesses] under (eps, delta)-DP with m canaries (Steinke et al., Thm 5.2).

    An eps-DP release cannot let any guesser beat randomized response at eps, whose guesses are
    right independently with probability e^eps / (1 + e^eps); delta adds the second term.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v-i <= X < v], i = 1..v
    slack = float(np.max(below / np.arange(1, v + 1))) if delta > 0 else 0.0
    return min(1.0, tail + 2 * m * delta * slack)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float = 0.05) -> float:
    """The largest eps that v correct of r guesses refute at confidence 1 - alpha (0 if none).

    p_value grows with eps, so the refuted set is an interval [0, eps*); bisection to 1e-4.
    """
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo


@dataclass(frozen=True)
class Guesses:
    k_in: int  # guessed "in": the k_in highest scores
    k_out: int  # guessed "out": the k_out lowest scores
    correct: int
    epsilon: float  # lower bound at confidence 1 - alpha, Bonferroni-corrected over the rules tried


def guessing_rules(m: int) -> list[tuple[int, int]]:
    """The (k_in, k_out) rules tried, fixed before any score is seen.

    Few and spread out: each is tested at alpha / len(rules), so the best of them is still a
    bound at confidence 1 - alpha (union bound), whatever the scores turn out to be.
    """
    sizes = sorted({max(1, round(m * f)) for f in (0.02, 0.05, 0.1, 0.25)})
    return [(k, 0) for k in sizes] + [(k, k) for k in sizes]


def one_run_bound(scores: np.ndarray, included: np.ndarray, delta: float, alpha: float = 0.05) -> Guesses:
    """Guess membership from the scores under each rule and keep the best (corrected) bound."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    rules = guessing_rules(m)
    best = Guesses(0, 0, 0, 0.0)
    for k_in, k_out in rules:
        if k_in + k_out > m:
            continue
        correct = int(included[order[:k_in]].sum()) + int(
            (~included[order[m - k_out :]]).sum() if k_out else 0
        )
        eps = epsilon_lower_bound(m, k_in + k_out, correct, delta, alpha / len(rules))
        if eps > best.epsilon or best.k_in == 0:
            best = Guesses(k_in, k_out, correct, eps)
    return best


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) interval for a binomial proportion."""
    lo = float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1)) if successes else 0.0
    hi = (
        float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes)) if successes < trials else 1.0
    )
    return lo, hi


def hypothesis_test_bound(
    tp: int, n_in: int, fp: int, n_out: int, delta: float, alpha: float = 0.05
) -> float:
    """Classic audit: (eps, delta)-DP forces TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta.

    With Clopper-Pearson bounds on TPR and FPR (each at alpha / 2, so both hold at 1 - alpha),
    the smallest eps consistent with either inequality is a lower bound.
    """
    tpr_lo = clopper_pearson(tp, n_in, alpha)[0]
    fpr_hi = clopper_pearson(fp, n_out, alpha)[1]
    bounds = [0.0]
    if tpr_lo - delta > 0 and fpr_hi > 0:
        bounds.append(math.log((tpr_lo - delta) / fpr_hi))
    if (1 - fpr_hi) - delta > 0 and (1 - tpr_lo) > 0:
        bounds.append(math.log(((1 - fpr_hi) - delta) / (1 - tpr_lo)))
    return max(bounds)


# ---------------------------------------------------------------- canaries, weights, scores


@dataclass(frozen=True)
class AuditSetup:
    """What the auditor controls: the background patients, the canaries and the global weights."""

    background: SurvivalData
    canaries: np.ndarray  # uint8 (m, 3, H, W): one photo per canary patient
    slots: np.ndarray  # per canary: its dark pixel, as a column of the patch embedding's weight
    state: dict[str, torch.Tensor]  # the global weights the (malicious) server sends
    arch: str
    img_size: int


def background_patients(n: int, img_size: int, rng: np.random.Generator) -> SurvivalData:
    """n real faces (the bundled demo sample, cycled) with plausible survival outcomes."""
    faces = load_labelled_faces(demo_faces_dir())
    images = load_faces([faces[i % len(faces)].path for i in range(min(n, len(faces)))], img_size)
    return SurvivalData(
        images=images,
        photos=tuple((i % len(images),) for i in range(n)),
        time=rng.uniform(0.5, HORIZON * 1.2, n),
        event=(rng.random(n) < 0.3).astype(int),
    )


def lit_pixel_canaries(m: int, img_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """m grey images, canary i dark at its own (channel, row, column) inside every 16x16 patch.

    The patch embedding multiplies each patch's pixels by one shared weight matrix, so the dark
    pixel's gradient lands in that pixel's column of the matrix. Grey (127 or 128) is +-1/255
    after `to_input`; its sign is drawn at random per pixel because a constant grey would leak
    every canary's gradient into every column with one sign, and Adam, which scales each
    coordinate to a step of the same size, would let that leak outweigh a canary's own column.
    Distinct pixels make the canaries' gradients there orthogonal to one another, whence at most
    3 x 16 x 16 = 768 canaries.
    """
    slots = 3 * PATCH * PATCH
    if not 0 < m <= slots:
        raise ValueError(
            f"--canaries must be between 1 and {slots} (one pixel of a 16x16 patch each), got {m}"
        )
    images = rng.integers(127, 129, (m, 3, img_size, img_size), dtype=np.uint8)  # grey, +-1/255 at random
    chosen = rng.permutation(slots)[:m]
    for i, slot in enumerate(chosen):
        channel, row, col = np.unravel_index(slot, (3, PATCH, PATCH))
        images[i, channel, row::PATCH, col::PATCH] = 0
    return images, chosen


def make_setup(
    n_canaries: int, n_background: int, arch: str, img_size: int, weight_scale: float
) -> AuditSetup:
    """Canaries and crafted global weights, from the auditor's CSPRNG (a fresh draw every audit).

    The server picks the weights: a random encoder and a risk layer scaled by `weight_scale`, so
    every patient's gradient is non-zero (the default head starts at zero) and, scaled up, far
    above the clipping norm (what makes missing clipping visible).
    """
    rng = np.random.default_rng(secrets.randbits(128))
    torch.manual_seed(secrets.randbits(63))
    canaries, slots = lit_pixel_canaries(n_canaries, img_size, rng)
    model = SurvivalViT(arch, img_size, n_intervals=10)
    with torch.no_grad():
        model.head.risk.weight.normal_(0.0, weight_scale / math.sqrt(model.head.risk.in_features))
        # canaries at low risk (eta -3): a death's loss is then ~linear in eta, its gradient far from 0
        eta, _ = model(to_input(canaries[:1]))
        model.head.risk.bias.sub_(eta + 3.0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return AuditSetup(
        background_patients(n_background, img_size, rng), canaries, slots, state, arch, img_size
    )


def training_set(setup: AuditSetup, included: np.ndarray) -> SurvivalData:
    """The background patients plus the included canaries (each one photo, death in month 1)."""
    bg = setup.background
    chosen = setup.canaries[included]
    k = len(chosen)
    return SurvivalData(
        images=np.concatenate([bg.images, chosen]),
        photos=bg.photos + tuple((len(bg.images) + i,) for i in range(k)),
        time=np.concatenate([bg.time, np.full(k, CANARY_TIME)]),
        event=np.concatenate([bg.event, np.ones(k, dtype=int)]),
    )


def build_model(setup: AuditSetup) -> SurvivalViT:
    model = SurvivalViT(setup.arch, setup.img_size, n_intervals=10)
    model.load_state_dict(setup.state)
    return model


def canary_scores(setup: AuditSetup, released: dict[str, torch.Tensor], train: TrainConfig) -> np.ndarray:
    """Per canary: -<update, g> / |g| in the canary's own column of the patch embedding.

    g is the canary's gradient at the weights the server sent, update = w_after - w_before.
    Gradient descent moves the weights against the gradients of the patients it trained on, so an
    included canary's gradient shows up in its column; an excluded canary's column moves only
    with the noise (and the grey pixels' faint trace of the other canaries, which points the
    other way: see lit_pixel_canaries). No other canary has a gradient in that column.
    """
    model = build_model(setup)  # full fine-tuning, as a site's default: the patch embedding trains
    weight = dict(model.named_parameters())[SCORED]
    update = (released[SCORED] - setup.state[SCORED]).flatten(1)  # (dim, 3 * 16 * 16)
    model.eval()  # no dropout in these ViTs; eval keeps the forward pass deterministic regardless
    t, e = torch.tensor([CANARY_TIME]), torch.tensor([1.0])
    scores = np.empty(len(setup.canaries))
    for i, (image, slot) in enumerate(zip(setup.canaries, setup.slots, strict=True)):
        eta, alpha = model(to_input(image[None]))
        (grad,) = torch.autograd.grad(LOSSES[train.loss].compute(eta, alpha, t, e, HORIZON), weight)
        g = grad.flatten(1)[:, slot]
        scores[i] = float(-(update[:, slot] @ g) / g.norm().clamp_min(1e-12))
    return scores


# ---------------------------------------------------------------- the site's release


def release(
    model: SurvivalViT, data: SurvivalData, train: TrainConfig, privacy: PrivacyConfig, workdir: Path
):
    """The one call into the site's training code: one round of `train_dp` with a fresh ledger.

    Returns (claimed epsilon, delta) as the site's ledger records them; `model` is trained in place.
    """
    ledger = PrivacyLedger.open(SiteWorkdir(workdir).ledger, privacy.epsilon, privacy.delta, len(data))
    stats_ = train_dp(model, data, train, privacy, ledger, 1, HORIZON, {"audit": True})
    return stats_.epsilon, stats_.delta


@contextmanager
def broken_build(mode: str | None) -> Iterator[None]:
    """Break the DP mechanism in-process, leaving the ledger's accounting as it is.

    The patch sits on Opacus' `DPOptimizer.__init__`, below fahr's code, which every DP-SGD
    optimizer Opacus or fahr builds goes through, however its noise is drawn: "noise-off" sets
    the noise multiplier to 0; "no-clip" raises the clipping norm out of reach while keeping the
    noise the ledger accounted (noise multiplier x claimed norm).
    """
    if mode is None:
        yield
        return
    if mode not in BROKEN_MODES:
        raise ValueError(f"--broken must be one of {', '.join(BROKEN_MODES)}, got {mode!r}")
    original = DPOptimizer.__init__

    def init(self, *args, **kwargs):
        if mode == "noise-off":
            kwargs["noise_multiplier"] = 0.0
        else:
            kwargs["noise_multiplier"] *= kwargs["max_grad_norm"] / NO_CLIP_NORM
            kwargs["max_grad_norm"] = NO_CLIP_NORM
        original(self, *args, **kwargs)

    with mock.patch.object(DPOptimizer, "__init__", init):
        yield


# ---------------------------------------------------------------- the audits


@dataclass(frozen=True)
class AuditParams:
    """The audit's knobs. Defaults: the most sensitive setting found on the reference machine.

    One DP-SGD step over every patient (batch_size >= n makes the sample rate 1): no subsampling
    and no later steps to blur a canary's trace. No background faces: a real face moves every
    column of the patch embedding, so it blurs the canaries' columns (measured with 32 faces:
    noise-off bound 0.90 instead of 4.31, no-clip 0.00). DP promises the bound for every
    dataset, so a cohort of canaries is a fair test of it.
    """

    canaries: int = 768
    background: int = 0
    arch: str = "vit_micro"
    img_size: int = 32
    epsilon: float = 2.0  # the budget the site claims (its ledger's epsilon after the round)
    delta: float = 1e-6
    epochs: int = 1
    batch_size: int = 1024
    lr: float = 1e-3
    weight_scale: float = 20.0
    alpha: float = 0.05
    broken: str | None = None


def configs(p: AuditParams) -> tuple[TrainConfig, PrivacyConfig]:
    train = TrainConfig(local_epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, threads=0)
    return train, PrivacyConfig(epsilon=p.epsilon, delta=p.delta, max_grad_norm=1.0)


def one_run_audit(p: AuditParams) -> dict:
    """Steinke et al.'s audit: one training run with p.canaries canaries, each in with probability 1/2."""
    started = time.perf_counter()
    setup = make_setup(p.canaries, p.background, p.arch, p.img_size, p.weight_scale)
    included = np.array([secrets.randbits(1) == 1 for _ in range(p.canaries)])
    train, privacy = configs(p)
    model = build_model(setup)
    with tempfile.TemporaryDirectory(prefix="fahr-audit-") as tmp, broken_build(p.broken):
        claimed, delta = release(model, training_set(setup, included), train, privacy, Path(tmp))
    trained = time.perf_counter() - started
    released = {k: v.detach() for k, v in model.state_dict().items()}
    scores = canary_scores(setup, released, train)
    best = one_run_bound(scores, included, delta, p.alpha)
    return {
        "audit": "one run",
        "build": p.broken or "real",
        "claimed_epsilon": claimed,
        "delta": delta,
        "confidence": 1 - p.alpha,
        "empirical_epsilon_lower_bound": best.epsilon,
        "guesses": best.k_in + best.k_out,
        "guessed_in": best.k_in,
        "guessed_out": best.k_out,
        "correct": best.correct,
        "canaries": p.canaries,
        "canaries_included": int(included.sum()),
        "included": "".join("1" if x else "0" for x in included),
        "mean_score_in": float(scores[included].mean()),
        "mean_score_out": float(scores[~included].mean()),
        "train_seconds": trained,
        "seconds": time.perf_counter() - started,
        "params": p.__dict__,
    }


def repeated_audit(p: AuditParams, runs: int) -> dict:
    """The classic audit: `runs` trainings, canary 0 in or out by a secret coin, the rest always in.

    The first half of the runs sets the threshold (midway between the mean scores with and
    without the canary); the second half is guessed with it, and Clopper-Pearson bounds on its
    true and false positive rates give the bound (hypothesis_test_bound). Runs are independent,
    unlike one run's canaries, so the bound needs no correction; it needs many runs instead.
    """
    started = time.perf_counter()
    setup = make_setup(p.canaries, p.background, p.arch, p.img_size, p.weight_scale)
    target = AuditSetup(
        setup.background, setup.canaries[:1], setup.slots[:1], setup.state, p.arch, p.img_size
    )
    train, privacy = configs(p)
    coins, scores = [], []
    for _ in range(runs):
        included = np.ones(p.canaries, dtype=bool)
        included[0] = secrets.randbits(1) == 1
        model = build_model(setup)
        with tempfile.TemporaryDirectory(prefix="fahr-audit-") as tmp, broken_build(p.broken):
            claimed, delta = release(model, training_set(setup, included), train, privacy, Path(tmp))
        released = {k: v.detach() for k, v in model.state_dict().items()}
        coins.append(bool(included[0]))
        scores.append(canary_scores(target, released, train)[0])
    half = runs // 2
    calibration, held = np.array(coins[:half]), np.array(coins[half:])
    cal_scores = np.array(scores[:half])
    if calibration.all() or not calibration.any():
        raise ValueError(f"the first {half} runs all drew the same coin; run more (--repeated)")
    threshold = (cal_scores[calibration].mean() + cal_scores[~calibration].mean()) / 2
    coins_, guesses_ = held, np.array(scores[half:]) > threshold
    tp, fp = int((coins_ & guesses_).sum()), int((~coins_ & guesses_).sum())
    n_in, n_out = int(coins_.sum()), int((~coins_).sum())
    return {
        "audit": f"{runs} runs",
        "build": p.broken or "real",
        "claimed_epsilon": claimed,
        "delta": delta,
        "confidence": 1 - p.alpha,
        "empirical_epsilon_lower_bound": hypothesis_test_bound(tp, n_in, fp, n_out, delta, p.alpha),
        "true_positives": tp,
        "runs_in": n_in,
        "false_positives": fp,
        "runs_out": n_out,
        "coins": "".join("1" if c else "0" for c in coins),
        "threshold": float(threshold),
        "seconds": time.perf_counter() - started,
        "params": p.__dict__,
    }


TINY = {"canaries": 128, "epsilon": 1.0}  # a fast run for the tests: perfect guesses still beat eps 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = AuditParams()
    ap.add_argument("--broken", choices=BROKEN_MODES, help="audit a deliberately broken DP mechanism")
    ap.add_argument(
        "--repeated", type=int, default=0, metavar="RUNS", help="classic audit over RUNS trainings"
    )
    ap.add_argument("--canaries", type=int, default=d.canaries)
    ap.add_argument(
        "--background", type=int, default=d.background, help="real faces trained beside the canaries"
    )
    ap.add_argument(
        "--epsilon", type=float, default=d.epsilon, help="the site's budget (the claimed epsilon)"
    )
    ap.add_argument("--delta", type=float, default=d.delta)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--alpha", type=float, default=d.alpha, help="1 - confidence of the bound")
    ap.add_argument("--tiny", action="store_true", help=f"a fast run: {TINY}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the result (with the secret coins) here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = AuditParams(
        canaries=a.canaries,
        background=a.background,
        epsilon=a.epsilon,
        delta=a.delta,
        epochs=a.epochs,
        batch_size=a.batch_size,
        alpha=a.alpha,
        broken=a.broken,
    )
    if a.tiny:
        p = AuditParams(**{**p.__dict__, **TINY})
    result = repeated_audit(p, a.repeated) if a.repeated else one_run_audit(p)
    print(
        f"# privacy audit ({result['audit']}) - {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
        f"{p.arch} {p.img_size}px, {p.canaries} canaries, {p.background} background faces, "
        f"build: {result['build']}"
    )
    print(f"claimed epsilon (site ledger):   {result['claimed_epsilon']:.3f} at delta {result['delta']:g}")
    print(
        f"empirical epsilon lower bound:   {result['empirical_epsilon_lower_bound']:.3f} "
        f"at {100 * result['confidence']:.0f}% confidence"
    )
    if "guesses" in result:
        print(
            f"guesses: {result['correct']} of {result['guesses']} correct "
            f"({result['guessed_in']} in, {result['guessed_out']} out)"
        )
    else:
        print(
            f"guessed in (second half of the runs): {result['true_positives']} of {result['runs_in']} "
            f"with the canary, {result['false_positives']} of {result['runs_out']} without"
        )
    violated = result["empirical_epsilon_lower_bound"] > result["claimed_epsilon"]
    print(
        "VIOLATION: the release is less private than the ledger claims"
        if violated
        else "no violation detected"
    )
    print(f"{result['seconds']:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
