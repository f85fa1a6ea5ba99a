"""Aspect-ratio buckets: which (width, height) an image trains at, and which part of it is kept.

The rule, for a training resolution R and an image of w x h pixels (after EXIF rotation):

1. Sides are multiples of ``step`` = 16: the FLUX VAE downsamples by 8 and the transformer packs 2x2 latents into
   one token, so anything else cannot be encoded and packed.
2. If the image has more than R*R pixels, it is scaled to about R*R pixels at its own aspect ratio: each side is
   ``side * sqrt(R*R / (w*h))`` rounded to the nearest multiple of 16. So a 16:9 photo at R=1024 trains at
   1360x768, not squashed to 1024x1024, and all images of one resolution cost about the same compute.
3. Images are never upscaled: if the image has at most R*R pixels (or rounding would make a bucket side larger than
   the image's side), the side is the image's own side floored to a multiple of 16. Upscaling only adds blur the
   model would learn. A side smaller than 16 px cannot be trained; discovery rejects such files before this.
4. The image is cropped to the bucket's aspect ratio with a centred box that keeps as much as possible
   (``crop_box``), then resized to the bucket. Because sides are rounded, the crop is at most a few pixels.
5. A control image is cut with the SAME relative box as its target (``scale_box``), then resized to the same
   bucket, so pixel (x, y) of the control still corresponds to pixel (x, y) of the target even when the control
   was saved at a different size. (A control with a different aspect ratio is stretched; discovery warns.)
"""

from __future__ import annotations

import math

Box = tuple[float, float, float, float]


def _floor_to(value: float, step: int) -> int:
    return int(math.floor(value / step)) * step


def _round_to(value: float, step: int) -> int:
    return int(math.floor(value / step + 0.5)) * step


def bucket_for(width: int, height: int, resolution: int, step: int = 16) -> tuple[int, int]:
    """The (bucket_width, bucket_height) an image of ``width`` x ``height`` trains at for ``resolution``.

    Raises ValueError for a side smaller than ``step`` or a resolution that is not a positive multiple of ``step``.
    """
    if resolution < step or resolution % step:
        raise ValueError(f"resolution {resolution} must be a positive multiple of {step}")
    if width < step or height < step:
        raise ValueError(f"image of {width}x{height} px has a side smaller than {step} px")
    max_w, max_h = _floor_to(width, step), _floor_to(height, step)
    target_area = resolution * resolution
    if width * height <= target_area:
        return max_w, max_h
    scale = math.sqrt(target_area / (width * height))
    bucket_w = max(step, min(max_w, _round_to(width * scale, step)))
    bucket_h = max(step, min(max_h, _round_to(height * scale, step)))
    return bucket_w, bucket_h


def crop_box(src_w: float, src_h: float, bucket_w: int, bucket_h: int,
             offset: tuple[float, float] = (0.5, 0.5)) -> Box:
    """(left, top, right, bottom) box in source pixels with the bucket's aspect ratio, as large as fits; centred, or
    placed `offset` (x, y fractions of the slack, 0 = left/top edge, 1 = right/bottom edge) along the cut side.

    Coordinates are floats so the later resize (PIL ``resize(box=...)``) keeps sub-pixel accuracy.
    """
    if min(src_w, src_h, bucket_w, bucket_h) <= 0:
        raise ValueError(f"sizes must be positive: source {src_w}x{src_h}, bucket {bucket_w}x{bucket_h}")
    bucket_aspect = bucket_w / bucket_h
    if src_w / src_h > bucket_aspect:
        crop_w, crop_h = src_h * bucket_aspect, float(src_h)
    else:
        crop_w, crop_h = float(src_w), src_w / bucket_aspect
    left = (src_w - crop_w) * offset[0]
    top = (src_h - crop_h) * offset[1]
    return (left, top, left + crop_w, top + crop_h)


def scale_box(box: Box, from_size: tuple[float, float], to_size: tuple[float, float]) -> Box:
    """Map a box on an image of ``from_size`` (w, h) to the same relative box on an image of ``to_size``."""
    (from_w, from_h), (to_w, to_h) = from_size, to_size
    sx, sy = to_w / from_w, to_h / from_h
    left, top, right, bottom = box
    return (left * sx, top * sy, right * sx, bottom * sy)


MAX_MERGE_ASPECT = 1.4  # merge only buckets whose aspect ratios differ by at most this factor (crops stay modest)


def merge_small_buckets(counts: dict[tuple[int, int], int], global_batch: int) -> dict[tuple[int, int], tuple[int, int]]:
    """Old bucket -> merged bucket, so that no bucket has fewer items than one global batch when the data allows it.

    With few images and several processes most buckets hold fewer items than a global batch, and their items would
    repeat within a batch (an epoch of 12 photos took 9 batches of 2 instead of 6). The smallest such bucket is
    merged with the bucket of the closest aspect ratio (within MAX_MERGE_ASPECT), until none is short or none can
    merge. A merged bucket is the sides' minimum of the two, so it is never larger than any member image (rule 3: no
    upscaling); members are cropped to its aspect ratio (rule 4)."""
    groups = {bucket: [bucket] for bucket in counts}
    sizes = dict(counts)

    def distance(a: tuple[int, int], b: tuple[int, int]) -> float:
        return abs(math.log((a[0] / a[1]) / (b[0] / b[1])))

    while len(groups) > 1:
        # the smallest bucket first; a short partner before a full one (two short buckets may fill each other), and
        # one that leaves whole batches (no item repeats) before one that leaves a remainder
        pairs = [(sizes[s], sizes[b] >= global_batch, (sizes[s] + sizes[b]) % global_batch != 0, distance(s, b),
                  -sizes[b], s, b) for s in groups
                 if sizes[s] < global_batch
                 for b in groups if b != s and distance(s, b) <= math.log(MAX_MERGE_ASPECT) + 1e-9]
        if not pairs:
            break
        *_, small, partner = min(pairs)
        merged = (min(small[0], partner[0]), min(small[1], partner[1]))
        members = groups.pop(small) + groups.pop(partner) + groups.pop(merged, [])
        total = sizes.pop(small) + sizes.pop(partner) + sizes.pop(merged, 0)
        groups[merged], sizes[merged] = members, total
    return {old: new for new, members in groups.items() for old in members}


def control_bucket_for(bucket: tuple[int, int], control_resolution: "int | None") -> tuple[int, int]:
    """The size control images render at for a target bucket: the bucket itself, or with a control_resolution the
    bucket scaled down to about control_resolution**2 pixels at its aspect ratio (rule 2; never up, rule 3)."""
    return bucket if control_resolution is None else bucket_for(*bucket, control_resolution)
