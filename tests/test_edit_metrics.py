"""Edit metrics (toolkit.train.edit_metrics) on images whose scores are known, and the matplotlib curves."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from PIL import Image

from toolkit.render.plot import line_plot, metric_plots
from toolkit.train import edit_metrics as em
from toolkit.train.metric_names import best_step


def test_identical_images_score_perfectly():
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(em.psnr(image, image)).all()
    assert em.ssim(image, image).tolist() == pytest.approx([1.0, 1.0])


def test_psnr_of_known_noise():
    # Uniform +-d noise has mean square d^2 / 3 exactly when every pixel gets +d or -d: PSNR = -10 log10(d^2).
    target = torch.full((1, 3, 16, 16), 0.5)
    signs = torch.where(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    noisy = target + 0.1 * signs
    assert float(em.psnr(noisy, target)) == pytest.approx(20.0, abs=1e-4)
    # Noise a quarter as strong is 20 log10(4) = 12.04 dB better, and SSIM falls with the noise.
    assert float(em.psnr(target + 0.025 * signs, target)) == pytest.approx(20.0 + 20 * math.log10(4), abs=1e-3)
    assert float(em.ssim(target + 0.025 * signs, target)) > float(em.ssim(noisy, target))


def test_keep_scores_cover_only_the_unchanged_region():
    control = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    target = control.clone()
    target[..., :, :24] = 1.0 - target[..., :, :24]  # the edit inverts the left half; the right half is kept
    mask = em.keep_mask(control, target)
    assert mask[..., 24:].all() and mask[..., :24].float().mean() < 0.15  # only mid-grey survives an inversion

    good_keep = target.clone()
    good_keep[..., :, :24] = 0.0  # a wrong edit, but the kept half untouched
    scores = em.edit_scores(good_keep, target, control)[0]
    assert math.isinf(scores["keep_psnr"]) and scores["keep_ssim"] == pytest.approx(1.0, abs=1e-3)
    assert scores["psnr"] < 10.0

    inverted = 1.0 - control  # the colour inversion changes every pixel: no kept region
    assert math.isnan(em.edit_scores(inverted, inverted, control)[0]["keep_psnr"])
    assert em.mean_scores([{"psnr": 10.0, "keep_psnr": math.nan}, {"psnr": 20.0, "keep_psnr": math.nan}]) == \
        {"psnr": 15.0}


def test_perceptual_scorer_is_used_for_both_regions():
    calls = []

    def fake(pred, target):
        calls.append(pred.clone())
        return (pred - target).abs().mean(dim=(1, 2, 3))

    control = torch.zeros(1, 3, 8, 8)
    target = control.clone()
    target[..., :4] = 1.0
    pred = torch.full_like(target, 0.5)
    scores = em.edit_scores(pred, target, control, perceptual=fake)[0]
    assert scores["lpips"] == pytest.approx(0.5)
    assert scores["keep_lpips"] == pytest.approx(0.25)  # the changed half replaced by the target
    assert len(calls) == 2


def test_best_step_follows_each_metrics_direction():
    table = {0: {"val_loss": 0.5, "psnr": 10.0}, 2: {"val_loss": 0.3, "psnr": 14.0}, 4: {"val_loss": 0.4, "psnr": 14.0}}
    assert best_step(table, "psnr") == (2, 14.0)  # a tie goes to the earlier step
    assert best_step(table, "val_loss") == (2, 0.3)
    with pytest.raises(KeyError, match="measured: psnr, val_loss"):
        best_step(table, "ssim")


def test_lpips_is_skipped_with_one_line_without_local_weights(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache: nothing to load
    with caplog.at_level(logging.INFO, logger="toolkit.train.edit_metrics"):
        assert em.load_lpips(torch.device("cpu")) is None
    assert [r.getMessage() for r in caplog.records if "lpips skipped" in r.getMessage()] != []
    assert len(caplog.records) == 1


def test_metric_plots_are_pngs_with_one_panel_per_metric():
    table = {0: {"psnr": 10.0, "ssim": 0.2}, 50: {"psnr": 12.0, "ssim": 0.4}, 100: {"psnr": 15.0}}
    singles, combined = metric_plots([0, 50, 100], table, ["psnr", "ssim"])
    assert set(singles) == {"psnr", "ssim"}
    assert Image.open(io.BytesIO(singles["psnr"])).size == (640, 400)
    width, height = Image.open(io.BytesIO(combined)).size
    assert width > 640 and height > 200
    with pytest.raises(ValueError):
        line_plot([1, 2], [1.0], "t", "x", "y")


def test_held_out_edits_score_the_true_inversion_far_above_no_edit(demo_data_dir):
    """EditEval renders each held-out control at its training bucket and compares with the target cut the same way:
    a model that inverts the control scores near-perfectly on the colour-inversion pairs, one that returns the
    control unchanged scores badly, and the rows split by index like the processes of a run."""
    from PIL import ImageOps

    from toolkit.config.schema import DatasetConfig
    from toolkit.train.edit_eval import EditEval
    from toolkit.train.validation import ValidationSet

    cfg = DatasetConfig(folder_path="/unused", control_path="/unused", resolution=[64],
                        val_folder_path=str(demo_data_dir / "target"), val_control_path=str(demo_data_dir / "control"))
    edits = EditEval.from_validation(ValidationSet.from_datasets([cfg], "inv3rt", 0), steps=3, seed=5,
                                     guidance_scale=2.0)
    seen = []

    class Model:
        invert = True

        def sample(self, requests, controls, stop=None):
            seen.extend(requests)
            return [ImageOps.invert(c[0]) if self.invert else c[0] for c in controls]

    model = Model()
    shares = [edits.score(model, range(rank, len(edits), 2)) for rank in (0, 1)]  # two processes' shares
    assert sorted(i for rows in shares for i, _ in rows) == list(range(len(edits)))
    learned = EditEval.summary(shares[0] + shares[1])
    assert learned["psnr"] > 35 and learned["ssim"] > 0.95
    model.invert = False
    untouched = EditEval.summary(edits.score(model, range(len(edits))))
    assert untouched["psnr"] < 12 and untouched["ssim"] < learned["ssim"]
    request = seen[0]
    assert (request.steps, request.seed, request.guidance_scale) == (3, 5, 2.0)
    assert "inv3rt" in request.prompt and (request.width, request.height) == edits.items[0].target.size
