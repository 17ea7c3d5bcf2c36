"""Process groups: stopping a command takes down every process it started, whatever state it is in."""

from __future__ import annotations

import sys
import time

from fahr_ops.processes import Managed
from tests.conftest import flower_processes_under

# A leader that starts a long-lived child in its own process group, then exits by itself: what a
# SuperNode refused by the SuperLink does to the SuperExec it started.
# The child's command line carries MARK (the leader gets it from its environment, so only the child
# matches it).
LEADER = """
import os, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", os.environ["MARK"]])
"""


def _until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def _stop_leaves_nothing(proc: Managed, mark: str) -> None:
    assert _until(lambda: flower_processes_under(mark), 30), "the child never started"
    proc.stop(grace_s=5)
    assert _until(lambda: not flower_processes_under(mark), 10), flower_processes_under(mark)


def test_stop_kills_children_left_behind_by_a_leader_that_already_exited(tmp_path):
    mark = str(tmp_path / "orphan-mark")
    proc = Managed("leader", [sys.executable, "-c", LEADER], tmp_path / "leader.log", {"MARK": mark})
    proc.proc.wait(timeout=30)
    _stop_leaves_nothing(proc, mark)


# A leader that stays up with a child in a session of its own: what the SuperLink does with its SuperExec.
DETACHING_LEADER = """
import os, subprocess, sys, time
child = [sys.executable, "-c", "import time; time.sleep(120)", os.environ["MARK"]]
subprocess.Popen(child, start_new_session=True)
time.sleep(120)
"""


def test_stop_kills_a_detached_child_of_a_running_leader(tmp_path):
    mark = str(tmp_path / "detached-mark")
    leader = [sys.executable, "-c", DETACHING_LEADER]
    proc = Managed("leader", leader, tmp_path / "leader.log", {"MARK": mark})
    _stop_leaves_nothing(proc, mark)
