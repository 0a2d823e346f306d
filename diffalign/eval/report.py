"""Self-contained HTML reports: tables, image grids and plots embedded as base64 PNGs."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from PIL import Image


def png_data_uri(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,...`` URI (lossless)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def jpeg_data_uri(image: Image.Image, quality: int = 90) -> str:
    """``image`` as a ``data:image/jpeg;base64,...`` URI (for large photos in reports)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_data_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def html_table(rows: list[dict], *, floatfmt: str = "{:.3f}") -> str:
    """``rows`` (dicts with the same keys) as an HTML table; floats formatted with ``floatfmt``."""
    if not rows:
        return "<p>(empty)</p>"
    cols = list(rows[0])
    fmt = lambda v: floatfmt.format(v) if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section_id(heading: str) -> str:
    """The anchor of a section heading: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def write_report(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write ``sections`` (heading, HTML body) as one standalone page."""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "th{background:#f3f3f3}img{image-rendering:pixelated;max-width:100%}figure{display:inline-block;margin:0 1em 1em 0}"
             "figcaption{text-align:center;font-size:0.9em}"
             ".warning{background:#fff3cd;border:1px solid #e0b000;padding:6px 10px;font-weight:bold}"
             "table.tiles td,table.tiles th{border:none;text-align:center;padding:2px 4px;font-size:0.8em}"
             ".score{display:block;font-family:monospace}")
    body = "".join(f"<h2 id='{section_id(h)}'>{html.escape(h)}</h2>\n{b}\n" for h, b in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n{body}</body></html>")
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
