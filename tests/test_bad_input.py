"""Hostile input, one case per kind: run.main exits 2 with a message that names the file or key and says what to do,
before any model loads, and nothing already on disk is written over. Plus the cases that must work (unicode and
spaces in paths) and a disk that fills up during a save.

Unit-level checks of the same rules live in tests/test_config.py and tests/test_data_pairs.py; this file drives
the whole CLI.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image
from safetensors.torch import load_file

import run
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.state.train_state import check_state, list_states


@dataclass
class Case:
    """`setup(root, data, cfg)` breaks something (files under `data`, or the config dict) and returns the config
    text to write, or anything else to write `cfg` as YAML; every string of `expect` must be in the error output."""

    name: str
    setup: Callable[[Path, Path, dict], object]
    expect: tuple[str, ...]


def _set(cfg: dict, dotted: str, value) -> None:
    cfg.update(merge(cfg, {dotted: value}))


def _image(path: Path, size=(64, 64)) -> None:
    Image.new("RGB", size, (90, 10, 200)).save(path)


def _yaml_syntax(root, data, cfg):
    return "job: extension\nconfig:\n  name: tiny\n  process:\n    - type: sd_trainer\n      train: {steps: 2\n"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tiny_image(root, data, cfg):
    _image(data / "target" / "pair_001.png", (8, 8))
    _image(data / "control" / "pair_001.png", (8, 8))


def _duplicate_stem(root, data, cfg):
    shutil.copy(data / "target" / "pair_002.png", data / "target" / "pair_002.jpg")


def _not_writable(root, data, cfg):
    blocker = root / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    if os.geteuid() != 0:  # root ignores permissions, so then a path under a regular file is the unwritable one
        locked = root / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        _set(cfg, "training_folder", str(locked / "out"))
    else:
        _set(cfg, "training_folder", str(blocker / "out"))


CASES = [
    Case("yaml syntax error", _yaml_syntax, ("bad.yaml: line 7, column 1: invalid YAML",)),
    Case("misspelt key", lambda r, d, c: _set(c, "train.learnin_rate", 1e-4),
         ("config.process[0].train.learnin_rate: unknown key; did you mean 'lr'?",)),
    Case("unknown key", lambda r, d, c: _set(c, "datasets", [{**c["config"]["process"][0]["datasets"][0],
                                                                "folder": "x"}]),
         ("config.process[0].datasets[0].folder: unknown key",)),
    Case("wrong type", lambda r, d, c: _set(c, "train.steps", "many"),
         ("config.process[0].train.steps: expected a whole number, got 'many' (string)",)),
    Case("missing folder", lambda r, d, c: shutil.rmtree(d / "control"),
         ("control: folder does not exist (config.process[0].datasets[0].control_path)",)),
    Case("target without control", lambda r, d, c: (d / "control" / "pair_003.png").unlink(),
         ("target/pair_003.png: no control image named 'pair_003.*'",)),
    Case("control without target", lambda r, d, c: _image(d / "control" / "extra.png"),
         ("control/extra.png: control image has no target named 'extra.*'",)),
    Case("zero-byte image", lambda r, d, c: (d / "target" / "pair_004.png").write_bytes(b""),
         ("target/pair_004.png: empty file (0 bytes)",)),
    Case("truncated image", lambda r, d, c: _truncate(d / "control" / "pair_005.png"),
         ("control/pair_005.png: truncated or corrupt image",)),
    Case("not an image", lambda r, d, c: (d / "target" / "pair_006.png").write_text("<html>", encoding="utf-8"),
         ("target/pair_006.png: not an image file",)),
    Case("image under 16 px", _tiny_image, ("pair_001.png: image is 8x8 px; both sides must be at least 16 px",)),
    Case("caption not UTF-8", lambda r, d, c: (d / "target" / "pair_007.txt").write_bytes("café".encode("latin-1")),
         ("target/pair_007.txt: caption is not UTF-8",)),
    Case("missing caption", lambda r, d, c: (d / "target" / "pair_007.txt").unlink(),
         ("target/pair_007.png: no caption file; add pair_007.txt", "default_caption")),
    Case("duplicate stems", _duplicate_stem,
         ("several images share the name 'pair_002' (pair_002.jpg, pair_002.png); keep one",)),
    Case("control_path equals folder_path",
         lambda r, d, c: _set(c, "datasets", [{**c["config"]["process"][0]["datasets"][0],
                                                "control_path": str(d / "target")}]),
         ("config.process[0].datasets[0].control_path: must differ from folder_path",)),
    Case("output folder not writable", _not_writable, ("training_folder: cannot write to",)),
    Case("image above max_image_pixels", lambda r, d, c: _set(c, "datasets", [
        {**c["config"]["process"][0]["datasets"][0], "max_image_pixels": 1000}]),
         ("pixels, above config.process[0].datasets[0].max_image_pixels (1,000); a decompression bomb",
          "target/pair_000.png: image is")),
    Case("missing --ctrl_img", lambda r, d, c: _set(c, "sample.prompts", [f"x --ctrl_img {d / 'nope.png'}"]),
         ("config.process[0].sample.prompts[0]: --ctrl_img", "nope.png does not exist")),
]


@pytest.fixture(autouse=True)
def _pil_limit(monkeypatch):
    """datasets[].max_image_pixels sets PIL's process-wide limit: put it back for the tests that follow."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def test_pil_refuses_a_bomb_above_twice_the_limit_naming_the_file(tmp_path):
    from PIL import Image

    from toolkit.data.images import read_image_size, set_max_image_pixels
    from toolkit.errors import DatasetError

    path = tmp_path / "bomb.png"
    Image.new("L", (300, 300)).save(path)
    set_max_image_pixels(40_000)
    assert Image.MAX_IMAGE_PIXELS == 40_000
    with pytest.raises(DatasetError, match="bomb.png: image too large for PIL's decompression-bomb limit"):
        read_image_size(path)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_a_message_before_any_model_loads(case, tmp_path, tiny_model_dir, demo_data_dir,
                                                                  no_model_load, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data)
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, data), {"train.steps": 2})
    # An earlier run's outputs, which a rejected run must leave alone.
    earlier = tmp_path / "out" / "tiny"
    earlier.mkdir(parents=True)
    (earlier / "tiny.safetensors").write_bytes(b"an earlier LoRA")
    (earlier / "config.yaml").write_text("earlier: true\n", encoding="utf-8")
    text = case.setup(tmp_path, data, cfg)
    config = tmp_path / "bad.yaml"
    if not isinstance(text, str):  # file-writing lambdas return byte counts
        write_config(config, cfg)
    else:
        config.write_text(text, encoding="utf-8")
    before = _snapshot(tmp_path)

    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    for expected in case.expect:
        assert expected in err, err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before


