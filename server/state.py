"""The federation's resumable state: what `fahr-server run --resume` needs after a crash.

After every completed round the strategy writes `workdir/state.json` atomically, and only after
that round's checkpoint is on disk: the state file is the commit point of a round. A crash before
it leaves the previous round's state whole, and the interrupted round is simply run again.

state.json names the checkpoint to resume from and its sha256, so whoever can rewrite it could
point a resumed run at weights of their choosing. It therefore carries an HMAC-SHA256 under a key
that lives outside every workdir, in the server operator's private config folder
(`state_key_path`, created with mode 0600 on first use); a state file that fails the check is not
resumed (docs/security.md says what this does and does not protect against).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fahr_core.config import ServerConfig
from fahr_core.io import atomic_write_json, atomic_write_text
from fahr_core.release import fahr_version
from fahr_core.workdir import ServerWorkdir


class ResumeError(RuntimeError):
    """There is nothing to resume, or the earlier run cannot be continued with this config."""


@dataclass(frozen=True)
class FederationState:
    """The last completed round and everything needed to continue after it."""

    last_round: int
    rounds: int  # planned
    checkpoint: str  # relative to the workdir
    checkpoint_sha256: str
    fahr_version: str
    model: dict  # the [model] table the federation started with
    site_epsilon: dict[str, float] = field(default_factory=dict)  # latest cumulative spend each site reported
    site_rounds: dict[str, int] = field(default_factory=dict)  # rounds committed per site, this federation
    rejections: dict[str, int] = field(default_factory=dict)  # rejected updates per site, all rounds


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_record(cfg: ServerConfig) -> dict:
    """The model settings a resumed run must share with the run it continues.

    The age model is left out: it only serves the final evaluation, not the weights being trained.
    """
    return {k: str(v) for k, v in asdict(cfg.model).items() if k != "age_checkpoint"}


def state_key_path() -> Path:
    """Where the key that authenticates state.json lives: the operator's config folder, never a workdir."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "fahr" / "state.key"


def _state_key(create: bool) -> bytes:
    """The state key; made (32 random bytes, mode 0600, published by an atomic link) when `create`."""
    path = state_key_path()
    if not path.exists():
        if not create:
            raise ResumeError(
                f"cannot resume: {path}, the key that authenticates state.json, is missing (the run was "
                "started by another user or machine, or the key was deleted)"
            )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process published first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()


def _mac(key: bytes, fields: dict) -> str:
    return hmac.new(key, json.dumps(fields, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def write_state(workdir: Path, state: FederationState) -> None:
    fields = json.loads(json.dumps(asdict(state)))  # as it will read back
    atomic_write_json(
        ServerWorkdir(Path(workdir)).state, {**fields, "hmac": _mac(_state_key(create=True), fields)}
    )


def read_state(workdir: Path) -> FederationState | None:
    """The committed state, or None if there is none; ResumeError if it is unreadable or fails its HMAC."""
    path = ServerWorkdir(Path(workdir)).state
    if not path.exists():
        return None
    try:
        fields = json.loads(path.read_text())
        mac = str(fields.pop("hmac", ""))
        state = FederationState(**fields)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ResumeError(f"{path}: unreadable federation state ({e})") from None
    if not hmac.compare_digest(mac, _mac(_state_key(create=False), fields)):
        raise ResumeError(
            f"cannot resume: {path} fails its authentication (it was edited, or written under another "
            f"key than {state_key_path()})"
        )
    return state


def resume_point(cfg: ServerConfig) -> FederationState:
    """The state to continue from; raises ResumeError saying why the run cannot be resumed."""
    state = read_state(cfg.workdir)
    where = cfg.paths.state
    if state is None:
        raise ResumeError(
            f"nothing to resume: {where} does not exist (no round of a run there completed); "
            "start the federation again without --resume"
        )
    now = model_record(cfg)
    if state.model != now:
        changed = sorted(k for k in {*state.model, *now} if state.model.get(k) != now.get(k))
        raise ResumeError(
            f"cannot resume: the [model] settings changed since the run started ({', '.join(changed)}); "
            f"the saved weights in {cfg.workdir} belong to the old model"
        )
    if state.fahr_version != fahr_version():
        raise ResumeError(
            f"cannot resume: the run was started by fahr {state.fahr_version} and this is fahr "
            f"{fahr_version()}; finish it with the version that started it"
        )
    if state.rounds != cfg.rounds:
        raise ResumeError(
            f"cannot resume: the run planned {state.rounds} rounds and the config now says {cfg.rounds}; "
            "sites spread their privacy budget over the planned rounds, so the plan cannot change"
        )
    if state.last_round >= state.rounds:
        raise ResumeError(f"nothing to resume: all {state.rounds} rounds completed ({where})")
    checkpoint = cfg.workdir / state.checkpoint
    if not checkpoint.is_file() or file_sha256(checkpoint) != state.checkpoint_sha256:
        raise ResumeError(
            f"cannot resume: {checkpoint} is missing or differs from the checkpoint recorded in {where}"
        )
    return state


def earlier_run_records(workdir: Path) -> list[str]:
    """Names of an earlier federation's records in `workdir` (a fresh run must not mix with them)."""
    return [path.name for path in ServerWorkdir(Path(workdir)).run_records if path.exists()]


def set_aside_uncommitted(workdir: Path) -> Path | None:
    """Move the records of a run that committed no round into a folder of their own; returns it.

    Without state.json no round was completed, so there is nothing to resume, yet the failed
    attempt's logs (rounds.jsonl naming the sites that failed, rejections, events) are evidence
    the operator may need: a fresh run keeps them aside instead of refusing the workdir.
    """
    paths = ServerWorkdir(Path(workdir))
    if paths.state.exists():
        return None
    found = [path for path in (*paths.run_records, paths.events_log) if path.exists()]
    if not found:
        return None
    aside = paths.set_aside(time.strftime("%Y%m%d-%H%M%S"))
    aside.mkdir()
    for path in found:
        path.rename(aside / path.name)
    return aside


def _round_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return None  # a line half-written when the server died


def trim_rounds_log(workdir: Path, last_round: int) -> None:
    """Drop rounds.jsonl and rejections.jsonl lines of rounds after `last_round` (and half-written
    ones): a crash may have logged a round it never committed, and the resumed run logs it again."""
    paths = ServerWorkdir(Path(workdir))
    for path in (paths.rounds_log, paths.rejections_log):
        if path.exists():
            lines = path.read_text().splitlines()
            kept = [line for line in lines if (r := _round_of(line)) is not None and r <= last_round]
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
