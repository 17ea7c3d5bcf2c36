"""The site's outbound audit log: one line per message that leaves the site, appended, never rewritten.

Each line records what was sent (round, message kind, metric names and values, and for every
tensor its name, shape, dtype, bytes and sha256) and the sha256 of the previous line, so a
deleted or edited line breaks the chain. The chain alone cannot see its own end being cut off or
rewritten (the last line has no successor to vouch for it), so a head file beside the log holds
the number of records and the sha256 of the last one, replaced atomically after every append.
Every append verifies the whole log against its head first and refuses to write to a log that was
edited or truncated: `verify_audit_log` says what is wrong. See docs/security.md for what this
detects and what it cannot.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from fahr_core.io import atomic_write_json

GENESIS = "0" * 64
EVALUATION_ADMITTED = "evaluate-admitted"  # written before scoring: every evaluation attempt counts


class AuditLogTampered(ValueError):
    """The audit log or its head file was edited, truncated or removed since the site wrote them."""


def head_path(path: Path) -> Path:
    """Where the chain head of the audit log at `path` is kept."""
    path = Path(path)
    return path.with_name(path.name + ".head")


def _tensor_entry(name: str, t: torch.Tensor) -> dict:
    data = t.detach().contiguous().cpu().numpy().tobytes()
    return {
        "name": name,
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _read_head(path: Path) -> tuple[int, str] | None:
    head = head_path(path)
    if not head.exists():
        return None
    try:
        raw = json.loads(head.read_text())
        return int(raw["records"]), str(raw["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        raise AuditLogTampered(f"{head}: unreadable chain head") from None


def _verified(path: Path) -> tuple[list[dict], str, bool]:
    """The log's records, the hash of its last line, and whether the head lags one record behind.

    A head one record behind a chained last line is what a crash between appending and replacing
    the head leaves; anything else that disagrees with the head raises AuditLogTampered.
    """
    path = Path(path)
    lines = path.read_bytes().splitlines() if path.exists() else []
    prev, records = GENESIS, []
    for i, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AuditLogTampered(f"{path} line {i}: not a JSON record") from None
        if record.get("prev") != prev:
            raise AuditLogTampered(f"{path} line {i}: chain broken (a line before it was changed or removed)")
        records.append(record)
        prev = hashlib.sha256(line).hexdigest()
    head = _read_head(path)
    if head is None:
        if lines:
            raise AuditLogTampered(f"{head_path(path)} is missing: the log's end cannot be checked")
        return records, prev, False
    count, last = head
    if count == len(lines) and last == prev:
        return records, prev, False
    if count == len(lines) - 1 and records[-1]["prev"] == last:
        return records, prev, True
    if count > len(lines):
        raise AuditLogTampered(
            f"{path}: {count - len(lines)} record(s) removed from its end (the head records {count})"
        )
    raise AuditLogTampered(f"{path}: its last record differs from the head (edited, or records added)")


def verify_audit_log(path: Path) -> int:
    """Number of records if the chain and its head are intact; AuditLogTampered (a ValueError) otherwise."""
    records, _, _ = _verified(path)
    return len(records)


def evaluations_in_run(path: Path, run_id: int) -> int:
    """How many evaluations of federation run `run_id` the (verified) log records as admitted."""
    records, _, _ = _verified(path)
    return sum(1 for r in records if r["kind"] == EVALUATION_ADMITTED and r["run_id"] == run_id)


def append_audit(
    path: Path,
    kind: str,
    server_round: int,
    run_id: int,
    arrays: Mapping[str, torch.Tensor],
    metrics: Mapping[str, float | int],
) -> None:
    """Append one record, flushed and fsync'd, before the message is handed to Flower.

    Refuses (AuditLogTampered) to extend a log that fails verification, so nothing more leaves the
    site until its operator has looked at the log.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records, prev, _ = _verified(path)
    record = {
        "time": time.time(),
        "kind": kind,
        "run_id": run_id,
        "round": server_round,
        "metrics": dict(metrics),
        "tensors": [_tensor_entry(k, v) for k, v in arrays.items()],
        "total_bytes": sum(v.numel() * v.element_size() for v in arrays.values()),
        "prev": prev,
    }
    line = json.dumps(record, sort_keys=True).encode() + b"\n"
    with path.open("ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_json(
        head_path(path), {"records": len(records) + 1, "sha256": hashlib.sha256(line[:-1]).hexdigest()}
    )
