"""The site's privacy ledger: one RDP accountant whose history lives on disk at the site.

Every DP-SGD step the site has ever taken, in any round of any federation run, is one entry of
the accountant's history (noise multiplier, sample rate, steps). Epsilon is always computed by
composing that whole history in one accountant; summing per-round epsilons, or starting a fresh
engine each round, would either overstate or (much worse) understate what was spent.

The file is rewritten atomically after each round, so a crash leaves the previous ledger whole.
A round is recorded *before* its update leaves the site: a crash between the two can only make
the ledger pessimistic, never optimistic. A training holds an exclusive lock (`locked`) from
opening the ledger to recording its round, so two trainings of one site cannot both read the
same history and lose one entry. delta is fixed in the file at the first spend. The server keeps
each site's spend too (`require_server_record`): a ledger that shows less (deleted, or a new
workdir) refuses to train instead of silently starting from zero.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from opacus.accountants import PRVAccountant, RDPAccountant

from fahr_core.io import atomic_write_json
from fahr_core.protocol.keys import SPEND_ON_RECORD

Step = tuple[float, float, int]  # (noise multiplier, sample rate, number of steps)
EXHAUSTED = 0.01  # a budget with less than 1% left counts as spent


DELTA_CAP = 1e-5  # the default delta is at most this ...
DELTA_TIMES_N = 1e-3  # ... and at most this over n: n * delta <= 0.001 (also below n^-1.1 for any real n)


class BudgetExceeded(RuntimeError):
    """A round would take the site past its epsilon budget; the site refuses to train."""


class LedgerBehindServer(RuntimeError):
    """The site's ledger shows less spend than the server has on record for it: it was reset or lost."""


def default_delta(n: int) -> float:
    """min(1e-5, 0.001 / n): n * delta <= 0.001, so delta's slack is negligible even summed over patients."""
    return min(DELTA_CAP, DELTA_TIMES_N / max(n, 1))


def encode_spend_on_record(rounds: dict[str, int], epsilon: dict[str, float]) -> str:
    """The server's record of each site's spend, for the train config's SPEND_ON_RECORD (a JSON string)."""
    return json.dumps({site: [rounds[site], epsilon.get(site, 0.0)] for site in sorted(rounds)})


def spend_on_record(config: Mapping, site: str) -> tuple[int, float] | None:
    """(rounds, epsilon) the server has recorded for `site`, from a train config; None if it has none."""
    entry = json.loads(str(config.get(SPEND_ON_RECORD, "{}"))).get(site)
    return None if entry is None else (int(entry[0]), float(entry[1]))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock (flock on `path`.lock) across processes: open, calibrate, train, record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def epsilon_of(history: list[Step], delta: float) -> float:
    """Epsilon of the composition of every step in `history`, at `delta` (RDP accountant)."""
    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def epsilon_prv_of(history: list[Step], delta: float) -> float:
    """The same composition by the PRV accountant (Gopi et al. 2021), to within 0.01 in epsilon.

    Numerically tight where RDP's conversion is loose, so it is reported beside the RDP epsilon in
    the site report; budgets are still calibrated and enforced with RDP, the conservative of the two.
    It takes seconds, so it is computed for the report, not every round.
    """
    if not history:
        return 0.0
    acc = PRVAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta, eps_error=0.01))


