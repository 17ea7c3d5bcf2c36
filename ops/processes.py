"""Child processes that are always cleaned up: each runs in its own process group.

Flower's SuperLink and SuperNode start children of their own (ServerApp, ClientApp, SuperExec),
so stopping only the parent would leave orphans behind; stopping the whole group does not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


class Managed:
    """A command in its own session, its output appended to `log_path`."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.name = name
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            list(cmd),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the command's group and the groups of its detached descendants, then SIGKILL what is
        left after `grace_s`.

        The command leads its own session, so its group id is its pid: that still names the group after
        the leader exited on its own (a SuperNode refused by the SuperLink leaves its SuperExec behind).
        The SuperLink starts its SuperExec in a session of its own, which only a walk down the process
        tree finds; that SuperExec would otherwise linger until it noticed its parent had gone.
        """
        groups = {self.proc.pid} | _descendant_groups(self.proc.pid)
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_group_alive(g) for g in groups):
            self.proc.poll()
            time.sleep(0.1)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ("" if it cannot be read): what an error message quotes."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count as members: reap what is ours, then ask whether non-zombies remain
    return any(_is_live_member(pid, pgid) for pid in _pids())


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()] if os.path.isdir("/proc") else []


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def _is_live_member(pid: int, pgid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == pgid


def _descendant_groups(root: int) -> set[int]:
    """Process groups of the live descendants of `root`, including those that started their own session."""
    children: dict[int, list[int]] = {}
    groups: dict[int, int] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append(pid)
            groups[pid] = stat[2]
    found, todo = set(), list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.add(groups[pid])
        todo += children.get(pid, [])
    return found


def wait_for_port(host: str, port: int, timeout_s: float, proc: Managed | None = None) -> None:
    """Block until something accepts TCP connections on host:port, or raise with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.running:
            raise RuntimeError(f"{proc.name} exited with code {proc.proc.returncode}:\n{proc.tail()}")
        sock, bare = _socket_for(host)
        with sock as s:
            s.settimeout(0.5)
            if s.connect_ex((bare, port)) == 0:
                return
        time.sleep(0.2)
    tail = f"\n{proc.tail()}" if proc is not None else ""
    raise TimeoutError(f"nothing listening on {host_port(host, port)} after {timeout_s:.0f} s{tail}")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: the only addresses where --insecure is allowed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick), for a local API."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _socket_for(host: str) -> tuple[socket.socket, str]:
    """A TCP socket of the host's address family, and the host as the socket calls want it.

    An IPv6 address (`::`, `[::1]`) needs an AF_INET6 socket, and no brackets; an IPv4 socket
    cannot even parse it, so a server told to listen on `::` was refused as "in use".
    """
    bare = host.removeprefix("[").removesuffix("]")
    return socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET), bare


def host_port(host: str, port: int) -> str:
    """host:port as Flower and people write it: an IPv6 address in brackets ([::1]:8000)."""
    bare = host.removeprefix("[").removesuffix("]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def port_free(host: str, port: int) -> bool:
    try:  # an IPv6 socket on a host without IPv6 fails here: the port is no more usable than taken
        sock, bare = _socket_for(host)
    except OSError:
        return False
    with sock as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bare, port))
        except OSError:
            return False
    return True


def seconds_since_process_start() -> float:
    """Age of this process (Linux /proc), e.g. to measure interpreter + import start-up cost."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
