"""Side-by-side sample grids with titles, for the README's pictures.

    python bench/sample_panels.py docs/images/samplers.png \
        "DDPM, 1000 steps=runs/fid/ddpm-1000/samples.npz" "EDM Heun, 18 steps=runs/fid/edm/samples.npz"

Each panel is the first --num-images samples of a samples.npz (as sample.py writes it), 8 per
row, upscaled by --scale with nearest-neighbour so pixels stay visible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddp_utils.images import make_grid, save_png  # noqa: E402

TITLE_HEIGHT = 18
GAP = 12


def panel(samples: Path, title: str, num_images: int, scale: int) -> Image.Image:
    with np.load(samples) as npz:
        images = npz["arr_0"][:num_images]
    grid = Image.fromarray(make_grid(images, nrow=8))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (grid.width, grid.height + TITLE_HEIGHT), "white")
    canvas.paste(grid, (0, TITLE_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 3), title, fill="black")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("panels", nargs="+", help="TITLE=path/to/samples.npz")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()
    panels = [
        panel(Path(path), title, args.num_images, args.scale)
        for title, path in (spec.rsplit("=", 1) for spec in args.panels)
    ]
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    out = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + GAP
    save_png(np.asarray(out), args.out)
    print(f"wrote {args.out} ({out.width}x{out.height})")


if __name__ == "__main__":
    main()
