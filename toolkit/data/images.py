"""Image loading for training: every image becomes 8-bit RGB the same way, and every failure names its file.

Why these rules:
- EXIF orientation is applied because cameras and phones store portrait photos as rotated landscape pixels; a
  target and its control taken with different devices would otherwise disagree about which way is up.
- Transparent pixels are composited on white (not dropped to black) because that is how editors and browsers show
  them, and black fringes around cut-outs teach the model artefacts.
- Decoding is complete (``Image.load``) so a truncated download fails here with its path, not deep inside a
  DataLoader worker mid-training.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from toolkit.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

# What PIL raises for unreadable, truncated or hostile files (UnidentifiedImageError is an OSError).
PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

# PIL's default decompression-bomb limit (it warns above it and refuses above twice it).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def set_max_image_pixels(limit: "int | None") -> None:
    """PIL's process-wide decompression-bomb limit: above `limit` pixels PIL warns, above 2 x `limit` it refuses to
    open the file (Image.DecompressionBombError, reported with the file's path by this module); None: no limit (only
    while a caller checks each header against its own limit)."""
    Image.MAX_IMAGE_PIXELS = None if limit is None else int(limit)


# EXIF orientations 5-8 rotate by 90 or 270 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

PathLike = Union[str, Path]


def is_image_file(path: PathLike) -> bool:
    """True when the file name has a supported image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _describe(err: BaseException) -> str:
    """A short human reason for a PIL failure."""
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image file (PIL cannot identify it)"
    if isinstance(err, Image.DecompressionBombError):
        return f"image too large for PIL's decompression-bomb limit ({err})"
    text = str(err) or type(err).__name__
    if "truncated" in text.lower():
        return f"truncated or corrupt image ({text})"
    return f"cannot decode image: {text}"


def _check_not_empty(path: Path) -> None:
    """Zero-byte files are common after interrupted copies; say so plainly instead of 'cannot identify'."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DatasetError(f"{path}: cannot read file ({err.strerror or err})") from err
    if size == 0:
        raise DatasetError(f"{path}: empty file (0 bytes)")


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """Size after applying EXIF orientation, without decoding pixels."""
    width, height = img.size
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def read_image_size(path: PathLike) -> tuple[int, int]:
    """(width, height) as the image will be trained (after EXIF rotation), reading only the header.

    Raises DatasetError for missing, zero-byte and non-image files.
    """
    path = Path(path)
    _check_not_empty(path)
    try:
        with Image.open(path) as img:
            return _oriented_size(img)
    except PIL_ERRORS as err:
        raise DatasetError(f"{path}: {_describe(err)}") from err


def verify_image(path: PathLike) -> tuple[int, int]:
    """Like read_image_size, but also checks the file is complete, at a fraction of a full decode's cost.

    JPEG: decoded in draft mode (1/8 scale DCT), which still reads every entropy-coded byte, so truncation shows.
    PNG: ``verify()`` checks every chunk CRC without inflating pixels. Other formats are fully decoded.
    """
    path = Path(path)
    size = read_image_size(path)
    try:
        with Image.open(path) as img:
            if img.format == "PNG":
                img.verify()
            else:
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except PIL_ERRORS as err:
        raise DatasetError(f"{path}: {_describe(err)}") from err
    return size


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """PIL's convert('RGB') clips 16/32-bit greyscale at 255 (white images); scale the range down instead."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode in _SIXTEEN_BIT_MODES or arr.max(initial=0.0) > 255.0:
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        img = _sixteen_bit_to_l(img)
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def load_rgb(path: PathLike) -> Image.Image:
    """Fully decode an image as upright 8-bit RGB. Raises DatasetError naming the path and the reason."""
    path = Path(path)
    _check_not_empty(path)
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            rgb = _to_rgb(upright)
            # Detach from the file handle that the with-block closes.
            return rgb.copy() if rgb is img else rgb
    except PIL_ERRORS as err:
        raise DatasetError(f"{path}: {_describe(err)}") from err


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] in [-1, 1] (the range the FLUX VAE expects)."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
