"""The synthetic invert-colors dataset is well formed, exact and reproducible."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.demo_data import build_demo_dataset
from toolkit.errors import UserError


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, keyed by its relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def stems(folder: Path, suffix: str) -> set[str]:
    return {path.stem for path in folder.glob(f"*{suffix}")}


def test_pairs_and_captions_match_by_stem(demo_data_dir: Path) -> None:
    controls = stems(demo_data_dir / "control", ".png")
    assert len(controls) == 8
    assert stems(demo_data_dir / "target", ".png") == controls
    assert stems(demo_data_dir / "target", ".txt") == controls
    for caption in (demo_data_dir / "target").glob("*.txt"):
        assert "invert" in caption.read_text() or "negative" in caption.read_text()


def test_target_is_inverted_control(demo_data_dir: Path) -> None:
    for control_path in sorted((demo_data_dir / "control").glob("*.png")):
        control = np.asarray(Image.open(control_path).convert("RGB"), dtype=np.int16)
        target = np.asarray(Image.open(demo_data_dir / "target" / control_path.name).convert("RGB"), dtype=np.int16)
        assert target.shape == control.shape
        np.testing.assert_array_equal(target, 255 - control)
        assert len(np.unique(control.reshape(-1, 3), axis=0)) > 1, "control image has no shapes"


def test_sizes_span_several_aspect_ratios(demo_data_dir: Path) -> None:
    sizes = [Image.open(path).size for path in (demo_data_dir / "control").glob("*.png")]
    assert all(width % 16 == 0 and height % 16 == 0 for width, height in sizes)
    ratios = {width / height for width, height in sizes}
    assert len(ratios) >= 2
    assert any(r > 1 for r in ratios) and any(r < 1 for r in ratios)


def test_sample_controls_are_held_out(demo_data_dir: Path) -> None:
    samples = sorted((demo_data_dir / "sample_control").glob("*.png"))
    assert len(samples) == 2
    assert not {path.stem for path in samples} & stems(demo_data_dir / "control", ".png")
    pair_bytes = {path.read_bytes() for path in (demo_data_dir / "control").glob("*.png")}
    assert not {path.read_bytes() for path in samples} & pair_bytes


def test_rebuild_is_byte_identical_and_seed_matters(demo_data_dir: Path, tmp_path: Path) -> None:
    assert tree_digest(build_demo_dataset(tmp_path / "again", num_pairs=8, seed=0)) == tree_digest(demo_data_dir)
    other = tree_digest(build_demo_dataset(tmp_path / "other", num_pairs=8, seed=1))
    assert other["control/pair_000.png"] != tree_digest(demo_data_dir)["control/pair_000.png"]


def test_reuse_refuse_and_overwrite(tmp_path: Path) -> None:
    out = build_demo_dataset(tmp_path / "demo", num_pairs=3)
    assert build_demo_dataset(tmp_path / "demo", num_pairs=3) == out
    with pytest.raises(UserError, match="--overwrite"):
        build_demo_dataset(out, num_pairs=4)
    build_demo_dataset(out, num_pairs=4, overwrite=True)
    assert len(list((out / "control").glob("*.png"))) == 4
    with pytest.raises(UserError):
        build_demo_dataset(tmp_path / "none", num_pairs=0)
