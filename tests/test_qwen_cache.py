"""Latent and prompt caching for Qwen-Image-Edit-Plus: a cached run trains exactly as an uncached one, and a prompt
entry belongs to its caption AND its control images (Qwen2.5-VL sees them), so changing a control image re-encodes
that item's prompts and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

import run
from jobs import get_job
from tests.example_configs import scalars
from tests.helpers import write_config
from tests.test_qwen_train import NAME, example
from toolkit.data.dataset import collate_batch
from toolkit.dist import Runtime
from tools.demo_data import build_demo_dataset

@pytest.fixture(scope="module")
def multi_data_dir(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("data") / "demo_multi", num_pairs=4, num_controls=2)


CACHED = {"cache_latents_to_disk": True, "cache_latents": True}


def with_dataset(config, **options):
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["config"]["process"][0]["datasets"][0].update(options)
    return write_config(config, raw)


def test_cached_run_has_the_losses_of_an_uncached_run(tmp_path, tiny_qwen_dir, multi_data_dir):
    losses = {}
    for name, options, text in (("plain", {}, False), ("cached", CACHED, True)):
        config = with_dataset(example(tmp_path / name, tiny_qwen_dir, multi_data_dir, **{
            "train.steps": 2, "save.save_every": 1000, "sample.prompts": [], "train.cache_text_embeddings": text}),
            **options, cache_dir=str(tmp_path / name / "cache"))
        assert run.main([str(config)]) == 0
        losses[name] = scalars(tmp_path / name / "output" / NAME / "logs", "train/loss")
    assert sorted(losses["cached"]) == [1, 2]
    np.testing.assert_allclose([losses["cached"][s] for s in (1, 2)], [losses["plain"][s] for s in (1, 2)],
                               rtol=1e-5)
    files = sorted(p.name.split("-")[0] for p in (tmp_path / "cached" / "cache").iterdir())
    assert files.count("latents") == 4 and files.count("text") == 8  # 4 pairs x (caption, "" of the dropout)


def _setup(config):
    process = get_job(config).processes[0]
    pairs, requests, outputs = process.preflight()
    return process.setup(Runtime(distributed=False, device="cpu"), pairs, requests, outputs)


def test_a_changed_control_image_gets_new_prompt_entries(tmp_path, tiny_qwen_dir, multi_data_dir):
    import shutil

    data = shutil.copytree(multi_data_dir, tmp_path / "data")
    config = with_dataset(example(tmp_path, tiny_qwen_dir, data, **{
        "sample.prompts": [], "train.cache_text_embeddings": True}), **CACHED)
    ctx = _setup(config)
    assert ctx.model.pipe.text_encoder is None  # nothing else asks for it: freed
    dataset = ctx.dataset
    keys = {(i, c): dataset.cache.text_entry(i, c)[1] for i in range(len(dataset)) for c in dataset.item_captions(i)}
    assert len(set(keys.values())) == len(keys)  # one entry per item and caption, even for the shared ""
    # Prompts of different lengths in one batch: padded, the mask marks the real tokens.
    first, second = [i for i, key in enumerate(dataset.bucket_keys) if key == dataset.bucket_keys[0]][:2]
    long_caption, empty = dataset.item_captions(first)
    rows = [{**dataset.cache.tensors(i, c), "caption": c, "index": i, "path": ""}
            for i, c in ((first, long_caption), (second, empty))]
    lengths = [r["prompt_mask"].shape[0] for r in rows]
    assert lengths[0] > lengths[1]
    encoded = ctx.model.encode_batch(collate_batch(rows))
    assert encoded.prompt_embeds.shape[1] == lengths[0] and encoded.prompt_mask.sum(1).tolist() == lengths
    assert not encoded.prompt_embeds[1, lengths[1]:].any()
    torch.testing.assert_close(encoded.prompt_embeds[1, :lengths[1]], rows[1]["prompt_embeds"])

    changed = dataset.pairs[dataset.items[0].pair_index].controls[1]  # item 0's second control image
    ImageOps.invert(Image.open(changed).convert("RGB")).save(changed)  # same size, new content
    ctx2 = _setup(config)
    keys2 = {(i, c): ctx2.dataset.cache.text_entry(i, c)[1] for i, c in keys}
    assert {k for k in keys if keys[k] != keys2[k]} == {(0, c) for c in dataset.item_captions(0)}
    latent_keys = [[c.latent_entry(i)[1] for i in range(len(dataset))] for c in (dataset.cache, ctx2.dataset.cache)]
    assert [a != b for a, b in zip(*latent_keys)] == [True] + [False] * (len(dataset) - 1)


def test_control_dropout_with_cached_prompts_is_refused_before_loading(tmp_path, tiny_qwen_dir, multi_data_dir,
                                                                      monkeypatch, capsys):
    """A dropped batch trains on the prompt without its pictures, but a cached prompt entry holds them."""
    from extensions.qwen_image_edit import QwenImageEditPlus

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the run should have stopped before that")

    monkeypatch.setattr(QwenImageEditPlus, "load", classmethod(refuse))
    config = with_dataset(example(tmp_path, tiny_qwen_dir, multi_data_dir, **{"train.cache_text_embeddings": True}),
                          control_dropout_rate=0.2)
    assert run.main([str(config)]) == 2
    assert "control_dropout_rate: cached prompts hold their control images" in capsys.readouterr().err
