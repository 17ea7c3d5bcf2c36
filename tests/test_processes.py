"""Process groups: stopping a command takes down every process it started, whatever state it is in."""

from __future__ import annotations

import sys
import time

from fahr_ops.processes import Managed
from tests.conftest import flower_processes_under

# A leader that starts a long-lived child in its own process group, then exits by itself: what a
# SuperNode refused by the SuperLink does to the SuperExec it started.
LEADER = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", sys.argv[1]])
"""


def test_stop_kills_children_left_behind_by_a_leader_that_already_exited(tmp_path):
    mark = str(tmp_path / "orphan-mark")
    proc = Managed("leader", [sys.executable, "-c", LEADER, mark], tmp_path / "leader.log")
    proc.proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not flower_processes_under(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert flower_processes_under(mark), "the child never started"
    proc.stop(grace_s=5)
    deadline = time.monotonic() + 10
    while flower_processes_under(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert flower_processes_under(mark) == []
