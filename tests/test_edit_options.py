"""Edit-pair options (issue 19): several captions per pair, control-image dropout, changed-region loss weights.
Unit level: the dataset, collate and the pure weight map; the training runs are in tests/test_edit_options_run.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import dataclasses

from extensions.flux_kontext import FluxKontext, rope_cache
from tests.test_cache import FakeRank
from tests.test_dataset import dataset_cfg, make_pair
from toolkit.config.loader import ConfigProblems, load_job_dict
from toolkit.data.cache import Encoder, cache_dataset
from toolkit.data.captions import caption_lines
from toolkit.data.change_weights import changed_region_weights, gaussian_blur
from toolkit.data.dataset import PairedDataset, collate_batch
from toolkit.train.flow_matching import flow_matching_loss


def edit_pair(tmp_path: Path, caption: str = "x", name: str = "e"):
    """A 64x64 grey control and its target: the same picture with a white 16x16 square at (8..24, 8..24)."""
    control = np.full((64, 64, 3), 100, dtype=np.uint8)
    target = control.copy()
    target[8:24, 8:24] = 255
    return make_pair(tmp_path, name, Image.fromarray(target), Image.fromarray(control), caption)


# -- several captions per pair -------------------------------------------------------------------------------------
def test_caption_lines_split_only_files_of_several_lines():
    assert caption_lines("turn it red\n\n  make it blue \n") == ["turn it red", "make it blue"]
    assert caption_lines("one line, with parts\n") == ["one line, with parts"]
    assert caption_lines("") == [""]


def test_one_line_per_epoch_from_the_seed_and_every_line_cacheable(tmp_path):
    pair = edit_pair(tmp_path, caption="make it red\nmake it blue\nmake it green")
    make = lambda: PairedDataset([pair], [dataset_cfg(num_repeats=2)], trigger_word=None, seed=3)  # noqa: E731
    dataset = make()
    picks = []
    for epoch in range(12):
        dataset.set_epoch(epoch)
        picks.append([dataset[i]["caption"] for i in range(len(dataset))])
    lines = {"make it red", "make it blue", "make it green"}
    assert {c for epoch in picks for c in epoch} == lines  # every line trains, one per item and epoch
    resumed = make()  # a resumed run builds the dataset anew: the same line for the same (epoch, item)
    resumed.set_epoch(7)
    assert [resumed[i]["caption"] for i in range(len(resumed))] == picks[7]
    assert set(dataset.item_captions(0)) == lines  # cache_text_embeddings encodes every line
    whole = PairedDataset([pair], [dataset_cfg(caption_per_line=False)], trigger_word=None, seed=3)
    assert whole[0]["caption"] == pair.caption


def test_a_one_line_caption_draws_exactly_as_before(tmp_path):
    """caption_per_line must not consume caption randomness: dropout and shuffling of one-line files unchanged."""
    pair = edit_pair(tmp_path, caption="a, b, c, d")
    on, off = (PairedDataset([pair], [dataset_cfg(caption_dropout_rate=0.5, shuffle_tokens=True,
                                                  caption_per_line=flag)], trigger_word="t", seed=1)
               for flag in (True, False))
    for epoch in range(10):
        on.set_epoch(epoch), off.set_epoch(epoch)
        assert on[0]["caption"] == off[0]["caption"]


# -- control dropout -----------------------------------------------------------------------------------------------
def test_control_dropout_is_drawn_per_item_and_epoch_from_the_seed(tmp_path):
    pairs = [edit_pair(tmp_path, name=f"p{k}") for k in range(4)]
    make = lambda: PairedDataset(pairs, [dataset_cfg(control_dropout_rate=0.5)], None, seed=5)  # noqa: E731
    dataset = make()
    draws = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        draws.append([dataset[i]["control_dropped"] for i in range(4)])
    flat = [d for epoch in draws for d in epoch]
    assert 0 < sum(flat) < len(flat)
    resumed = make()
    resumed.set_epoch(2)
    assert [resumed[i]["control_dropped"] for i in range(4)] == draws[2]
    assert "control_dropped" not in PairedDataset(pairs, [dataset_cfg()], None, seed=5)[0]  # rate 0: no draw


def test_a_batch_drops_its_controls_by_its_first_item(tmp_path):
    pairs = [edit_pair(tmp_path, name=f"p{k}") for k in range(2)]
    dataset = PairedDataset(pairs, [dataset_cfg(control_dropout_rate=0.5)], None, seed=0)
    first, second = dataset[0], dataset[1]
    first["control_dropped"], second["control_dropped"] = True, False
    dropped = collate_batch([first, second])
    assert dropped["control_dropped"] is True and not any(k.startswith("control_") or k == "control" for k in
                                                          dropped if k != "control_dropped")
    kept = collate_batch([second, first])
    assert kept["control_dropped"] is False and kept["control"].shape == (2, 3, 64, 64)
    cached = {**first, "control_latents": torch.zeros(16, 8, 8), "target_latents": torch.zeros(16, 8, 8)}
    assert "control_latents" not in collate_batch([cached]) and "target_latents" in collate_batch([cached])


def test_datasets_with_another_dropout_rate_never_share_a_batch(tmp_path):
    a, b = edit_pair(tmp_path), dataclasses.replace(edit_pair(tmp_path, name="b"), dataset_index=1)
    dataset = PairedDataset([a, b], [dataset_cfg(control_dropout_rate=0.3), dataset_cfg()], None, seed=0)
    assert dataset.batch_keys[0] != dataset.batch_keys[1] and dataset.bucket_keys[0] == dataset.bucket_keys[1]


def test_a_dropped_batch_gives_kontext_no_control_tokens(tmp_path):
    """What the denoiser gets for a dropped batch: zero control tokens, position ids of the target only."""
    model = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, _ids=rope_cache.IdTables(),
                            trim_text_tokens=False,
                            transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=True)))
    batch = {"target_latents": torch.randn(2, 16, 8, 8), "control_latents": torch.randn(2, 16, 8, 8),
             "prompt_embeds": torch.randn(2, 4, 32), "pooled": torch.randn(2, 32), "caption": ["a", "b"]}
    for items, expected in ((batch, 16), ({k: v for k, v in batch.items() if k != "control_latents"}, 0)):
        encoded = FluxKontext.encode_batch(model, items)
        inputs = FluxKontext.denoiser_inputs(model, encoded, encoded.x0, torch.tensor([0.5, 0.5]), 1.0)
        assert inputs["control_tokens"].shape == (2, expected, 64)
        assert inputs["img_ids"].shape[0] == 16 + expected


def _problems(dataset: dict) -> list[str]:
    model = {"name_or_path": "m", "arch": "flux_kontext"}
    raw = {"config": {"name": "x", "process": [{"model": model, "datasets": [dataset]}]}}
    try:
        load_job_dict(raw, "test.yaml", environ={})
    except ConfigProblems as err:
        return err.problems
    return []


def test_control_dropout_and_changed_region_need_control_images(tmp_path):
    dataset = {"folder_path": str(tmp_path), "control_dropout_rate": 0.2, "changed_region_loss": True}
    problems = _problems(dataset)
    assert any("datasets[0].control_dropout_rate: the dataset has no control_path" in p for p in problems)
    assert any("datasets[0].changed_region_loss: the dataset has no control_path" in p for p in problems)
    dataset.update(control_path=str(tmp_path / "c"), mask_path=str(tmp_path / "m"))
    assert [p for p in _problems(dataset) if "changed_region_loss: cannot be combined with mask_path" in p]
    # qwen-image-finetune's spelling: named as ours (aliases are hints here, as for every key of other trainers)
    alias = {"folder_path": str(tmp_path), "control_path": str(tmp_path / "c"), "prompt_image_dropout_rate": 0.25}
    assert [p for p in _problems(alias) if "prompt_image_dropout_rate: unknown key; did you mean "
            "'control_dropout_rate'" in p]


# -- changed-region loss weights -----------------------------------------------------------------------------------
def test_changed_region_weights_follow_the_edit():
    control = torch.zeros(3, 32, 32)
    target = control.clone()
    target[:, 4:12, 4:12] = 1.0
    sharp = changed_region_weights(target, control, blur_px=0, floor=0.1)
    assert sharp.shape == (1, 32, 32) and torch.isclose(sharp.mean(), torch.tensor(1.0))
    assert torch.allclose(sharp[0, 20:, 20:] * 10, sharp[0, 5, 5].expand(12, 12))  # floor 0.1 of the changed weight
    blurred = changed_region_weights(target, control, blur_px=2, floor=0.1)
    assert blurred[0, 13, 8] > sharp[0, 13, 8]  # just outside the edit: the blur lets its border count
    assert torch.equal(changed_region_weights(control, control, 4, 0.0), torch.ones(1, 32, 32))
    assert torch.allclose(gaussian_blur(torch.ones(1, 5, 5), 1.5), torch.ones(1, 5, 5))


def test_dataset_weights_follow_crop_and_flip_and_are_cached_with_the_latents(tmp_path):
    pair = edit_pair(tmp_path)
    cfg = dataset_cfg(changed_region_loss=True, changed_region_blur=0, flip_x=True, cache_latents=True)
    dataset = PairedDataset([pair], [cfg], None, seed=0)
    plain, mirrored = dataset[0]["mask"], dataset[1]["mask"]
    assert plain.shape == (1, 64, 64) and plain[0, 10, 10] > plain[0, 40, 40]
    assert torch.equal(mirrored, plain.flip(-1))
    assert dataset.batch_keys[0][2:] == (("mask",),)  # weighted items never share a batch with unweighted ones
    encoded = []
    fake = Encoder("fake-vae", lambda items: [encoded.append(1) or {"target_latents": torch.zeros(16, 8, 8),
                                                                    "control_latents": torch.zeros(16, 8, 8)}
                                              for _ in items])
    dataset.attach_cache(cache_dataset(dataset, [cfg], latents=fake, text=None, rt=FakeRank(0, 1), batch_size=4))
    cached = dataset[1]
    assert "target" not in cached and torch.equal(cached["mask"], mirrored) and len(encoded) == 2


def test_the_loss_counts_the_changed_region_more(tmp_path):
    """The same prediction error weighs more inside the edit than outside once the weights are on."""
    weights = changed_region_weights(*(lambda c: (c + torch.nn.functional.pad(torch.ones(3, 8, 8), (0, 8, 0, 8)), c))(
        torch.zeros(3, 16, 16)), blur_px=0, floor=0.1)
    model = SimpleNamespace(device=torch.device("cpu"))
    encoded = SimpleNamespace(target_hw=(2, 2), x0=torch.zeros(1, 1, 64))
    mask = FluxKontext.loss_weights(model, weights[None], encoded)  # (1, 1, 64): one packed token, 4 positions
    target = torch.zeros(1, 1, 64)
    error_inside, error_outside = target.clone(), target.clone()
    error_inside[..., 0::4] = 1.0  # 2x2 position 0 of every channel: the top-left latent, inside the edit
    error_outside[..., 3::4] = 1.0  # position 3: the bottom-right latent, unchanged
    one = torch.ones(1)
    assert flow_matching_loss(error_inside, target, one) == flow_matching_loss(error_outside, target, one)
    inside = flow_matching_loss(error_inside, target, one, element_weights=mask)
    outside = flow_matching_loss(error_outside, target, one, element_weights=mask)
    assert inside > 5 * outside


def test_architectures_that_cannot_are_refused_before_any_model_loads(tmp_path, no_model_load, capsys):
    """The first Qwen-Image-Edit's prompt always holds one image, and Qwen takes no loss weights: both are named."""
    import run
    from tests.helpers import merge, tiny_config_dict, write_config

    cfg = merge(tiny_config_dict(tmp_path / "out", tmp_path, tmp_path), {"model.arch": "qwen_image_edit"})
    cfg["config"]["process"][0]["datasets"][0].update(control_dropout_rate=0.2, changed_region_loss=True)
    assert run.main([str(write_config(tmp_path / "c.yaml", cfg))]) != 0
    err = capsys.readouterr().err
    assert "datasets[].control_dropout_rate: model.arch qwen_image_edit cannot train a batch without" in err
    assert "datasets[].changed_region_loss: model.arch qwen_image_edit cannot train with loss masks" in err


def test_a_dropped_batch_gives_qwen_edit_plus_no_reference_tokens(tiny_qwen_dir):
    from tests.qwen_helpers import batch_of, control_image, load_qwen

    model = load_qwen(tiny_qwen_dir, match_target_res=True)  # references at 64x64, not ~1024x1024
    target, control = control_image(64, 64, 0), control_image(64, 64, 1)
    paired = model.encode_batch(batch_of([target], [[control]], ["make it red"]))
    dropped = model.encode_batch(batch_of([target], [[]], ["make it red"]))
    assert paired.references.shape[1] > 0 and dropped.references.shape == (1, 0, paired.references.shape[2])
    assert dropped.reference_hws == [] and torch.equal(dropped.x0, paired.x0)
    assert dropped.prompt_embeds.shape[1] < paired.prompt_embeds.shape[1]  # no "Picture 1" image tokens
    inputs = model.denoiser_inputs(dropped, dropped.x0, torch.tensor([0.5]), 1.0)
    assert inputs["img_shapes"] == [[(1, 4, 4)]]
    with torch.no_grad():
        assert model.denoiser()(**inputs).shape == dropped.x0.shape
