"""ai-toolkit's per-dataset options: flip_x / flip_y, loss_multiplier, trigger_word, keep_tokens, token_dropout_rate."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jobs import get_job
from tests.config_helpers import load, problems_of, with_process
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.data.captions import prepare_caption
from toolkit.data.dataset import PairedDataset, collate_batch, flips
from toolkit.data.pairs import Pair


def dataset_cfg(**overrides) -> SimpleNamespace:
    values = dict(folder_path="unused", control_path="unused", caption_ext="txt", default_caption=None,
                  caption_dropout_rate=0.0, shuffle_tokens=False, resolution=[64], num_repeats=1,
                  cache_latents_to_disk=False)
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def lopsided_pair(tmp_path: Path) -> Pair:
    """64x64 target and 128x128 control, both white with a black top-left quadrant: every flip moves it."""
    def picture(side: int) -> Image.Image:
        arr = np.full((side, side, 3), 255, dtype=np.uint8)
        arr[: side // 2, : side // 2] = 0
        return Image.fromarray(arr)

    picture(64).save(tmp_path / "t.png")
    picture(128).save(tmp_path / "c.png")
    return Pair(tmp_path / "t.png", tmp_path / "c.png", "red, green, blue", (64, 64), (128, 128))


# -- flips ------------------------------------------------------------------------------------------------------
def test_flips_add_copies_as_ai_toolkit_does() -> None:
    assert flips(False, False) == [(False, False)]
    assert flips(True, False) == [(False, False), (True, False)]
    assert flips(False, True) == [(False, False), (False, True)]
    assert flips(True, True) == [(False, False), (True, False), (False, True), (True, True)]


def test_flipped_items_mirror_target_and_control_together(lopsided_pair: Pair) -> None:
    dataset = PairedDataset([lopsided_pair], [dataset_cfg(flip_x=True, flip_y=True, num_repeats=2)], None, seed=0)
    assert len(dataset) == 8  # 4 mirrorings x 2 repeats
    by_flip = {dataset.items[i].flip: dataset[i] for i in range(len(dataset))}
    plain = by_flip[(False, False)]
    for (fx, fy), item in by_flip.items():
        dims = [d for d, on in ((2, fx), (1, fy)) if on]  # tensors are [3, H, W]
        for name in ("target", "control"):
            expected = plain[name].flip(dims) if dims else plain[name]
            assert torch.equal(item[name], expected), (fx, fy, name)
    assert plain["target"][:, 0, 0].max() < 0 and by_flip[(True, True)]["target"][:, -1, -1].max() < 0


def test_flipped_items_have_their_own_latent_cache_key(lopsided_pair: Pair) -> None:
    """The latent cache keys items by image_sources: a mirrored item must never reuse the unmirrored latents, and
    unmirrored items keep the keys they had before flips existed."""
    plain = PairedDataset([lopsided_pair], [dataset_cfg()], None, seed=0)
    flipped = PairedDataset([lopsided_pair], [dataset_cfg(flip_x=True)], None, seed=0)
    assert "flip" not in plain.image_sources(0) and flipped.image_sources(0) == plain.image_sources(0)
    assert flipped.image_sources(1)["flip"] == (True, False)
    assert flipped.image_sources(1) != flipped.image_sources(0)


def test_cached_flipped_run_encodes_each_mirroring(tmp_path, tiny_model_dir, demo_data_dir) -> None:
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir), {"train.steps": 1})
    cfg["config"]["process"][0]["datasets"][0].update(flip_x=True, cache_latents=True)
    job = get_job(write_config(tmp_path / "cfg.yaml", cfg))
    process = job.processes[0]
    from toolkit.data.cache import cache_dataset
    from toolkit.data.pairs import discover_pairs
    from toolkit.dist import Runtime
    from extensions.flux_kontext import FluxKontext

    dataset = PairedDataset(discover_pairs(process.cfg.datasets), process.cfg.datasets, None, seed=0)
    model = FluxKontext.load(process.cfg.model, torch.device("cpu"), torch.float32)
    rt = Runtime(distributed=False, device="cpu")
    try:
        cache = cache_dataset(dataset, process.cfg.datasets, rt=rt, batch_size=2, latents=model.latent_encoder(),
                              text=None)
    finally:
        rt.end()
    index = {dataset.items[i].flip: i for i in range(len(dataset)) if dataset.items[i].pair_index == 0}
    plain, mirrored = (cache.tensors(index[f], "")["target_latents"] for f in [(False, False), (True, False)])
    assert not torch.equal(mirrored, plain)
    dataset.attach_cache(None)
    pixels = dataset[index[(True, False)]]["target"]
    assert torch.allclose(mirrored, model.encode_images(pixels[None])[0], atol=1e-5)


# -- loss_multiplier ----------------------------------------------------------------------------------------------
def test_items_carry_their_dataset_loss_multiplier(lopsided_pair: Pair, tmp_path: Path) -> None:
    other = Pair(lopsided_pair.target, lopsided_pair.control, "x", (64, 64), (128, 128), dataset_index=1)
    dataset = PairedDataset([lopsided_pair, other], [dataset_cfg(), dataset_cfg(loss_multiplier=0.25)], None, 0)
    batch = collate_batch([dataset[0], dataset[1]])
    assert batch["loss_multiplier"].tolist() == [1.0, 0.25]


def test_loss_multiplier_zero_trains_nothing(tmp_path, tiny_model_dir, demo_data_dir) -> None:
    """compute_loss multiplies each item's loss by its dataset's loss_multiplier: at 0 the LoRA never moves."""
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir), {"train.steps": 2})
    cfg["config"]["process"][0]["datasets"][0]["loss_multiplier"] = 0.0
    final = get_job(write_config(tmp_path / "cfg.yaml", cfg)).run()[0]
    lora_b = [v for k, v in load_file(str(final)).items() if ".lora_B." in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)


# -- captions -------------------------------------------------------------------------------------------------
def test_token_dropout_keeps_the_first_parts_and_the_trigger_word() -> None:
    caption = "a, b, c, d, e, f, g, h"
    assert prepare_caption(caption, "ohwx", False, 0.0, random.Random(0), token_dropout_rate=1.0,
                           keep_tokens=2) == "ohwx, a, b"
    seen = {prepare_caption(caption, None, False, 0.0, random.Random(s), token_dropout_rate=0.5) for s in range(50)}
    assert len(seen) > 10 and all(set(c.split(", ")) - {""} <= set(caption.split(", ")) for c in seen)
    assert prepare_caption(caption, None, False, 0.0, random.Random(0), token_dropout_rate=0.0) == caption


def test_dataset_trigger_word_and_token_dropout_reach_items(lopsided_pair: Pair) -> None:
    cfg = dataset_cfg(trigger_word="sks", token_dropout_rate=1.0, keep_tokens=1)
    dataset = PairedDataset([lopsided_pair], [cfg], trigger_word="ohwx", seed=0)
    assert dataset[0]["caption"] == "sks, red"
    assert PairedDataset([lopsided_pair], [dataset_cfg()], "ohwx", 0)[0]["caption"] == "ohwx, red, green, blue"
    with pytest.raises(ValueError, match="token_dropout_rate"):
        dataset.item_captions(0)


# -- config -------------------------------------------------------------------------------------------------------
def test_ai_toolkit_dataset_keys_load(tmp_path: Path) -> None:
    keys = {"flip_x": True, "flip_y": True, "loss_multiplier": 0.5, "trigger_word": "sks", "keep_tokens": 1,
            "token_dropout_rate": 0.1, "network_weight": -1.0, "mask_path": "/m", "mask_min_value": 0.1,
            "invert_mask": True}
    data = with_process(datasets=[{"folder_path": "/t", "control_path": "/c", **keys}])
    dataset = load(tmp_path, data).config.process[0].datasets[0]
    assert {k: getattr(dataset, k) for k in keys} == keys


def test_token_dropout_with_cached_text_embeddings_is_refused(tmp_path: Path) -> None:
    data = with_process(datasets=[{"folder_path": "/t", "control_path": "/c", "token_dropout_rate": 0.1}],
                        train={"cache_text_embeddings": True})
    (problem,) = problems_of(tmp_path, data)
    assert "datasets[0].token_dropout_rate: cannot be combined with train.cache_text_embeddings" in problem


# -- network_weight -------------------------------------------------------------------------------------------------
def test_network_weight_separates_batches_and_reaches_items(lopsided_pair: Pair) -> None:
    other = Pair(lopsided_pair.target, lopsided_pair.control, "x", (64, 64), (128, 128), dataset_index=1)
    plain = PairedDataset([lopsided_pair, other], [dataset_cfg(), dataset_cfg()], None, 0)
    assert plain.batch_keys == plain.bucket_keys  # unchanged sampler groups (and resume states) without the key
    dataset = PairedDataset([lopsided_pair, other], [dataset_cfg(), dataset_cfg(network_weight=-0.5)], None, 0)
    assert dataset.batch_keys == [(64, 64), (64, 64, ("network_weight", -0.5))]
    assert dataset[1]["network_weight"].item() == -0.5 and dataset[0]["network_weight"].item() == 1.0


def test_adapter_strength_scales_the_lora_output_and_restores_it_exactly() -> None:
    from peft import LoraConfig, get_peft_model

    from toolkit.adapters.strength import adapter_strength, batch_strength

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, lora_alpha=2,
                                                                                  target_modules=["0"]))
    torch.nn.init.normal_(model.base_model.model[0].lora_B["default"].weight)
    x = torch.randn(3, 4)
    with model.disable_adapter():
        base = model(x)
    full = model(x)
    with adapter_strength(model, -0.3):
        scaled = model(x)
    assert torch.allclose(scaled - base, -0.3 * (full - base), atol=1e-6)
    assert model.base_model.model[0].scaling["default"] == 1.0 and torch.equal(model(x), full)
    assert batch_strength(torch.tensor([0.3, 0.3])) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="mixes network_weight"):
        batch_strength(torch.tensor([0.3, 1.0]))


def test_network_weight_trains_at_that_strength(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch) -> None:
    """The training step runs the denoiser, and its backward, with the LoRA scaled by the dataset's network_weight."""
    from peft.tuners.lora.layer import LoraLayer

    seen = []
    original = LoraLayer.scale_layer

    def spy(self, scale):
        seen.append(scale)
        return original(self, scale)

    monkeypatch.setattr(LoraLayer, "scale_layer", spy)
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir), {"train.steps": 1})
    cfg["config"]["process"][0]["datasets"][0]["network_weight"] = 0.5
    get_job(write_config(tmp_path / "cfg.yaml", cfg)).run()
    assert seen and set(seen) == {0.5}


