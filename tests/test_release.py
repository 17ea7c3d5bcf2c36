"""The version the server and the sites compare changes with the code and only with the code."""

from __future__ import annotations

import shutil
from pathlib import Path

from fahr_core.release import code_fingerprint, fahr_version, package_roots, release


def _copy(roots: dict[str, Path], dest: Path) -> dict[str, Path]:
    copies = {}
    for name, root in roots.items():
        copies[name] = dest / name
        shutil.copytree(root, copies[name], ignore=shutil.ignore_patterns("demo_data"))
    return copies


def test_the_installed_code_is_fingerprinted_wherever_it_lies(tmp_path: Path) -> None:
    roots = package_roots()
    assert set(roots) == {"fahr_core", "fahr_ops", "fahr_server", "fahr_client", "fahr_research"}
    here = code_fingerprint(roots)
    assert fahr_version() == f"{release()}+code.{here[:12]}"
    copies = _copy(roots, tmp_path / "copy")
    assert code_fingerprint(copies) == here  # same code elsewhere: same identity
    (copies["fahr_core"] / "__pycache__").mkdir(exist_ok=True)
    (copies["fahr_core"] / "__pycache__" / "x.py").write_text("# a cache is not code\n")
    assert code_fingerprint(copies) == here


def test_one_changed_byte_or_one_added_module_changes_the_identity(tmp_path: Path) -> None:
    roots = package_roots()
    here = code_fingerprint(roots)
    edited = _copy(roots, tmp_path / "edited")
    privacy = edited["fahr_core"] / "privacy" / "ledger.py"
    privacy.write_bytes(privacy.read_bytes() + b" ")
    assert code_fingerprint(edited) != here
    added = _copy(roots, tmp_path / "added")
    (added["fahr_client"] / "extra.py").write_text("")
    assert code_fingerprint(added) != here
    moved = _copy(roots, tmp_path / "moved")  # the same bytes under another module name
    (moved["fahr_server"] / "cli.py").rename(moved["fahr_server"] / "cli2.py")
    assert code_fingerprint(moved) != here
