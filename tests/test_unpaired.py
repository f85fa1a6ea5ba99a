"""Datasets without control_path: plain images with captions train text-to-image (zero control tokens), mixed with
paired datasets in one run but never in one batch; sample prompts without --ctrl_img render as the pipeline does."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline

from extensions.flux_kontext.packing import kontext_position_ids
from jobs import get_job
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.data.dataset import PairedDataset, collate_batch
from toolkit.data.pairs import discover_pairs
from toolkit.data.sampler import BucketBatchSampler
from toolkit.errors import DatasetError
from toolkit.render.sampling import build_requests


def plain_folder(demo_data_dir: Path, dest: Path, count: int = 4) -> Path:
    """`count` target images of the demo set with their captions, in a folder of their own (no controls)."""
    dest.mkdir(parents=True, exist_ok=True)
    for image in sorted((demo_data_dir / "target").glob("*.png"))[:count]:
        shutil.copy(image, dest / image.name)
        shutil.copy(image.with_suffix(".txt"), dest / f"{image.stem}.txt")
    return dest


def dataset_cfg(folder: Path, controls=None, **overrides) -> SimpleNamespace:
    values = dict(folder_path=str(folder), control_path=controls, caption_ext="txt", default_caption=None,
                  caption_dropout_rate=0.0, shuffle_tokens=False, resolution=[64], num_repeats=1,
                  cache_latents_to_disk=False)
    return SimpleNamespace(**{**values, **overrides})


def test_a_dataset_without_control_path_is_plain_images(demo_data_dir, tmp_path):
    plain = plain_folder(demo_data_dir, tmp_path / "plain")
    pairs = discover_pairs([dataset_cfg(plain)])
    assert len(pairs) == 4 and all(p.control is None and p.controls == () for p in pairs)
    dataset = PairedDataset(pairs, [dataset_cfg(plain)], trigger_word=None, seed=0)
    item = dataset[0]
    assert "target" in item and not any(k.startswith("control") for k in item)
    assert "control" not in dataset.image_sources(0)


def test_a_set_control_path_still_needs_every_control(demo_data_dir, tmp_path):
    data = tmp_path / "demo"
    shutil.copytree(demo_data_dir, data)
    missing = sorted((data / "control").glob("*.png"))[0]
    missing.unlink()
    with pytest.raises(DatasetError) as info:
        discover_pairs([dataset_cfg(data / "target", str(data / "control"))])
    assert f"no control image named '{missing.stem}.*' in {data / 'control'}" in str(info.value)


def test_paired_and_plain_items_never_share_a_batch(demo_data_dir, tmp_path):
    plain = plain_folder(demo_data_dir, tmp_path / "plain")
    configs = [dataset_cfg(demo_data_dir / "target", str(demo_data_dir / "control")), dataset_cfg(plain)]
    dataset = PairedDataset(discover_pairs(configs), configs, trigger_word=None, seed=0)
    sampler = BucketBatchSampler(dataset.batch_keys, batch_size=2, seed=0)
    kinds = {i: len(dataset.pairs[dataset.items[i].pair_index].controls) for i in range(len(dataset))}
    assert set(kinds.values()) == {0, 1}
    batches = sampler.batches_for_epoch(0)
    assert all(len({kinds[i] for i in batch}) == 1 for batch in batches)
    for batch in batches:
        collate_batch([dataset[i] for i in batch])  # one kind per batch: stacks


def test_prompts_without_ctrl_img_are_text_to_image(tmp_path):
    (request,) = build_requests(["a cat --seed 3"], seed=0, walk_seed=False, width=64, height=64,
                                guidance_scale=1.0, steps=2)
    assert request.ctrl_img is None and request.ctrl_imgs == ()


def test_position_ids_without_controls_are_the_target_frame():
    ids = kontext_position_ids((4, 6))
    assert ids.shape == (6, 3) and ids[:, 0].eq(0).all()  # (4, 6) latents pack 2x2 into 2x3 tokens


def test_no_control_sample_equals_the_pipeline(tiny_model_dir):
    from toolkit.config.schema import ModelConfig
    from extensions.flux_kontext.model import FluxKontext

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), arch="flux_kontext", max_sequence_length=16)
    model = FluxKontext.load(cfg, torch.device("cpu"), torch.float32)
    (request,) = build_requests(["a red square --seed 5"], seed=0, walk_seed=False, width=64, height=48,
                                guidance_scale=2.5, steps=2)
    (ours,) = model.sample([request], [[]])
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    theirs = pipe(prompt="a red square", image=None, height=48, width=64, num_inference_steps=2, guidance_scale=2.5,
                  max_area=64 * 48,  # else the pipeline renders about 1024x1024 pixels whatever height/width say
                  max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert ours.size == (64, 48)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("cached", [False, True])
def test_mixed_run_trains_plain_items_without_control_tokens(tiny_model_dir, demo_data_dir, tmp_path,
                                                            transformer_calls, cached):
    plain = plain_folder(demo_data_dir, tmp_path / "plain")
    cfg = tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir)
    paired = cfg["config"]["process"][0]["datasets"][0]
    datasets = [{**paired, "cache_latents": cached},
                {"folder_path": str(plain), "caption_ext": "txt", "caption_dropout_rate": 0.0, "resolution": [64],
                 "cache_latents": cached}]
    cfg = merge(cfg, {"datasets": datasets, "train.steps": 6, "train.batch_size": 1,
                      "sample.prompts": ["a plain picture --seed 1", cfg["config"]["process"][0]["sample"]["prompts"][0]],
                      "sample.sample_every": 6})
    final = get_job(write_config(tmp_path / "cfg.yaml", cfg)).run()[0]
    assert final.is_file()
    training = [frames for length, frames in transformer_calls if frames[0] and len(frames) <= 2][:6]
    # Every step trains either a target alone (frame 0) or a target with its control (frames 0 and 1).
    assert any(set(frames) == {0} for frames in training) and any(set(frames) == {0, 1} for frames in training)
    samples = sorted(p.name for p in (tmp_path / "out" / "tiny" / "samples").glob("*_0?.png"))
    assert samples == ["000000006_00.png", "000000006_01.png"]


def test_held_out_plain_images_validate_and_control_folders_for_them_are_refused(tiny_model_dir, demo_data_dir,
                                                                                  tmp_path):
    from toolkit.config.loader import load_job_dict
    from toolkit.errors import ConfigError
    from toolkit.train.validation import ValidationSet

    plain = plain_folder(demo_data_dir, tmp_path / "plain", count=2)
    held_out = plain_folder(demo_data_dir, tmp_path / "held_out", count=2)
    raw = tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir)
    dataset = {"folder_path": str(plain), "val_folder_path": str(held_out), "resolution": [64]}
    job = load_job_dict(merge(raw, {"datasets": [dataset]}), "cfg.yaml")
    validation = ValidationSet.from_datasets(job.config.process[0].datasets, trigger_word=None, seed=0)
    assert len(validation) == 2 and "control" not in validation.dataset[0]
    with pytest.raises(ConfigError, match=r"datasets\[0\].val_control_path: the dataset has no control_path"):
        load_job_dict(merge(raw, {"datasets": [{**dataset, "val_control_path": str(demo_data_dir / "control")}]}),
                      "cfg.yaml")
