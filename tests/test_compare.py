"""`run.py compare`: checkpoint grid, deterministic validation loss (also logged during training), CSV and plot."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from PIL import Image

import run
from jobs import get_job
from jobs.compare import find_checkpoints, load_run
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.train.validation import ValidationSet


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """4 steps with a checkpoint every 2 steps, two sample prompts (and one without --ctrl_img) and 2 held-out pairs
    (validation loss and edit metrics every 2 steps, 1 denoising step per held-out edit)."""
    root = tmp_path_factory.mktemp("compare")
    val = root / "val"
    for sub in ("target", "control"):
        (val / sub).mkdir(parents=True)
        for stem in ("pair_006", "pair_007"):
            for src in (demo_data_dir / sub).glob(f"{stem}.*"):
                shutil.copy(src, val / sub / src.name)
    prompts = [f"[trigger] invert --ctrl_img {demo_data_dir / 'sample_control' / f'sample_00{i}.png'}" for i in (0, 1)]
    prompts.append("a plain picture")  # text-to-image: sampled in training, left out of the compare grid
    cfg = tiny_config_dict(root / "out", tiny_model_dir, demo_data_dir)
    cfg["config"]["process"][0]["datasets"][0].update(val_folder_path=str(val / "target"),
                                                       val_control_path=str(val / "control"))
    cfg = merge(cfg, {"train.steps": 4, "train.lr": 1e-2, "save.save_every": 2, "save.max_step_saves_to_keep": 4,
                      "sample.sample_every": 2, "sample.prompts": prompts, "sample.metric_steps": 1})
    get_job(write_config(root / "cfg.yaml", cfg)).run()
    return root / "out" / "tiny"


def _tensorboard_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_compare_writes_grid_and_validation_loss(trained_run, tmp_path, capsys):
    name, _ = load_run(trained_run)
    assert [c.step for c in find_checkpoints(trained_run, name)] == [0, 2, 4]
    out = tmp_path / "cmp"
    assert run.main(["compare", str(trained_run), "--out", str(out), "--device", "cpu", "--best", "psnr"]) == 0
    captured = capsys.readouterr()
    err = captured.err  # the log line and the bar count the same columns (base + 2 checkpoints)
    assert "comparing 3 columns" in err and "2 checkpoints" in err and "3/3" in err

    # rows: 2 prompts; columns: control | base | step 2 | step 4; 64 px samples in 128 px cells, with titles.
    assert Image.open(out / "grid.png").size == (4 * 128, 20 + 2 * (128 + 20))
    assert len(list((out / "samples").glob("step_*.png"))) == 3 * 2

    with open(out / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    # The held-out pairs are colour inversions: every pixel changes, so there is no keep region to score.
    assert reader.fieldnames == ["step", "checkpoint", "val_loss", "psnr", "ssim"]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    losses = {int(r["step"]): float(r["val_loss"]) for r in rows}
    assert losses[4] < losses[0], "training on the same kind of pairs should lower the held-out loss"
    for metric in ("val_loss", "psnr", "ssim"):
        assert Image.open(out / "plots" / f"{metric}.png").size == (640, 400)
    assert Image.open(out / "metrics.png").size[0] > 640  # the three curves side by side

    # Training logged the same measurements for its live weights (saved as float32, so they match).
    for tag, column in (("val/loss", "val_loss"), ("val/psnr", "psnr"), ("val/ssim", "ssim")):
        logged = _tensorboard_scalars(trained_run / "logs", tag)
        assert sorted(logged) == [2, 4], tag
        for step in (2, 4):
            assert logged[step] == pytest.approx(float(rows[step // 2][column]), rel=1e-3), (tag, step)

    # --best psnr names the checkpoint with the highest PSNR on stdout (val_loss would pick the lowest: unit tests)
    psnr = {int(r["step"]): float(r["psnr"]) for r in rows}
    best = max(psnr, key=psnr.get)
    assert captured.out.startswith(f"best psnr: step {best} ") and f"{psnr[best]:.6g}" in captured.out


def test_validation_loss_is_deterministic(trained_run):
    from extensions.flux_kontext import FluxKontext

    _, process = load_run(trained_run)
    model = FluxKontext.load(process.model, torch.device("cpu"), torch.float32)
    validation = ValidationSet.from_datasets(process.datasets, process.trigger_word, seed=7)
    assert len(validation) == 2
    first = validation.loss(model)
    assert validation.loss(model) == first
    fresh = ValidationSet.from_datasets(process.datasets, process.trigger_word, seed=7)
    assert fresh.loss(model) == pytest.approx(first, rel=1e-6)


def test_compare_needs_a_training_folder(tmp_path, capsys):
    assert run.main(["compare", str(tmp_path)]) == 2
    assert "not a training output folder" in capsys.readouterr().err