def test_network_weight_with_a_full_finetune_is_refused(tmp_path: Path) -> None:
    data = with_process(datasets=[{"folder_path": "/t", "control_path": "/c", "network_weight": 2.0}], network=None)
    (problem,) = problems_of(tmp_path, data)
    assert "datasets[0].network_weight: is the LoRA's strength" in problem


# -- control_path_1..3 (ai-toolkit's UI) ----------------------------------------------------------------------------
def test_control_path_n_trains_with_every_control(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """ai-toolkit's UI writes control_path_1/_2: they become our control_path list and every step sees both."""
    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
    from tools.demo_data import build_demo_dataset

    data = build_demo_dataset(tmp_path / "data", num_pairs=2, seed=0, num_controls=2)
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, data), {"train.steps": 1})
    dataset = cfg["config"]["process"][0]["datasets"][0]
    del dataset["control_path"]
    dataset.update(control_path_1=str(data / "control"), control_path_2=str(data / "control_2"))
    batches = []
    original = BaseSDTrainProcess.compute_loss
    monkeypatch.setattr(BaseSDTrainProcess, "compute_loss",
                        lambda self, run, batch: batches.append(sorted(batch)) or original(self, run, batch))
    job = get_job(write_config(tmp_path / "cfg.yaml", cfg))
    assert job.processes[0].cfg.datasets[0].control_path == [str(data / "control"), str(data / "control_2")]
    job.run()
    assert batches and all({"control", "control_2"} <= set(keys) for keys in batches)


