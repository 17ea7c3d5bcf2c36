"""The site's outbound audit log: one line per message that leaves the site, appended, never rewritten.

Each line records what was sent (round, message kind, metric names and values, and for every
tensor its name, shape, dtype, bytes and sha256) and the sha256 of the previous line, so a
deleted or edited line breaks the chain and `verify_audit_log` says where.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch

GENESIS = "0" * 64


def _tensor_entry(name: str, t: torch.Tensor) -> dict:
    data = t.detach().contiguous().cpu().numpy().tobytes()
    return {
        "name": name,
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _last_hash(path: Path) -> str:
    if not path.exists() or path.stat().st_size == 0:
        return GENESIS
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        last = f.read().splitlines()[-1]
    return hashlib.sha256(last).hexdigest()


def append_audit(
    path: Path,
    kind: str,
    server_round: int,
    run_id: int,
    arrays: Mapping[str, torch.Tensor],
    metrics: Mapping[str, float | int],
) -> None:
    """Append one record, flushed and fsync'd, before the message is handed to Flower."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "time": time.time(),
        "kind": kind,
        "run_id": run_id,
        "round": server_round,
        "metrics": dict(metrics),
        "tensors": [_tensor_entry(k, v) for k, v in arrays.items()],
        "total_bytes": sum(v.numel() * v.element_size() for v in arrays.values()),
        "prev": _last_hash(path),
    }
    line = json.dumps(record, sort_keys=True).encode() + b"\n"
    with path.open("ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def verify_audit_log(path: Path) -> int:
    """Number of records if the chain is intact; ValueError naming the first broken line otherwise."""
    prev = GENESIS
    lines = Path(path).read_bytes().splitlines() if Path(path).exists() else []
    for i, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path} line {i}: not a JSON record") from None
        if record.get("prev") != prev:
            raise ValueError(f"{path} line {i}: chain broken (a line before it was changed or removed)")
        prev = hashlib.sha256(line).hexdigest()
    return len(lines)
