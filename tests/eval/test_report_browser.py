"""The eval report renders in headless Chromium: a screenshot shows the summary table, the small-sample
warning box and an image of the grid.

Needs a Chromium binary (see tests/browser.py); without one the test is skipped and says so.
"""

from __future__ import annotations

import numpy as np
from browser import WINDOW, find, require_chromium, screenshot
from eval_helpers import report_images
from PIL import Image

from diffalign.cli import main


def test_report_renders_in_headless_chromium(tiny_run, tmp_path, capsys):
    browser = require_chromium()
    out, argv = tiny_run
    if not (out / "report.html").is_file():
        assert main(argv) == 0
        capsys.readouterr()
    shot = screenshot(browser, out / "report.html", tmp_path / "report.png")
    assert shot.size == WINDOW
    pixels = np.asarray(shot).astype(int)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not a blank page
    # the summary table: its header cells' background (#f3f3f3) over a table-sized area
    assert (pixels == (243, 243, 243)).all(-1).sum() > 2000
    # the small-sample warning (3 prompts: too few for the bootstrap) is a visible box (#fff3cd)
    assert (pixels == (255, 243, 205)).all(-1).sum() > 2000
    # an image of the grid, pixel for pixel: the embedded PNG enlarged by its whole display factor
    alt, width, grid = report_images((out / "report.html").read_text())["tile"][0]
    scale = width // grid.width
    template = np.asarray(grid.convert("RGB").resize((grid.width * scale, grid.height * scale),
                                                     Image.Resampling.NEAREST)).astype(int)
    assert find(pixels, template) < 1.0, f"{alt} is not on the rendered page"
