"""No module spells a workdir file name itself: each side asks fahr_core.workdir for its paths.

A status view that reads a file under an old name shows nothing, and a `--resume` that looks for a
renamed state file starts over; so this parses the server, the site, the researcher CLI, the process
launcher, the tests and the benchmarks, and fails on any string equal to a name that ServerWorkdir or
SiteWorkdir gives out.
"""

from __future__ import annotations

from pathlib import Path

from fahr_core.workdir import REPORT_PAGE, REPORT_SUMMARY, SITE_WORKDIR, ServerWorkdir, SiteWorkdir
from tests.support import spelled_keys

ROOT = Path(__file__).resolve().parent.parent

SCANNED = ("server", "client", "research", "ops", "tests", "benchmarks")
# Folder names that are plain words, also used for other folders (an alignment run's output, a report
# written to a chosen folder): the workdir's own go through the classes, but a match proves nothing.
PLAIN_WORDS = {"report", "aligned", "cache", "app"}
# The report module names its own files in any folder it is given; its tests check those names.
OWN_NAMES = {"test_workdir_names.py", "test_reports.py", "test_report_browser.py"}


def workdir_names() -> dict[str, str]:
    """file or folder name -> the path it is given out as."""
    names = {REPORT_PAGE: "REPORT_PAGE", REPORT_SUMMARY: "REPORT_SUMMARY", SITE_WORKDIR: "SITE_WORKDIR"}
    for cls in (ServerWorkdir, SiteWorkdir):
        root = cls(Path("/w"))
        for attr in dir(cls):
            if isinstance(getattr(cls, attr), property):
                path = getattr(root, attr)
                if isinstance(path, Path) and path.parent == root.root:
                    names[path.name] = f"{cls.__name__}.{attr}"
    names["checkpoints"] = "ServerWorkdir.checkpoints"
    return names


def test_the_names_cover_both_sides():
    names = workdir_names()
    assert {"run.json", "state.json", "global_model.safetensors", "events.jsonl"} <= set(names)
    assert {"privacy_ledger.json", "outbound_audit.jsonl", "last_evaluation.json"} <= set(names)
    assert {"report.html", "summary.json"} <= set(names)


def test_the_plain_words_left_out_are_workdir_names():
    assert set(workdir_names()) >= PLAIN_WORDS


def test_no_module_spells_a_workdir_file_name():
    names = workdir_names()
    wanted = set(names) - PLAIN_WORDS
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    files = [p for p in files if p.name not in OWN_NAMES]
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name!r} (use fahr_core.workdir {names[name]})"
        for path in files
        for line, name in spelled_keys(path.read_text(), wanted)
    ]
    assert not found, "workdir names spelled outside fahr_core.workdir:\n" + "\n".join(found)
