"""Aspect-ratio buckets, crop boxes and the control-image box mapping."""

from __future__ import annotations

import itertools

import pytest

from toolkit.data.buckets import bucket_for, crop_box, scale_box

ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2), (3, 1), (21, 9)]


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
@pytest.mark.parametrize("aspect_w,aspect_h", ASPECTS)
def test_bucket_has_multiple_of_16_sides_area_and_aspect(resolution, aspect_w, aspect_h):
    width, height = aspect_w * 1000, aspect_h * 1000  # larger than every bucket
    bucket_w, bucket_h = bucket_for(width, height, resolution)
    assert bucket_w % 16 == 0 and bucket_h % 16 == 0
    assert abs(bucket_w * bucket_h / resolution**2 - 1) < 0.1
    assert abs((bucket_w / bucket_h) / (aspect_w / aspect_h) - 1) < 0.1


def test_known_buckets():
    assert bucket_for(1920, 1080, 1024) == (1360, 768)
    assert bucket_for(1080, 1920, 1024) == (768, 1360)
    assert bucket_for(4000, 4000, 512) == (512, 512)
    assert bucket_for(1024, 1024, 1024) == (1024, 1024)


def test_small_images_are_not_upscaled():
    assert bucket_for(300, 200, 512) == (288, 192)  # floored to multiples of 16, no scaling
    assert bucket_for(16, 16, 1024) == (16, 16)
    assert bucket_for(1100, 200, 512) == (1088, 192)  # fewer pixels than 512*512 -> own size


def test_bucket_never_exceeds_the_image():
    sides = [16, 17, 31, 100, 257, 511, 512, 513, 700, 1023, 1500, 3000]
    for width, height, resolution in itertools.product(sides, sides, [256, 512, 1024]):
        bucket_w, bucket_h = bucket_for(width, height, resolution)
        assert 16 <= bucket_w <= width and 16 <= bucket_h <= height
        assert bucket_w % 16 == 0 and bucket_h % 16 == 0
        assert bucket_w * bucket_h <= max(width * height, resolution**2 * 1.1)


def test_bucket_rejects_bad_input():
    with pytest.raises(ValueError, match="smaller than 16"):
        bucket_for(15, 100, 512)
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_for(100, 100, 500)


@pytest.mark.parametrize(
    "src,bucket",
    [((1920, 1080), (1360, 768)), ((1000, 1000), (512, 768)), ((240, 100), (96, 48)), ((300, 200), (288, 192))],
)
def test_crop_box_keeps_bucket_aspect_and_is_centered(src, bucket):
    left, top, right, bottom = crop_box(*src, *bucket)
    assert abs((right - left) / (bottom - top) - bucket[0] / bucket[1]) < 1e-9
    assert left >= 0 and top >= 0 and right <= src[0] + 1e-9 and bottom <= src[1] + 1e-9
    assert abs(left - (src[0] - right)) < 1e-9 and abs(top - (src[1] - bottom)) < 1e-9
    # as little cropped as possible: one dimension is kept whole
    assert right - left == pytest.approx(src[0]) or bottom - top == pytest.approx(src[1])


def test_crop_box_examples():
    assert crop_box(240, 100, 96, 48) == (20.0, 0.0, 220.0, 100.0)
    assert crop_box(100, 240, 48, 96) == (0.0, 20.0, 100.0, 220.0)
    assert crop_box(64, 64, 64, 64) == (0.0, 0.0, 64.0, 64.0)


def test_scale_box_maps_onto_a_control_of_another_size():
    box = crop_box(240, 100, 96, 48)
    assert scale_box(box, (240, 100), (480, 200)) == (40.0, 0.0, 440.0, 200.0)
    assert scale_box(box, (240, 100), (120, 100)) == (10.0, 0.0, 110.0, 100.0)  # other aspect: same relative box
    assert scale_box(box, (240, 100), (240, 100)) == box
