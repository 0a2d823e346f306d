"""Image grids for validation images and reports."""

from __future__ import annotations

from PIL import Image


def image_grid(images: list[Image.Image], cols: int, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Tile equally sized images row-major into one image, ``pad`` pixels apart."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
