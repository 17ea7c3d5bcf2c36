"""`fahr-client status`: what this site has spent and sent, from its own files only.

The privacy ledger is the authority on epsilon (every DP-SGD step the site ever took, composed in
one accountant); the outbound audit log says in which federation run each round was sent, and its
hash chain shows whether anyone edited it. Reading them changes neither.
"""

from __future__ import annotations

import json

from fahr_core.config import SiteConfig
from fahr_core.privacy.audit import verify_audit_log
from fahr_core.protocol import keys


def site_status(cfg: SiteConfig, last: int = 5) -> list[str]:
    """Lines to print: budget spent and left, epsilon per run and per round, last rounds, audit check."""
    lines = [f"site {cfg.name} (workdir {cfg.workdir})"]
    lines += _ledger_lines(cfg, last)
    lines += _runs_lines(cfg)
    lines.append(_audit_line(cfg))
    evaluation = cfg.paths.last_evaluation
    if evaluation.exists():
        meta = json.loads(evaluation.read_text())["meta"]
        lines.append(
            f"last evaluation: round {meta.get('server_round')} of run {meta.get('run_id')}; "
            f"report: {cfg.paths.report_page}"
        )
    return lines


def _ledger_lines(cfg: SiteConfig, last: int) -> list[str]:
    path = cfg.paths.ledger
    if not path.exists():
        return [f"privacy: nothing spent yet (no ledger at {path}); budget {cfg.privacy.epsilon:g}"]
    try:
        ledger = json.loads(path.read_text())
        budget, spent, rounds = float(ledger["budget"]), float(ledger["epsilon"]), list(ledger["rounds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"privacy: {path} is unreadable ({e}); the site refuses to train until it is restored"]
    lines = [
        f"privacy: epsilon {spent:.3f} spent of {budget:g} (delta {float(ledger['delta']):.2e}), "
        f"{max(budget - spent, 0.0):.3f} left; {len(rounds)} round(s) trained ({path}, back it up)"
    ]
    rows, prev = [], 0.0
    for r in rounds:
        after = float(r["epsilon_after"])
        rows.append(
            f"  round {r.get('server_round', '?')}/{r.get('num_rounds', '?')}: noise multiplier "
            f"{float(r['noise_multiplier']):.3f}, {r['steps']} steps, "
            f"epsilon +{after - prev:.3f} -> {after:.3f}"
        )
        prev = after
    if rows:
        lines.append(f"last {min(last, len(rows))} round(s) trained (epsilon composed over all rounds):")
    return lines + rows[-last:]


def _runs_lines(cfg: SiteConfig) -> list[str]:
    """Epsilon reached at the end of each federation run, from the train replies in the audit log."""
    path = cfg.paths.audit
    if not path.exists():
        return []
    reached: dict[int, tuple[list[int], float]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the chain check below names the broken line
        metrics = record.get("metrics", {})
        if keys.EPSILON in metrics:
            # an evaluation reply repeats the epsilon of the run's last round: one round, listed once
            rounds, _ = reached.get(record["run_id"], ([], 0.0))
            if record["round"] not in rounds:
                rounds = [*rounds, record["round"]]
            reached[record["run_id"]] = (rounds, float(metrics[keys.EPSILON]))
    lines = ["epsilon per federation run (cumulative at the run's last update sent):"] if reached else []
    previous = 0.0
    for run_id, (rounds, epsilon) in reached.items():
        lines.append(
            f"  run {run_id}: rounds {', '.join(map(str, rounds))}; epsilon +{epsilon - previous:.3f} "
            f"-> {epsilon:.3f}"
        )
        previous = epsilon
    return lines


def _audit_line(cfg: SiteConfig) -> str:
    try:
        n = verify_audit_log(cfg.paths.audit)
    except ValueError as e:
        return f"outbound audit log: BROKEN: {e}"
    return f"outbound audit log: chain intact, {n} record(s) ({cfg.paths.audit})"
