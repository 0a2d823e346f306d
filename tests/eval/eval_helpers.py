"""Helpers of the evaluation tests (imported by name, as tests/data does with data_helpers)."""

from __future__ import annotations

import base64
import io
import re

from PIL import Image


def report_images(html: str) -> dict[str, list[tuple[str, int, Image.Image]]]:
    """``{class: [(alt, width, decoded image), ...]}`` of every embedded image of a report."""
    out: dict[str, list] = {}
    for cls, alt, width, _, data in re.findall(
            r"<img class='(\w+)' alt='([^']*)'(?: width=(\d+))? src='data:image/(png|jpeg);base64,([^']*)'", html):
        out.setdefault(cls, []).append((alt, int(width or 0), Image.open(io.BytesIO(base64.b64decode(data)))))
    return out
