"""`fahr-server status`: the picture of a federation from its workdir alone, running or finished.

It reads only files the run writes atomically or appends whole lines to (state.json, run.json,
events.jsonl), so it can run beside a live federation, as another user, without disturbing it.
"""

from __future__ import annotations

import json
from pathlib import Path

from fahr_core.config import ServerConfig
from fahr_core.workdir import ServerWorkdir
from fahr_server.events import describe, privacy_spend, read_events
from fahr_server.state import ResumeError, read_state


def federation_status(cfg: ServerConfig) -> list[str]:
    """Lines to print: where the run stands, every event so far, and each site's privacy spend."""
    work = cfg.workdir
    if not work.exists():
        return [f"{work}: no federation has run here yet ([federation].workdir)"]
    events = read_events(work)
    lines = [f"workdir {work}", _standing(work, cfg.rounds, events)]
    lines += ["", "events:"] + [f"  {describe(e)}" for e in events] if events else ["no events recorded yet"]
    spend = _site_spend(events)
    if spend:
        lines += ["", "privacy spent per site (each site's own ledger total, as it last reported):"]
        lines += [f"  {site}: {text}" for site, text in sorted(spend.items())]
    return lines


def _standing(work: Path, planned: int, events: list[dict]) -> str:
    summary = ServerWorkdir(work).run_summary
    if summary.exists():
        done = json.loads(summary.read_text())
        return f"finished: {len(done['completed_rounds'])} of {done['rounds']} rounds completed"
    try:
        state = read_state(work)
    except ResumeError as e:
        return f"state unreadable: {e}"
    completed = 0 if state is None else state.last_round
    last = next((e for e in reversed(events) if e["kind"] in ("run_failed", "round_started")), None)
    if last is not None and last["kind"] == "run_failed":  # not followed by a resumed run's rounds
        return (
            f"stopped after {completed} of {planned} completed rounds: {last['reason']} "
            f"(continue with `fahr-server run --resume` once that is fixed)"
        )
    return f"running or interrupted: {completed} of {planned} rounds completed"


def _site_spend(events: list[dict]) -> dict[str, str]:
    """site -> its latest update's privacy line (later updates replace earlier ones)."""
    latest: dict[str, str] = {}
    for e in events:
        if e["kind"] == "update_received":
            latest[e["site"]] = privacy_spend(e["metrics"])
    return latest