def test_unicode_and_spaces_in_paths_train(tmp_path, tiny_model_dir, demo_data_dir):
    data = tmp_path / "données d'entraînement ü 日本"
    shutil.copytree(demo_data_dir, data)
    cfg = merge(tiny_config_dict(tmp_path / "sortie ✓ out", tiny_model_dir, data, name="modèle ✓"),
                {"train.steps": 2, "save.save_every": 1, "sample.sample_every": 2,
                 "sample.prompts": [f"[trigger] inverse --ctrl_img {data / 'sample_control' / 'sample_000.png'}"]})
    assert run.main([str(write_config(tmp_path / "é config.yaml", cfg))]) == 0
    out = tmp_path / "sortie ✓ out" / "modèle ✓"
    assert load_file(str(out / "modèle ✓.safetensors"))
    assert (out / "samples" / "000000002_sheet.png").is_file()
    assert check_state(out / "state" / "000000002") is None


@pytest.mark.parametrize("fail_on", ["step LoRA", "training state"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(fail_on, tmp_path, tiny_model_dir, demo_data_dir,
                                                               monkeypatch, capsys):
    """ENOSPC on the second save (while writing the step LoRA, or in the middle of the training state): exit 2 with
    a message; the first checkpoint is intact and complete and nothing half-written is left."""
    from toolkit.state import atomic
    from toolkit.adapters import lora

    original = atomic.atomic_write_bytes

    def filling_disk(path, data):
        path = Path(path)
        doomed = (path.name == "tiny_000000002.safetensors" if fail_on == "step LoRA"
                  else path.parent.name.startswith(".000000002.") and path.name == "optimizer.pt")
        if doomed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, data)

    monkeypatch.setattr(atomic, "atomic_write_bytes", filling_disk)
    monkeypatch.setattr(lora, "atomic_write_bytes", filling_disk)
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir),
                {"train.steps": 4, "save.save_every": 1, "save.max_step_saves_to_keep": 1, "sample.prompts": []})
    assert run.main([str(write_config(tmp_path / "cfg.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    run_dir = tmp_path / "out" / "tiny"
    assert "cannot save the checkpoint of step 2" in err and "no space left on the disk" in err
    assert f"the last complete checkpoint ({run_dir / 'state' / '000000001'}) is intact" in err
    assert [step for step, _ in list_states(run_dir)] == [1]
    assert check_state(run_dir / "state" / "000000001") is None
    assert load_file(str(run_dir / "tiny_000000001.safetensors"))
    assert not list((run_dir / "state").glob(".*")), "the half-written state is removed"
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "tiny.safetensors").exists()
