"""Rendering HTML reports in headless Chromium for tests (the eval report, the demo report).

Needs a Chromium binary (Debian's ``chromium-headless-shell`` or ``chromium``, Google Chrome, or a
Playwright-installed Chromium); :func:`require_chromium` skips the calling test, saying why, when
there is none.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
            "chrome", "headless_shell")
WINDOW = (1200, 5000)


def find_chromium() -> str | None:
    """``$DIFFALIGN_CHROMIUM``, else the first of :data:`BINARIES` on PATH, else Playwright's Chromium."""
    if os.environ.get("DIFFALIGN_CHROMIUM"):
        return os.environ["DIFFALIGN_CHROMIUM"]
    for name in BINARIES:
        if path := shutil.which(name):
            return path
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    try:
        with sync_playwright() as p:
            path = p.chromium.executable_path
    except Exception:  # noqa: BLE001 -- playwright installed without its browser download: any error means "none"
        return None
    return path if path and os.path.isfile(path) else None


def screenshot(browser: str, page, out) -> Image.Image:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={out}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0 and out.is_file(), f"{browser} failed: {proc.stderr[-2000:]}"
    return Image.open(out).convert("RGB")


def find(shot: np.ndarray, template: np.ndarray) -> float:
    """The smallest mean absolute difference between ``template`` and a same-sized window of ``shot``,
    over windows aligned on the template's most saturated pixel."""
    sat = template.max(-1) - template.min(-1)
    oy, ox = np.unravel_index(sat.argmax(), sat.shape)
    ys, xs = np.nonzero((np.abs(shot - template[oy, ox]) <= 2).all(-1))
    best = float("inf")
    th, tw = template.shape[:2]
    for y, x in zip(ys[:50_000], xs[:50_000]):
        y0, x0 = y - oy, x - ox
        if y0 >= 0 and x0 >= 0 and y0 + th <= shot.shape[0] and x0 + tw <= shot.shape[1]:
            best = min(best, float(np.abs(shot[y0:y0 + th, x0:x0 + tw] - template).mean()))
    return best


def require_chromium() -> str:
    """The Chromium binary, or skip the test with a reason."""
    browser = find_chromium()
    if browser is None:
        pytest.skip("no headless Chromium here (looked for " + ", ".join(BINARIES) + " on PATH and for a "
                    "Playwright-installed Chromium); install Debian's chromium-headless-shell to run this test")
    return browser
