"""Several control images per target, without a model: config, pair discovery, items, position ids, prompt flags."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from extensions.flux_kontext import packing
from toolkit.config.loader import load_job_dict
from toolkit.data.dataset import PairedDataset, collate_batch, control_key, control_names
from toolkit.data.pairs import discover_pairs
from tools.demo_data import build_demo_dataset
from toolkit.errors import ConfigError, DatasetError
from toolkit.render.sampling import build_requests, parse_prompt_flags

MINIMAL = {"config": {"name": "run", "process": [{
    "device": "cpu",
    "datasets": [{"folder_path": "/data/targets", "control_path": ["/data/c1", "/data/c2"]}],
    "model": {"name_or_path": "/models/tiny", "arch": "flux_kontext"}}]}}


@pytest.fixture(scope="module")
def multi_data(tmp_path_factory) -> Path:
    """The demo dataset with control/ and control_2/ (read-only; copy to change)."""
    return build_demo_dataset(tmp_path_factory.mktemp("multi") / "demo", num_pairs=4, seed=0, num_controls=2)


def dataset_cfg(data: Path, controls, **overrides) -> SimpleNamespace:
    values = dict(folder_path=str(data / "target"), control_path=controls, caption_ext="txt", default_caption=None,
                  caption_dropout_rate=0.0, shuffle_tokens=False, resolution=[64], num_repeats=1,
                  cache_latents_to_disk=False)
    return SimpleNamespace(**{**values, **overrides})


def two_controls(data: Path) -> list[str]:
    return [str(data / "control"), str(data / "control_2")]


def problems_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_job_dict(raw, "test.yaml")
    return str(info.value)


# -- config --------------------------------------------------------------------------------------------------------
def test_control_path_takes_one_folder_or_a_list():
    job = load_job_dict(copy.deepcopy(MINIMAL), "test.yaml")
    assert job.config.process[0].datasets[0].control_path == ["/data/c1", "/data/c2"]
    single = copy.deepcopy(MINIMAL)
    single["config"]["process"][0]["datasets"][0]["control_path"] = "~/c1"
    path = load_job_dict(single, "test.yaml").config.process[0].datasets[0].control_path
    assert isinstance(path, str) and not path.startswith("~")  # one folder stays a string (same config hash)


@pytest.mark.parametrize("controls, expected", [
    (["/data/c1", "/data/c1"], "datasets[0].control_path[1]: '/data/c1' is already control_path[0]"),
    (["/data/c1", "/data/targets"], "datasets[0].control_path[1]: must differ from folder_path"),
    (["/data/c1", " "], "datasets[0].control_path: must be a non-empty folder or list"),
    ([], "datasets[0].control_path: must be a non-empty folder or list"),
    (["/data/c1", 3], "datasets[0].control_path[1]: expected a string"),
])
def test_bad_control_lists_name_the_key(controls, expected):
    raw = copy.deepcopy(MINIMAL)
    raw["config"]["process"][0]["datasets"][0]["control_path"] = controls
    assert expected in problems_of(raw)


def test_held_out_pairs_need_the_same_control_count():
    raw = copy.deepcopy(MINIMAL)
    datasets = raw["config"]["process"][0]["datasets"]
    datasets.append({"folder_path": "/data/other", "control_path": "/data/c3"})  # other counts may mix: own batches
    datasets[0].update(val_folder_path="/data/val", val_control_path="/data/val_c")
    text = problems_of(raw)
    assert "another dataset has" not in text
    assert "datasets[0].val_control_path: has 1 folder(s) but control_path has 2" in text


# -- discovery -----------------------------------------------------------------------------------------------------
def test_pairs_get_one_control_per_folder_in_order(multi_data):
    pairs = discover_pairs([dataset_cfg(multi_data, two_controls(multi_data))])
    assert len(pairs) == 4
    for pair in pairs:
        assert [p.parent.name for p in pair.controls] == ["control", "control_2"]
        assert all(p.stem == pair.target.stem for p in pair.controls)
        assert pair.control_sizes == (pair.target_size, pair.target_size)
    one = discover_pairs([dataset_cfg(multi_data, str(multi_data / "control"))])
    assert [p.controls for p in one] == [(p.control,) for p in pairs] and one[0].extra_controls == ()


def test_every_control_folder_is_checked_and_errors_name_the_file(multi_data, tmp_path):
    data = tmp_path / "data"
    for sub in ("target", "control", "control_2"):
        (data / sub).mkdir(parents=True)
        for path in (multi_data / sub).iterdir():
            (data / sub / path.name).write_bytes(path.read_bytes())
    (data / "control_2" / "pair_001.png").unlink()  # a target without its second control
    Image.new("RGB", (64, 64)).save(data / "control_2" / "stray.png")  # a second control without a target
    (data / "control_2" / "pair_002.png").write_bytes(b"not a png")  # a broken second control
    with pytest.raises(DatasetError) as info:
        discover_pairs([dataset_cfg(data, two_controls(data) + [str(data / "nope")])])
    text = str(info.value)
    assert f"{data / 'target' / 'pair_001.png'}: no control image named 'pair_001.*' in {data / 'control_2'}" in text
    assert f"{data / 'control_2' / 'stray.png'}: control image has no target" in text
    assert f"{data / 'control_2' / 'pair_002.png'}" in text
    assert f"{data / 'nope'}: folder does not exist (config.process[0].datasets[0].control_path[2])" in text
    assert "control_2' / 'pair_000" not in text and f"{data / 'control' / 'pair_001.png'}" not in text


def test_items_hold_every_control_at_the_target_bucket(multi_data):
    cfgs = [dataset_cfg(multi_data, two_controls(multi_data))]
    dataset = PairedDataset(discover_pairs(cfgs), cfgs, trigger_word=None, seed=0)
    item = dataset[1]
    assert control_names(item) == ["control", "control_2"] and control_key(2) == "control_3"
    assert item["control"].shape == item["control_2"].shape == item["target"].shape
    # control_2 is control mirrored: with a centred crop box the rendered pixels mirror too (up to resampling)
    assert torch.allclose(item["control_2"], item["control"].flip(-1), atol=0.05)
    sources = dataset.image_sources(1)
    assert sources["control_2"].parent.name == "control_2" and "control_2_box" in sources
    batch = collate_batch([dataset[i] for i in range(len(dataset)) if dataset.bucket_keys[i] == dataset.bucket_keys[0]])
    assert control_names(batch) == ["control", "control_2"]
    single = [dataset_cfg(multi_data, str(multi_data / "control"))]
    single_sources = PairedDataset(discover_pairs(single), single, None, 0).image_sources(1)
    assert set(single_sources) == {"target", "control", "bucket", "target_box", "control_box", "pixels"}


# -- position ids --------------------------------------------------------------------------------------------------
def test_two_control_position_ids_have_frames_0_1_2():
    ids = packing.kontext_position_ids((6, 10), (4, 4), (2, 6))
    assert ids.shape == (15 + 4 + 3, 3)
    assert ids[:, 0].tolist() == [0.0] * 15 + [1.0] * 4 + [2.0] * 3
    assert torch.equal(ids[19:, 1:], packing.position_ids(2, 6, frame=0)[:, 1:])  # rows/cols restart per image
    # One control: exactly the pipeline's ids (target ids, then image ids with frame 1).
    single = packing.kontext_position_ids((6, 10), (4, 4))
    target = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    control = FluxKontextPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32)
    control[:, 0] = 1
    assert torch.equal(single, torch.cat([target, control])) and torch.equal(ids[:19], single)
    # No control (a dataset without control_path): the pipeline's text-to-image ids.
    assert torch.equal(packing.kontext_position_ids((6, 10)), target)


# -- sample prompts ------------------------------------------------------------------------------------------------
def test_several_ctrl_img_flags(multi_data):
    first, second = multi_data / "sample_control" / "sample_000.png", multi_data / "sample_control_2" / "sample_000.png"
    prompt = f"edit it --ctrl_img {first} --seed 3 --ctrl_img {second}"
    (request,) = build_requests([prompt], seed=0, walk_seed=False, width=64, height=64, guidance_scale=1, steps=2)
    assert request.ctrl_imgs == (first, second) and request.ctrl_img == first and request.seed == 3
    assert parse_prompt_flags(prompt) == ("edit it", {"ctrl_img": str(second), "seed": "3"})
    (one,) = build_requests([f"edit --ctrl_img {first}"], seed=0, walk_seed=False, width=64, height=64,
                            guidance_scale=1, steps=2)
    assert one.ctrl_imgs == (first,) and one.extra_ctrl_imgs == ()
    with pytest.raises(ConfigError, match=r"prompts\[0\]: --ctrl_img .*nope.png does not exist"):
        build_requests([f"x --ctrl_img {first} --ctrl_img {multi_data / 'nope.png'}"], seed=0, walk_seed=False,
                       width=64, height=64, guidance_scale=1, steps=2)


def test_generate_prompts_take_several_ctrl_img_files(multi_data):
    from jobs.process.GenerateProcess import build_items
    from toolkit.config.schema import GenerateConfig

    first, second = multi_data / "sample_control" / "sample_000.png", multi_data / "sample_control_2" / "sample_000.png"
    (item,) = build_items(GenerateConfig(prompts=[f"edit --ctrl_img {first} --ctrl_img {second}"], width=64, height=64))
    assert item.request.ctrl_imgs == (first, second)
    with pytest.raises(ConfigError, match=r"prompts\[0\]: with several --ctrl_img each must be an existing image"):
        build_items(GenerateConfig(prompts=[f"edit --ctrl_img {first.parent} --ctrl_img {second}"]))


def test_held_out_pairs_take_a_list_of_control_folders(multi_data):
    from toolkit.config.schema import DatasetConfig
    from toolkit.train.validation import ValidationSet

    cfg = DatasetConfig(folder_path="/unused", control_path=["/unused_1", "/unused_2"], resolution=[64],
                        val_folder_path=str(multi_data / "target"), val_control_path=two_controls(multi_data))
    validation = ValidationSet.from_datasets([cfg], None, 0)
    assert len(validation) == 4 and control_names(validation.dataset[0]) == ["control", "control_2"]
