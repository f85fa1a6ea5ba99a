"""Latent and text-embedding caches: keys, damaged files, rank sharing, reuse across runs, rebuild on change."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image, ImageOps

from extensions.flux_kontext import FluxKontext
from jobs import get_job
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.data.cache import Encoder, Job, TensorStore, fill, module_fingerprint
from toolkit.config import load_job_config
from toolkit.data import dataset as dataset_module
from toolkit.data.dataset import PairedDataset, collate_batch
from toolkit.dist import Runtime
from toolkit.errors import ConfigError


# -- the store and the fill protocol ---------------------------------------------------------------------------
def test_store_round_trip_and_damaged_files_count_as_missing(tmp_path):
    store = TensorStore(tmp_path / "c")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    store.put("k", tensors)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["k.safetensors"]  # no temporary file left behind
    got = store.get("k")
    assert got.keys() == tensors.keys() and all(torch.equal(got[n], tensors[n]) for n in tensors)

    path, data = store.path("k"), store.path("k").read_bytes()
    damaged = {"truncated": data[:-7], "empty": b"", "flipped": data[:-1] + bytes([data[-1] ^ 1])}
    for name, content in damaged.items():
        path.write_bytes(content)
        assert store.get("k") is None, name
        assert not path.exists(), f"{name} file not removed"
    path.write_bytes(data)
    shutil.copy(path, store.path("other"))  # a file that says it is another entry
    assert store.get("other") is None and store.get("k") is not None

    memory = TensorStore(keep_in_memory=True)
    memory.put("k", tensors)
    assert torch.equal(memory.get("k")["a"], tensors["a"]) and memory.get("x") is None and not memory.shared


class FakeRank:
    """A rank of a simulated group: my_share as toolkit.dist.Runtime; wait() runs `at_barrier` (the other ranks)."""

    def __init__(self, rank: int, world: int, at_barrier=lambda: None):
        self.rank, self.world, self.at_barrier = rank, world, at_barrier

    def my_share(self, count):
        return list(range(self.rank, count, self.world))

    def wait(self):
        self.at_barrier()

    def gather(self, items):
        return list(items)


def _jobs(store, encoded: list, keys=("k0", "k1", "k2", "k3", "k4")):
    encoder = Encoder("fake", lambda xs: [encoded.append(x) or {"x": torch.tensor([float(x)])} for x in xs])
    return [Job(store, key, encoder, group=None, load=lambda i=i: i) for i, key in enumerate(keys)]


def test_ranks_encode_disjoint_shares_and_wait_for_each_other(tmp_path):
    by_rank = {0: [], 1: []}
    store = TensorStore(tmp_path / "c")
    rank1 = FakeRank(1, 2)
    reports = {}
    # Rank 1 works while rank 0 waits at the barrier: after it, rank 0 finds rank 1's files.
    rank0 = FakeRank(0, 2, at_barrier=lambda: reports.setdefault(1, fill(_jobs(store, by_rank[1]), rank1, 2)))
    reports[0] = fill(_jobs(store, by_rank[0]), rank0, 2)
    assert sorted(by_rank[0] + by_rank[1]) == [0, 1, 2, 3, 4] and not set(by_rank[0]) & set(by_rank[1])
    assert reports[0].encoded_after_wait == reports[1].encoded_after_wait == 0
    again = []
    assert fill(_jobs(store, again), FakeRank(0, 1), 2).reused == 5 and again == []


def test_a_rank_that_cannot_see_the_others_files_encodes_them_itself(tmp_path):
    encoded = []
    report = fill(_jobs(TensorStore(tmp_path / "node0"), encoded), FakeRank(0, 2), 2)
    assert report.encoded == 3 and report.encoded_after_wait == 2 and sorted(encoded) == [0, 1, 2, 3, 4]


def test_module_fingerprint_follows_weights_and_dtype():
    layer = torch.nn.Linear(4, 3)
    same = torch.nn.Linear(4, 3)
    same.load_state_dict(layer.state_dict())
    assert module_fingerprint(layer) == module_fingerprint(same)
    with torch.no_grad():
        same.weight[1, 2] += 1e-3
    assert module_fingerprint(same) != module_fingerprint(layer)
    assert module_fingerprint(layer.to(torch.bfloat16)) != module_fingerprint(same)


# -- the dataset cache through the trainer -----------------------------------------------------------------------
def _process(tmp_path, model_dir, data_dir, dataset_overrides: dict, **overrides):
    cfg = tiny_config_dict(tmp_path / "out", model_dir, data_dir)
    cfg["config"]["process"][0]["datasets"][0].update(dataset_overrides)
    return get_job(write_config(tmp_path / "cfg.yaml", merge(cfg, overrides))).processes[0]


def _setup(process):
    pairs, requests, outputs = process.preflight()
    return process.setup(Runtime(distributed=False, device="cpu"), pairs, requests, outputs)


@pytest.fixture
def counted(monkeypatch):
    """Counts images through the VAE, prompts through the text encoders and images decoded by the dataset."""
    calls = Counter()
    encode_images, encode_prompt, render = FluxKontext.encode_images, FluxKontextPipeline.encode_prompt, \
        dataset_module.render

    def count_images(self, pixels):
        calls["images"] += pixels.shape[0]
        return encode_images(self, pixels)

    def count_prompts(self, prompt=None, *args, **kwargs):
        if prompt is not None:  # the pipeline also calls it with ready prompt_embeds: no encoder runs then
            calls["prompts"] += len(prompt)
        return encode_prompt(self, prompt, *args, **kwargs)

    def count_render(*args, **kwargs):
        calls["decoded"] += 1
        return render(*args, **kwargs)

    monkeypatch.setattr(FluxKontext, "encode_images", count_images)
    monkeypatch.setattr(FluxKontextPipeline, "encode_prompt", count_prompts)
    monkeypatch.setattr(dataset_module, "render", count_render)
    return calls


def test_disk_cache_is_reused_and_rebuilt_on_change_and_text_encoders_unload(tmp_path, tiny_model_dir,
                                                                            demo_data_dir, counted):
    data = shutil.copytree(demo_data_dir, tmp_path / "data")
    cached = {"cache_latents_to_disk": True, "caption_dropout_rate": 0.3}
    process = _process(tmp_path, tiny_model_dir, data, cached, **{"train.cache_text_embeddings": True})
    ctx = _setup(process)
    # 8 pairs x (target + control); 3 distinct captions + "" (dropout) + 1 sample prompt
    assert counted == {"images": 16, "prompts": 5, "decoded": 16}
    assert ctx.model.pipe.text_encoder is None and ctx.model.pipe.text_encoder_2 is None
    folder = data / "target" / "_latent_cache"
    # the sample prompt's embedding is cached beside the captions: later runs need no text encoder for it either
    assert len(list(folder.glob("latents-*.safetensors"))) == 8 and len(list(folder.glob("text-*"))) == 5
    counted.clear()
    for _ in range(3):
        process.optimizer_step(ctx)
    request = ctx.requests[0]  # sampling still works: its prompt was encoded before the encoders left
    ctx.model.sample([request], [Image.open(request.ctrl_img).convert("RGB").resize((64, 64))])
    assert counted == {}, "cached training must not decode images nor run an encoder"

    _setup(process)  # a second run: everything reused, the sample prompt included
    assert counted == {}

    counted.clear()
    target = sorted((data / "target").glob("*.png"))[0]
    ImageOps.invert(Image.open(target).convert("RGB")).save(target)  # same size, new content
    store, key = ctx.dataset.cache.latent_entry(0)  # item 0 is pair_000, the changed one
    victim = next(p for p in sorted(folder.glob("latents-*.safetensors")) if p != store.path(key))
    victim.write_bytes(victim.read_bytes()[:100])  # a file cut short (a disk full, a copy interrupted)
    _setup(process)
    assert counted == {"images": 4, "decoded": 4}  # the changed pair and the damaged entry only
    assert len(list(folder.glob("latents-*.safetensors"))) == 8 + 1  # the changed image's old entry stays

    counted.clear()
    resized = _process(tmp_path, tiny_model_dir, data, {**cached, "resolution": [80]},
                       **{"train.cache_text_embeddings": True})
    _setup(resized)
    assert counted == {"images": 16, "decoded": 16}  # new buckets: new latents, same captions


def test_memory_cache_gives_the_latents_encoding_on_the_fly_gives(tmp_path, tiny_model_dir, demo_data_dir):
    process = _process(tmp_path, tiny_model_dir, demo_data_dir, {"cache_latents": True}, **{"sample.prompts": []})
    ctx = _setup(process)
    dataset, model = ctx.dataset, ctx.model
    assert not list((demo_data_dir / "target").glob("_latent_cache"))  # memory only
    same = [i for i, key in enumerate(dataset.bucket_keys) if key == dataset.bucket_keys[0]][:2]
    from_cache = model.encode_batch(collate_batch([dataset[i] for i in same]))
    assert "target" not in dataset[same[0]]
    dataset.attach_cache(None)
    on_the_fly = model.encode_batch(collate_batch([dataset[i] for i in same]))
    torch.testing.assert_close(from_cache.x0, on_the_fly.x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_cache.control, on_the_fly.control, rtol=1e-5, atol=1e-5)
    process.optimizer_step(ctx)


def test_item_captions_lists_every_caption_an_item_gets(tmp_path, demo_data_dir):
    from toolkit.data.pairs import discover_pairs

    process = _process(tmp_path, demo_data_dir, demo_data_dir, {"caption_dropout_rate": 0.5})
    dataset = PairedDataset(discover_pairs(process.cfg.datasets), process.cfg.datasets, "inv3rt", seed=0)
    dataset.load_pixels = lambda index: {}  # captions only
    for index in range(len(dataset)):
        seen = set()
        for epoch in range(12):
            dataset.set_epoch(epoch)
            seen.add(dataset[index]["caption"])
        assert seen == set(dataset.item_captions(index))


def _config_error(tmp_path, model_dir, data_dir, dataset_overrides, **overrides):
    cfg = tiny_config_dict(tmp_path / "out", model_dir, data_dir)
    cfg["config"]["process"][0]["datasets"][0].update(dataset_overrides)
    with pytest.raises(ConfigError) as err:
        load_job_config(write_config(tmp_path / "cfg.yaml", merge(cfg, overrides)), environ={})
    return str(err.value)


def test_cache_options_the_trainer_cannot_honour_are_config_errors(tmp_path, tiny_model_dir, demo_data_dir):
    message = _config_error(tmp_path, tiny_model_dir, demo_data_dir, {"shuffle_tokens": True},
                            **{"train.cache_text_embeddings": True})
    assert "shuffle_tokens" in message and "cache_text_embeddings" in message
    cfg = tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir)
    second = {**cfg["config"]["process"][0]["datasets"][0], "folder_path": str(tmp_path), "cache_latents": False}
    cfg["config"]["process"][0]["datasets"][0]["cache_latents"] = True
    cfg["config"]["process"][0]["datasets"].append(second)
    with pytest.raises(ConfigError, match=r"datasets\[1\].cache_latents"):
        load_job_config(write_config(tmp_path / "cfg.yaml", cfg), environ={})


def test_unwritable_cache_folder_is_reported_before_the_model_loads(tmp_path, tiny_model_dir, demo_data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    process = _process(tmp_path, tiny_model_dir, demo_data_dir,
                       {"cache_latents_to_disk": True, "cache_dir": str(blocker / "cache")})
    with pytest.raises(ConfigError, match="cache_dir"):
        process.preflight()
