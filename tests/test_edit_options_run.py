"""Edit-pair options in real tiny runs: several captions per pair, control dropout and changed-region weights train,
and a run that uses all three resumes bit for bit (their draws depend on seed, epoch and item only)."""

from __future__ import annotations

import shutil
from pathlib import Path

import run
from tests.helpers import assert_same_tensors, merge, tiny_config_dict, write_config

OPTIONS = {"control_dropout_rate": 0.5, "changed_region_loss": True, "changed_region_blur": 2}


def _edit_data(demo_data_dir: Path, dest: Path) -> Path:
    """The demo pairs with two instructions in every caption file."""
    shutil.copytree(demo_data_dir, dest)
    for caption in (dest / "target").glob("*.txt"):
        caption.write_text("invert the colors of the image\nswap every colour for its opposite\n", encoding="utf-8")
    return dest


def _config(folder: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    """9 steps of batch 1 over 8 pairs (the resume from step 6 crosses into epoch 1), a state every 3 steps."""
    cfg = tiny_config_dict(folder / "out", model_dir, data_dir)
    cfg = merge(cfg, {"train.steps": 9, "train.batch_size": 1, "save.save_every": 3, "save.max_step_saves_to_keep": 4,
                      "train.disable_sampling": True, "network.dropout": 0.1, **overrides})
    cfg["config"]["process"][0]["datasets"][0].update(OPTIONS)
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "tiny.yaml", cfg)


def test_edit_options_train_and_resume_bit_identically(tmp_path, tiny_model_dir, demo_data_dir, transformer_calls):
    data = _edit_data(demo_data_dir, tmp_path / "data")
    reference = _config(tmp_path / "ref", tiny_model_dir, data)
    assert run.main([str(reference)]) == 0
    # Control dropout happened on some steps and not on others: forwards without any frame-1 (control) token.
    frames = [counts for _, counts in transformer_calls[:9]]
    dropped = sum(1 not in counts for counts in frames)
    assert 0 < dropped < 9, frames
    state = tmp_path / "ref" / "out" / "tiny" / "state" / "000000006"
    resumed = _config(tmp_path / "resumed", tiny_model_dir, data, **{"train.resume_from": str(state)})
    assert run.main([str(resumed)]) == 0
    assert_same_tensors(tmp_path / "ref" / "out" / "tiny" / "tiny.safetensors",
                        tmp_path / "resumed" / "out" / "tiny" / "tiny.safetensors")
