"""Build a small synthetic paired edit dataset offline, byte-identically on every rebuild.

The edit is "invert the colors": easy to check pixel-exactly in tests and learnable by a tiny LoRA in a demo.
Layout (what the dataset loader reads):
    control/NAME.png          random coloured rectangles and ellipses on a random background
    target/NAME.png           the same image with every channel inverted (255 - value)
    target/NAME.txt           the caption
    sample_control/NAME.png   held-out control images for sample prompts during training
With num_controls=2 or 3 (several control images per target, `control_path` as a list), also:
    control_2/NAME.png, sample_control_2/NAME.png   each control image mirrored left-right
    control_3/NAME.png, sample_control_3/NAME.png   each control image flipped top-bottom
(derived from the first control, so the default single-control build stays byte-identical).
Sizes cycle through square, landscape and portrait (multiples of 16), so bucketing sees several aspect ratios,
each with more than one image once num_pairs >= 6.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from toolkit.errors import UserError
from tools.tiny_common import install_atomically

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = "demo_data_build.json"
SIZES_WH: tuple[tuple[int, int], ...] = ((96, 96), (128, 96), (96, 128))
CAPTIONS: tuple[str, ...] = ("invert the colors", "invert the colors of the image", "make it a color negative")
NUM_SAMPLE_CONTROLS = 2
# The k-th control image (k >= 2) of a pair: a fixed transform of its first control image.
EXTRA_CONTROL_TRANSFORMS = (ImageOps.mirror, ImageOps.flip)


def random_shapes_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image of 3-6 random filled rectangles/ellipses on a random solid background."""
    background = tuple(int(c) for c in rng.integers(0, 256, size=3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        # At least 8 px per side so every shape is visible at latent resolution (1/8).
        box = (x0, y0, max(x1, x0 + 8), max(y1, y0 + 8))
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.rectangle(box, fill=fill)
        else:
            draw.ellipse(box, fill=fill)
    return image


def _write_dataset(workdir: Path, num_pairs: int, seed: int) -> None:
    """Write pairs, captions and held-out sample controls into workdir (a fresh folder)."""
    rng = np.random.default_rng(seed)
    for sub in ("control", "target", "sample_control"):
        (workdir / sub).mkdir()
    for index in range(num_pairs):
        name = f"pair_{index:03d}"
        width, height = SIZES_WH[index % len(SIZES_WH)]
        control = random_shapes_image(rng, width, height)
        control.save(workdir / "control" / f"{name}.png")
        ImageOps.invert(control).save(workdir / "target" / f"{name}.png")
        caption = CAPTIONS[int(rng.integers(0, len(CAPTIONS)))]
        (workdir / "target" / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    for index in range(NUM_SAMPLE_CONTROLS):
        width, height = SIZES_WH[index % len(SIZES_WH)]
        random_shapes_image(rng, width, height).save(workdir / "sample_control" / f"sample_{index:03d}.png")


def _write_extra_controls(workdir: Path, num_controls: int) -> None:
    """control_K/ and sample_control_K/ for K = 2 .. num_controls, from the first control images."""
    for k in range(2, num_controls + 1):
        transform = EXTRA_CONTROL_TRANSFORMS[k - 2]
        for first, extra in (("control", f"control_{k}"), ("sample_control", f"sample_control_{k}")):
            (workdir / extra).mkdir()
            for path in sorted((workdir / first).glob("*.png")):
                transform(Image.open(path).convert("RGB")).save(workdir / extra / path.name)


def build_demo_dataset(out_dir: str | Path, num_pairs: int = 8, seed: int = 0, overwrite: bool = False,
                       num_controls: int = 1) -> Path:
    """Build (or reuse) the synthetic invert-colors dataset; returns its absolute path. `num_controls` 2 or 3 adds
    control_2/ (and control_3/) folders: several control images per target."""
    if num_pairs < 1:
        raise UserError(f"num_pairs must be >= 1, got {num_pairs}")
    if not 1 <= num_controls <= 1 + len(EXTRA_CONTROL_TRANSFORMS):
        raise UserError(f"num_controls must be 1 to {1 + len(EXTRA_CONTROL_TRANSFORMS)}, got {num_controls}")
    marker = {"format_version": FORMAT_VERSION, "num_pairs": num_pairs, "seed": seed}
    if num_controls > 1:  # absent for one control: existing single-control builds are reused as they are
        marker["num_controls"] = num_controls

    def write(tmp: Path) -> None:
        _write_dataset(tmp, num_pairs, seed)
        _write_extra_controls(tmp, num_controls)

    return install_atomically(out_dir, MARKER_NAME, marker, overwrite, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a synthetic paired dataset (control -> inverted target).")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created atomically)")
    parser.add_argument("--num-pairs", default=8, type=int, help="number of control/target pairs")
    parser.add_argument("--seed", default=0, type=int, help="same seed gives byte-identical files")
    parser.add_argument("--num-controls", default=1, type=int,
                        help="control images per target (2 or 3 add control_2/, control_3/ folders)")
    parser.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = build_demo_dataset(args.out, num_pairs=args.num_pairs, seed=args.seed, overwrite=args.overwrite,
                              num_controls=args.num_controls)
    logger.info("demo dataset ready at %s", path)


if __name__ == "__main__":
    main()
