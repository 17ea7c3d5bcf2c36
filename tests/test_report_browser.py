"""A full site report opened in a real browser (headless Chromium): every figure decodes and is labelled.

String checks on the HTML cannot tell whether a browser will actually draw the inline PNGs, so this test
loads the page in Chromium. The report itself may contain no script (it must stay inert when mailed), so
the image probe runs on a copy of the page with one inline script added. Skipped when Chromium is absent
(install it with ``apt-get install -y chromium``).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.support import PNG_MAGIC, full_site_report, images

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (apt-get install -y chromium); browser rendering not tested",
)

# Writes "<decoded>/<total>" images into the DOM once the page has loaded, for --dump-dom to report.
PROBE = (
    '<script>window.addEventListener("load",()=>{const i=[...document.images];'
    'document.body.dataset.decoded=i.filter(x=>x.complete&&x.naturalWidth>0).length+"/"+i.length;});'
    "</script>"
)


def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium isolated from the network and any user profile; returns stdout."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def test_site_report_renders_in_chromium(tmp_path: Path) -> None:
    full_site_report(tmp_path / "report", n_boot=20)
    page = tmp_path / "report" / "report.html"
    html = page.read_text()
    alts = list(images(html))
    assert len(alts) == 2

    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    decoded = re.search(r'data-decoded="(\d+)/(\d+)"', dom)
    assert decoded, "the probe script did not run"
    assert decoded.group(1) == decoded.group(2) == str(len(alts)), "an image failed to decode"
    for alt in alts:
        assert f'alt="{alt}"' in dom
    assert dom.count("<figcaption>") == len(alts)

    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1000,4000", f"--screenshot={shot}", page.as_uri())
    png = shot.read_bytes()
    assert png.startswith(PNG_MAGIC)
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert (width, height) == (1000, 4000)
    assert len(png) > 50_000, "a page with two figures and tables cannot compress this small"
