"""The release is a wheel that works without the source tree: built here, installed into a clean
virtualenv, its three CLIs and both Flower apps run from the installed files.

The new environment reuses this environment's third-party packages (torch, Flower, ...) through a
.pth line instead of downloading them: a .pth line only appends a folder to sys.path, it does not
run that folder's own .pth files, so this checkout's editable-install hook stays out and every
fahr module must come from the wheel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from fahr_core.release import fahr_version

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path: Path) -> None:
    # build from the files git would release, not the checkout: setuptools' build/ folder there may
    # hold modules deleted since, and they would land in the wheel
    source = tmp_path / "source"
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(source)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr
    # setuptools warns where a later release will refuse the configuration (a license table) or
    # guess at it (package data in a folder not declared a package)
    assert not re.search(r"setuptools/\S+:\d+: \w*Warning", built.stderr), built.stderr
    (wheel,) = dist.glob("fahr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = zipfile.ZipFile(wheel).read(metadata_name).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()  # SPDX, not the deprecated table
    for package in (
        "fahr_core/age/",
        "fahr_ops/",
        "fahr_server/",
        "fahr_client/",
        "fahr_research/",
        "fahr_core/demo_data/images/",
    ):
        assert any(n.startswith(package) for n in names), f"{wheel.name} lacks {package}"

    env = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], tmp_path)
    py = env / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_run([str(py), "-c", purelib], tmp_path).strip())
    (site / "third_party.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path)  # fmt: skip

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    modules = "fahr_core, fahr_server.app, fahr_client.app, fahr_client.runtime, fahr_research.local"
    imported = _run(
        [
            str(py),
            "-c",
            f"import {modules}\nprint(fahr_core.__file__, fahr_server.app.app, fahr_client.app.app)",
        ],
        run_dir,
    )
    assert imported.startswith(str(site)) and "ServerApp" in imported and "ClientApp" in imported
    for cli in ("fahr", "fahr-server", "fahr-client"):
        assert "Usage" in _run([str(env / "bin" / cli), "--help"], run_dir)
        # the installed copy hashes to the same code identity as this checkout: same code, same version
        assert _run([str(env / "bin" / cli), "--version"], run_dir).strip() == f"fahr {fahr_version()}"
