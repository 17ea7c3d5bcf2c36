"""The federation's event log: one JSON line per thing an operator needs to know, and its one-line text.

The ServerApp runs inside Flower's own processes, so it cannot print to the coordinator's terminal;
it appends events to `workdir/events.jsonl` instead. `fahr-server run` follows that file and prints
each event as it lands (Flower's own log goes to run.log), and `fahr-server status` prints the same
lines from the same file, for a running federation or a finished one. Privacy figures are per site,
never averaged: a mean epsilon or noise multiplier describes no site.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fahr_core.protocol import keys
from fahr_core.workdir import ServerWorkdir


def emit(workdir: Path, kind: str, **fields) -> None:
    """Append one event. A single short write to a file opened for appending lands whole."""
    line = json.dumps({"at": time.time(), "kind": kind, **fields}, sort_keys=True) + "\n"
    with ServerWorkdir(Path(workdir)).events_log.open("a") as f:
        f.write(line)


def read_events(workdir: Path) -> list[dict]:
    """Every whole event in the workdir (a line half-written by a dying server is skipped)."""
    path = ServerWorkdir(Path(workdir)).events_log
    if not path.exists():
        return []
    return [e for line in path.read_text().splitlines() if (e := _parse(line)) is not None]


def end_of_log(workdir: Path) -> int:
    """Where the next event will be written: `follow` from here shows only events still to come."""
    path = ServerWorkdir(Path(workdir)).events_log
    return path.stat().st_size if path.exists() else 0


def follow(workdir: Path, offset: int, stop: Callable[[], bool]) -> Iterator[dict]:
    """Yield the events appended after byte `offset` as they land, until `stop()` is true (then
    drain what is left)."""
    path = ServerWorkdir(Path(workdir)).events_log
    while True:
        done = stop()
        if path.exists():
            with path.open() as f:
                f.seek(offset)
                chunk = f.read()
            whole = chunk[: chunk.rfind("\n") + 1]
            offset += len(whole.encode())
            for line in whole.splitlines():
                if (event := _parse(line)) is not None:
                    yield event
        if done:
            return
        time.sleep(0.2)


def _parse(line: str) -> dict | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "kind" in event else None


def emit_round(workdir: Path, record: dict, seen: set[str]) -> None:
    """The events of one aggregated round (a rounds.jsonl record): sites seen for the first time,
    each update with its privacy spend, each rejection and each failure with its reason."""
    server_round = record["round"]
    for site, metrics in record["sites"].items():
        if site not in seen:
            seen.add(site)
            emit(workdir, "site_joined", site=site)
        privacy = {k: metrics[k] for k in (keys.EPSILON, keys.EPSILON_BUDGET) if k in metrics}
        emit(workdir, "update_received", round=server_round, site=site, metrics=privacy)
    for site, reason in record["rejected"].items():
        emit(workdir, "update_rejected", round=server_round, site=site, reason=reason)
    for site, reason in record["failures"].items():
        emit(workdir, "site_failed", round=server_round, site=site, reason=reason)


def privacy_spend(update: dict) -> str:
    """`epsilon 1.23 spent, 6.77 left of 8` for one site's update, from what the site reported."""
    if keys.EPSILON not in update:
        return "no privacy figures (secure aggregation sends them with the masked update)"
    spent = float(update[keys.EPSILON])
    if keys.EPSILON_BUDGET not in update:
        return f"epsilon {spent:.3f} spent"
    budget = float(update[keys.EPSILON_BUDGET])
    return f"epsilon {spent:.3f} spent, {max(budget - spent, 0.0):.3f} left of {budget:g}"


# kind -> the event's text; an event of a kind not listed (from a newer version) prints its fields
_TEXTS: dict[str, Callable[[dict], str]] = {
    "round_started": lambda e: (
        f"round {e['round']}/{e['rounds']} started: {e['connected']} site(s) connected"
    ),
    "site_joined": lambda e: f"site {e['site']} joined (its first update arrived)",
    "update_received": lambda e: (
        f"round {e['round']}: update from {e['site']}: {privacy_spend(e['metrics'])}"
    ),
    "update_rejected": lambda e: f"round {e['round']}: update from {e['site']} REJECTED: {e['reason']}",
    "site_failed": lambda e: f"round {e['round']}: site {e['site']} FAILED: {e['reason']}",
    "round_done": lambda e: (
        f"round {e['round']}/{e['rounds']} done in {e['seconds']:.1f} s: {e['sites']} update(s) aggregated"
    ),
    "checkpoint_written": lambda e: f"round {e['round']}: checkpoint {e['path']}",
    "evaluation_received": lambda e: f"final evaluation from {e['site']}",
    "report_written": lambda e: f"report written: {e['path']}",
    "run_failed": lambda e: f"federation STOPPED: {e['reason']}",
}


def _fields(e: dict) -> str:
    return f"{e['kind']}: {json.dumps({k: v for k, v in e.items() if k not in ('at', 'kind')})}"


def describe(event: dict) -> str:
    """The event as the one line the console prints, time first."""
    at = time.strftime("%H:%M:%S", time.localtime(float(event.get("at", 0))))
    return f"{at}  {_TEXTS.get(event['kind'], _fields)(event)}"