def test_generated_controls_stay_refused_with_the_way_out(tmp_path: Path) -> None:
    data = with_process(datasets=[{"folder_path": "/t", "control_path": "/c", "controls": ["depth"]}])
    (problem,) = problems_of(tmp_path, data)
    assert "datasets[0].controls" in problem and "list their folder in control_path" in problem


# -- mask_path ------------------------------------------------------------------------------------------------------
def _save_mask(path: Path, side: int) -> None:
    """White with a black top-left quadrant, like lopsided_pair's pictures."""
    arr = np.full((side, side), 255, dtype=np.uint8)
    arr[: side // 2, : side // 2] = 0
    Image.fromarray(arr, mode="L").save(path)


def test_masks_follow_their_target_through_crop_and_flip(lopsided_pair: Pair, tmp_path: Path) -> None:
    _save_mask(tmp_path / "mask.png", 256)
    pair = Pair(lopsided_pair.target, lopsided_pair.control, "x", (64, 64), (128, 128), mask=tmp_path / "mask.png",
                mask_size=(256, 256))
    dataset = PairedDataset([pair], [dataset_cfg(flip_x=True, mask_min_value=0.2)], None, 0)
    for index in range(len(dataset)):
        item = dataset[index]
        mask, target = item["mask"][0], item["target"][0]
        assert mask.shape == target.shape and mask.min() >= 0.2 - 1e-6 and mask.max() <= 1.0 + 1e-6
        dark = target < 0  # the target's black quadrant, wherever the flip put it
        assert mask[dark].mean() < 0.22 and mask[~dark].mean() > 0.98  # edges blur a little in the resize
    assert dataset.batch_keys[0] == (64, 64, ("mask",))
    inverted = PairedDataset([pair], [dataset_cfg(invert_mask=True)], None, 0)[0]["mask"][0]
    assert inverted[0, 0] > 0.95 and inverted[-1, -1] < 0.05


def test_missing_mask_is_named_before_any_model_loads(tmp_path: Path, demo_data_dir: Path) -> None:
    from toolkit.data.pairs import discover_pairs
    from toolkit.errors import DatasetError

    masks = tmp_path / "masks"
    masks.mkdir()
    targets = sorted((demo_data_dir / "target").glob("*.png"))
    for target in targets[1:]:
        _save_mask(masks / target.name, 32)
    cfg = dataset_cfg(folder_path=str(demo_data_dir / "target"), control_path=str(demo_data_dir / "control"),
                      mask_path=str(masks), default_caption="x")
    with pytest.raises(DatasetError, match=f"{targets[0].name}: no mask image named '{targets[0].stem}"):
        discover_pairs([cfg])
    _save_mask(masks / targets[0].name, 32)
    assert all(p.mask is not None for p in discover_pairs([cfg]))


def test_kontext_packs_the_mask_like_the_latents() -> None:
    from extensions.flux_kontext.model import FluxKontext
    from extensions.flux_kontext.packing import pack_latents

    torch.manual_seed(0)
    grid = torch.rand(2, 1, 4, 6)  # latent-grid mask
    pixels = grid.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    encoded = SimpleNamespace(target_hw=(4, 6), x0=torch.zeros(2, 6, 64))
    weights = FluxKontext.loss_weights(SimpleNamespace(device=torch.device("cpu")), pixels, encoded)
    expected = pack_latents(grid.expand(2, 16, 4, 6).contiguous()) / grid.mean()
    assert weights.shape == (2, 6, 64) and torch.allclose(weights, expected)
    assert FluxKontext.supports_loss_masks()


def test_black_mask_with_min_zero_trains_nothing(tmp_path, tiny_model_dir, demo_data_dir) -> None:
    """The mask weighs the loss per latent in compute_loss: an all-black mask at mask_min_value 0 zeroes it."""
    masks = tmp_path / "masks"
    masks.mkdir()
    for target in (demo_data_dir / "target").glob("*.png"):
        Image.new("L", Image.open(target).size, 0).save(masks / target.name)
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir), {"train.steps": 2})
    cfg["config"]["process"][0]["datasets"][0].update(mask_path=str(masks), mask_min_value=0.0)
    final = get_job(write_config(tmp_path / "cfg.yaml", cfg)).run()[0]
    lora_b = [v for k, v in load_file(str(final)).items() if ".lora_B." in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)


def test_token_dropout_rate_survives_the_resolved_config(tmp_path: Path) -> None:
    """The run folder's config.yaml redacts secrets by key name; token_dropout_rate is a number, not a token."""
    from toolkit.config import load_job_config, write_resolved_config

    job = load(tmp_path, with_process(datasets=[{"folder_path": "/t", "control_path": "/c", "token_dropout_rate": 0.2,
                                                 "keep_tokens": 1}]))
    out = tmp_path / "run" / "config.yaml"
    write_resolved_config(job, out)
    assert load_job_config(out, environ={}) == job