@dataclass
class PrivacyLedger:
    path: Path
    budget: float
    delta: float
    history: list[Step] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, budget: float, delta: float = 0.0, n_train: int = 0) -> PrivacyLedger:
        """Load the ledger at `path`, or start an empty one. The budget may not be lowered.

        `delta` is the configured delta, 0 for the default: a new ledger takes it (or
        default_delta(n_train)) and it is fixed at the first spend; later the stored delta holds,
        whatever n_train has become, and only a configured delta that differs is refused.
        """
        path = Path(path)
        if not path.exists():
            delta = delta or default_delta(n_train)
            if n_train and delta * n_train >= 1:
                raise ValueError(f"delta {delta:g} is not below 1/n = 1/{n_train}; it would protect no one")
            return cls(path=path, budget=budget, delta=delta)
        try:
            raw = json.loads(path.read_text())
            ledger = cls(
                path=path,
                budget=float(raw["budget"]),
                delta=float(raw["delta"]),
                history=[(float(s), float(q), int(n)) for s, q, n in raw["history"]],
                rounds=list(raw["rounds"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: privacy ledger is unreadable ({e}); refusing to train") from None
        if delta and not math.isclose(ledger.delta, delta, rel_tol=1e-9):
            raise ValueError(
                f"{path}: delta was {ledger.delta:g} for earlier rounds and is now {delta:g}; "
                "a site's delta cannot change once it has spent privacy"
            )
        if budget < ledger.budget:
            raise ValueError(f"{path}: budget lowered from {ledger.budget:g} to {budget:g}; refusing")
        ledger.budget = budget
        return ledger

    def require_server_record(self, rounds: int, epsilon: float) -> None:
        """Refuse to train if the server has recorded more rounds or epsilon for this site than we hold."""
        if len(self.rounds) < rounds or self.epsilon < epsilon * (1 - 1e-6):
            raise LedgerBehindServer(
                f"{self.path}: the ledger shows {len(self.rounds)} round(s), epsilon {self.epsilon:.4f}, but "
                f"the server has recorded {rounds} round(s), epsilon {epsilon:.4f} for this site: the ledger "
                "was reset or lost (deleted .fahr/ or a changed [site].workdir). Restore the ledger backup; "
                "the site will not train from a zero spend"
            )

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta)

    @property
    def epsilon_prv(self) -> float:
        return epsilon_prv_of(self.history, self.delta)

    def epsilon_after(self, step: Step) -> float:
        return epsilon_of([*self.history, step], self.delta)

    def calibrate(self, sample_rate: float, steps_this_round: int, rounds_left: int) -> float:
        """Smallest noise multiplier such that `rounds_left` rounds like this one fit the budget.

        The remaining budget is spread evenly over the rounds still planned, so the site does not
        spend everything in round 1. Bisection on the composed epsilon (monotone in sigma).
        """
        spent = self.epsilon
        if spent >= (1 - EXHAUSTED) * self.budget:
            raise BudgetExceeded(
                f"privacy budget exhausted: epsilon spent {spent:.3f} of {self.budget:g}; what is left "
                "could only buy an update drowned in noise, so the site does not train"
            )
        planned = (sample_rate, steps_this_round * max(rounds_left, 1))

        def eps(sigma: float) -> float:
            return epsilon_of([*self.history, (sigma, *planned)], self.delta)

        lo, hi = 0.3, 1.0
        while eps(hi) > self.budget:
            hi *= 2
            if hi > 1e4:
                raise BudgetExceeded(
                    f"privacy budget exhausted: epsilon spent {self.epsilon:.3f} of {self.budget:g}; "
                    "no noise level lets this site train another round"
                )
        if eps(lo) <= self.budget:
            return lo
        while hi - lo > 1e-3 * hi:  # sigma to 0.1%: finer changes epsilon by far less than it matters
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid) <= self.budget else (mid, hi)
        return hi

    def check(self, step: Step) -> float:
        """Epsilon after `step`; raises BudgetExceeded if that is over budget."""
        after = self.epsilon_after(step)
        if after > self.budget * (1 + 1e-9):
            raise BudgetExceeded(
                f"round refused: epsilon would reach {after:.3f}, over the site's budget "
                f"{self.budget:g} (already spent {self.epsilon:.3f})"
            )
        return after

    def record(self, step: Step, info: dict) -> float:
        """Add a round's steps, persist atomically, and return the new cumulative epsilon."""
        self.check(step)
        self.history.append((float(step[0]), float(step[1]), int(step[2])))
        eps = self.epsilon
        self.rounds.append(
            {
                **info,
                "noise_multiplier": step[0],
                "sample_rate": step[1],
                "steps": step[2],
                "epsilon_after": eps,
            }
        )
        atomic_write_json(
            self.path,
            {
                "budget": self.budget,
                "delta": self.delta,
                "accountant": "rdp",
                "history": [list(h) for h in self.history],
                "rounds": self.rounds,
                "epsilon": eps,
            },
        )
        return eps
