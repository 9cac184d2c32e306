"""Image grids for the report: original | quantized side by side, one row per prompt."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

SCALE_TO = 256  # pixels a tile is enlarged to (nearest neighbour) when the images are smaller


def side_by_side(original: torch.Tensor, quantized: torch.Tensor, file: Path, labels: Sequence[str] = ()) -> Path:
    """Write a PNG whose row i is original[i] | quantized[i] (images `[N, 3, H, W]` in [0, 1])."""
    from PIL import Image, ImageDraw

    n, _, h, w = original.shape
    zoom = max(1, SCALE_TO // max(h, w))
    gap, caption = 4, 14 if labels else 0
    tile_h, tile_w = h * zoom, w * zoom
    canvas = Image.new("RGB", (2 * tile_w + 3 * gap, n * (tile_h + caption + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        top = gap + i * (tile_h + caption + gap)
        if labels:
            draw.text((gap, top), str(labels[i])[:2 * tile_w // 6], fill="black")
        for j, images in enumerate((original, quantized)):
            pixels = (images[i].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(pixels).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (gap + j * (tile_w + gap), top + caption))
    canvas.save(file)
    return file
