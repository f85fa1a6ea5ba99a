"""Pair discovery and validation, caption files, and image loading."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from toolkit.data.captions import prepare_caption, read_caption
from toolkit.data.images import load_rgb, read_image_size, to_tensor
from toolkit.data.pairs import discover_pairs
from toolkit.errors import DatasetError


def save_image(path: Path, size: tuple[int, int] = (64, 48), color=(200, 30, 30), mode: str = "RGB", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kw)
    return path


def dataset_cfg(folder: Path, control, **overrides) -> SimpleNamespace:
    values = dict(
        folder_path=str(folder),
        control_path=None if control is None else str(control),
        caption_ext="txt",
        default_caption=None,
        caption_dropout_rate=0.0,
        shuffle_tokens=False,
        resolution=[32],
        num_repeats=1,
        cache_latents_to_disk=False,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def make_pairs(root: Path, stems=("b", "a", "c"), ext: str = ".png") -> SimpleNamespace:
    """Targets with captions in root/targets, controls in root/controls."""
    targets, controls = root / "targets", root / "controls"
    for stem in stems:
        save_image(targets / f"{stem}{ext}")
        save_image(controls / f"{stem}{ext}", color=(10, 10, 200))
        (targets / f"{stem}.txt").write_text(f"make it {stem}\n", encoding="utf-8")
    return dataset_cfg(targets, controls)


def error_text(cfg) -> str:
    with pytest.raises(DatasetError) as excinfo:
        discover_pairs([cfg])
    return str(excinfo.value)


def test_good_pairs_are_found_and_sorted(tmp_path):
    cfg = make_pairs(tmp_path)
    pairs = discover_pairs([cfg])
    assert [p.target.name for p in pairs] == ["a.png", "b.png", "c.png"]
    assert [p.control.name for p in pairs] == ["a.png", "b.png", "c.png"]
    assert all(p.control.parent.name == "controls" for p in pairs)
    assert pairs[0].caption == "make it a"
    assert pairs[0].target_size == (64, 48) and pairs[0].control_size == (64, 48)
    assert pairs[0].dataset_index == 0


def test_target_without_control(tmp_path):
    cfg = make_pairs(tmp_path)
    (tmp_path / "controls" / "b.png").unlink()
    assert f"{tmp_path / 'targets' / 'b.png'}: no control image" in error_text(cfg)


def test_control_without_target(tmp_path):
    cfg = make_pairs(tmp_path)
    save_image(tmp_path / "controls" / "extra.png")
    assert f"{tmp_path / 'controls' / 'extra.png'}: control image has no target" in error_text(cfg)


def test_case_only_mismatch_is_hinted(tmp_path):
    cfg = make_pairs(tmp_path, stems=("a",))
    (tmp_path / "controls" / "a.png").rename(tmp_path / "controls" / "A.png")
    assert "differs only in letter case" in error_text(cfg)


def test_zero_byte_file(tmp_path):
    cfg = make_pairs(tmp_path)
    (tmp_path / "targets" / "a.png").write_bytes(b"")
    text = error_text(cfg)
    assert f"{tmp_path / 'targets' / 'a.png'}: empty file (0 bytes)" in text


def test_truncated_jpeg(tmp_path):
    cfg = make_pairs(tmp_path, ext=".jpg")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "controls" / "a.jpg"
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-200])
    text = error_text(cfg)
    assert f"{path}: truncated" in text


def test_text_file_renamed_png(tmp_path):
    cfg = make_pairs(tmp_path)
    (tmp_path / "targets" / "c.png").write_text("I am not an image", encoding="utf-8")
    assert f"{tmp_path / 'targets' / 'c.png'}: not an image file" in error_text(cfg)


def test_missing_caption_without_default(tmp_path):
    cfg = make_pairs(tmp_path)
    (tmp_path / "targets" / "b.txt").unlink()
    text = error_text(cfg)
    assert f"{tmp_path / 'targets' / 'b.png'}: no caption file; add b.txt" in text
    assert "default_caption" in text


def test_default_caption_is_used_for_missing_captions(tmp_path):
    cfg = make_pairs(tmp_path)
    cfg.default_caption = "turn it [trigger]"
    (tmp_path / "targets" / "b.txt").unlink()
    by_name = {p.target.name: p.caption for p in discover_pairs([cfg])}
    assert by_name == {"a.png": "make it a", "b.png": "turn it [trigger]", "c.png": "make it c"}


def test_caption_ext_with_other_extension(tmp_path):
    cfg = make_pairs(tmp_path, stems=("a",))
    (tmp_path / "targets" / "a.caption").write_text("other", encoding="utf-8")
    cfg.caption_ext = "caption"
    assert discover_pairs([cfg])[0].caption == "other"


def test_non_utf8_caption(tmp_path):
    cfg = make_pairs(tmp_path)
    (tmp_path / "targets" / "a.txt").write_bytes("café au lait".encode("latin-1"))
    text = error_text(cfg)
    assert f"{tmp_path / 'targets' / 'a.txt'}: caption is not UTF-8" in text


def test_utf8_bom_caption_is_tolerated(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeff  café, [trigger]\n".encode("utf-8"))
    assert read_caption(path) == "café, [trigger]"


@pytest.mark.parametrize("folder", ["targets", "controls"])
def test_duplicate_stems(tmp_path, folder):
    cfg = make_pairs(tmp_path)
    save_image(tmp_path / folder / "a.jpg")
    text = error_text(cfg)
    assert f"{tmp_path / folder}: several images share the name 'a' (a.jpg, a.png)" in text


def test_empty_folder(tmp_path):
    (tmp_path / "targets").mkdir()
    (tmp_path / "controls").mkdir()
    (tmp_path / "targets" / "notes.txt").write_text("no images here", encoding="utf-8")
    text = error_text(dataset_cfg(tmp_path / "targets", tmp_path / "controls"))
    assert f"{tmp_path / 'targets'}: no .jpg/.jpeg/.png/.webp images in the folder" in text


def test_missing_folders(tmp_path):
    text = error_text(dataset_cfg(tmp_path / "nope", tmp_path / "nada"))
    assert f"{tmp_path / 'nope'}: folder does not exist (config.process[0].datasets[0].folder_path)" in text
    assert f"{tmp_path / 'nada'}: folder does not exist (config.process[0].datasets[0].control_path)" in text


def test_folder_path_is_a_file(tmp_path):
    file = save_image(tmp_path / "x.png")
    assert f"{file}: is not a folder" in error_text(dataset_cfg(file, tmp_path))


def test_control_path_none_is_plain_images_still_checked(tmp_path):
    cfg = make_pairs(tmp_path)
    cfg.control_path = None
    assert [p.control for p in discover_pairs([cfg])] == [None] * 3
    (tmp_path / "targets" / "a.png").write_bytes(b"")
    text = error_text(cfg)
    assert text.startswith("The dataset has 1 problem;")
    assert f"{tmp_path / 'targets' / 'a.png'}: empty file" in text  # targets are still checked


def test_blank_control_path(tmp_path):
    cfg = make_pairs(tmp_path)
    cfg.control_path = " "
    assert "config.process[0].datasets[0].control_path is empty" in error_text(cfg)


def test_same_folder_for_targets_and_controls(tmp_path):
    cfg = make_pairs(tmp_path)
    cfg.control_path = cfg.folder_path
    assert "folder_path and control_path are the same folder" in error_text(cfg)


def test_too_small_image(tmp_path):
    cfg = make_pairs(tmp_path)
    save_image(tmp_path / "controls" / "a.png", size=(15, 40))
    assert f"{tmp_path / 'controls' / 'a.png'}: image is 15x40 px" in error_text(cfg)


def test_several_problems_are_reported_together(tmp_path):
    good = make_pairs(tmp_path / "one")
    (tmp_path / "one" / "targets" / "a.png").write_bytes(b"")
    (tmp_path / "one" / "targets" / "b.txt").unlink()
    (tmp_path / "one" / "controls" / "c.png").unlink()
    missing = dataset_cfg(tmp_path / "missing", None)
    with pytest.raises(DatasetError) as excinfo:
        discover_pairs([good, missing], config_path_prefix="cfg.datasets")
    text = str(excinfo.value)
    assert text.startswith("The dataset has 4 problems")
    assert f"{tmp_path / 'one' / 'targets' / 'a.png'}: empty file" in text
    assert "add b.txt" in text
    assert f"{tmp_path / 'one' / 'targets' / 'c.png'}: no control image" in text
    assert "cfg.datasets[1].folder_path" in text


def test_unicode_and_spaces_in_paths(tmp_path):
    root = tmp_path / "my dätä set 目标"
    cfg = make_pairs(root, stems=("ça va 1", "日本 2"))
    pairs = discover_pairs([cfg])
    assert [p.target.name for p in pairs] == ["ça va 1.png", "日本 2.png"]
    assert pairs[1].caption == "make it 日本 2"


def test_hidden_files_are_ignored(tmp_path):
    cfg = make_pairs(tmp_path)
    (tmp_path / "targets" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert len(discover_pairs([cfg])) == 3


def test_small_images_are_allowed_with_a_warning(tmp_path, caplog):
    cfg = make_pairs(tmp_path)
    cfg.resolution = [512, 1024]
    with caplog.at_level(logging.WARNING, logger="toolkit.data.pairs"):
        assert len(discover_pairs([cfg])) == 3
    assert "3 of 3 target images have fewer pixels than 512x512" in caplog.text


def test_two_datasets_keep_their_index(tmp_path):
    first, second = make_pairs(tmp_path / "1", stems=("a",)), make_pairs(tmp_path / "2", stems=("a",))
    pairs = discover_pairs([second, first])
    assert [(p.target.parent.parent.name, p.dataset_index) for p in pairs] == [("1", 1), ("2", 0)]


def test_exif_rotated_image_has_rotated_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save_image(tmp_path / "targets" / "a.jpg", size=(64, 32), exif=exif)
    assert read_image_size(path) == (32, 64)
    assert load_rgb(path).size == (32, 64)
    save_image(tmp_path / "controls" / "a.jpg", size=(32, 64))
    cfg = dataset_cfg(tmp_path / "targets", tmp_path / "controls", default_caption="x")
    assert discover_pairs([cfg])[0].target_size == (32, 64)


def test_modes_load_as_rgb(tmp_path):
    save_image(tmp_path / "rgba.png", size=(20, 20), color=(255, 0, 0, 0), mode="RGBA")
    save_image(tmp_path / "grey.png", size=(20, 20), color=100, mode="L")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)
    sixteen = Image.fromarray(np.full((20, 20), 30000, dtype=np.uint16))
    sixteen.save(tmp_path / "sixteen.png")
    loaded = {name: load_rgb(tmp_path / f"{name}.png") for name in ("rgba", "grey", "palette", "sixteen")}
    assert all(img.mode == "RGB" and img.size == (20, 20) for img in loaded.values())
    assert loaded["rgba"].getpixel((5, 5)) == (255, 255, 255)  # fully transparent -> white, not black/red
    assert loaded["grey"].getpixel((5, 5)) == (100, 100, 100)
    assert loaded["palette"].getpixel((0, 0)) == (255, 0, 0)
    assert loaded["palette"].getpixel((5, 5)) == (255, 255, 255)  # transparent palette entry -> white
    assert loaded["sixteen"].getpixel((5, 5)) == (117, 117, 117)  # 30000 / 257, not clipped to 255


def test_to_tensor_range_and_layout():
    img = Image.new("RGB", (3, 2), (0, 255, 0))
    tensor = to_tensor(img)
    assert tensor.shape == (3, 2, 3) and tensor.dtype.is_floating_point
    assert tensor[0].max() == -1.0 and tensor[1].min() == 1.0


def test_prepare_caption_rules():
    rng = random.Random(0)
    assert prepare_caption("a [trigger] cat", "ohwx", False, 0.0, rng) == "a ohwx cat"
    assert prepare_caption("[trigger], a cat", None, False, 0.0, rng) == "a cat"
    assert prepare_caption("a cat", "ohwx", False, 0.0, rng) == "ohwx, a cat"
    assert prepare_caption("ohwxyz cat", "ohwx", False, 0.0, rng) == "ohwx, ohwxyz cat"
    assert prepare_caption("", "ohwx", False, 0.0, rng) == "ohwx"
    assert prepare_caption("a cat", "ohwx", False, 1.0, rng) == ""
    shuffled = {prepare_caption("p, q, r, s, t", "ohwx", True, 0.0, random.Random(i)) for i in range(20)}
    assert len(shuffled) > 1 and all(c.startswith("ohwx, ") for c in shuffled)
    assert all(sorted(c.split(", ")) == sorted("ohwx, p, q, r, s, t".split(", ")) for c in shuffled)
    same = [prepare_caption("p, q, r, s", None, True, 0.5, random.Random(7)) for _ in range(2)]
    assert same[0] == same[1]
