"""Fixtures only; the helpers test modules share live in tests/support.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fahr_core.cohort import demo_faces_dir
from tests.support import SHARED, make_sites, utkface_faces


@pytest.fixture(autouse=True)
def _operator_config_home(tmp_path_factory, monkeypatch):
    """Keys a server keeps in its operator's config folder (fahr_server.state.state_key_path) go to a
    fresh test folder, never the user's; processes the test starts inherit it."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config-home")))


@pytest.fixture(scope="session")
def shared_utkface() -> Path:
    """The full labelled UTKFace copy, for tests that need more faces than the bundled sample."""
    folder = SHARED / "utkface"
    if not (folder / "labels.csv").exists():
        pytest.skip(f"{folder} is not present (FAHR_SHARED_DATA names another data folder)")
    return folder


@pytest.fixture(scope="session")
def utkface() -> Path:
    """Labelled faces for a federation: ../shared's UTKFace copy, else the bundled sample."""
    return utkface_faces()


@pytest.fixture
def demo_site(tmp_path: Path) -> Path:
    """One small simulated site built from the bundled demo faces; returns its site.toml."""
    return make_sites(tmp_path, demo_faces_dir(), (60,))[0]
