"""LoKr (network.type lokr, peft's LoKr): trains on the tiny pipeline, saves ComfyUI's lokr keys whose kron(w1, w2)
reproduces the trained update, and loads back into the trainer (pretrained_lora, resume)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import run
from jobs import get_job
from tests.example_configs import assert_same_final_lora, example_config, resume_from_copy
from tests.test_train_tiny import _fixed_batch, _loss_on
from toolkit.adapters.network import load_pretrained, make_adapter_config
from toolkit.config import load_job_config
from toolkit.errors import UserError
from toolkit.adapters.lokr import FULL_RANK, ecosystem_metadata, make_lokr_config, to_file
from toolkit.adapters.lora import add_lora, read_lora_metadata

EXAMPLE = "train_lora_flux_kontext_lokr_tiny"
NAME = "tiny_kontext_lokr"
KEY = re.compile(r"^transformer\.(.+)\.(lokr_w1|lokr_w2|lokr_w2_a|lokr_w2_b|alpha)$")


def _lokr_layers(transformer) -> dict:
    return {name: m for name, m in transformer.named_modules() if hasattr(m, "lokr_w1") and "default" in m.r}


def comfy_delta(tensors: dict, module: str, prefix: str, shape) -> torch.Tensor:
    """ComfyUI's rule (comfy/weight_adapter/lokr.py), written out: kron(w1, w2), scaled by alpha / dim only when a
    factor is split into _a @ _b (dim = that split's rank)."""
    get = {leaf: tensors[f"{prefix}{module}.{leaf}"] for leaf in
           ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha")
           if f"{prefix}{module}.{leaf}" in tensors}
    w1 = get["lokr_w1"] if "lokr_w1" in get else get["lokr_w1_a"] @ get["lokr_w1_b"]
    w2 = get["lokr_w2"] if "lokr_w2" in get else get["lokr_w2_a"] @ get["lokr_w2_b"]
    dim = get["lokr_w2_b"].shape[0] if "lokr_w2_b" in get else (
        get["lokr_w1_b"].shape[0] if "lokr_w1_b" in get else None)
    scale = float(get["alpha"]) / dim if dim is not None else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """The shipped LoKr example, 24 steps at alpha != rank, with the trained model kept for comparison."""
    folder = tmp_path_factory.mktemp("lokr")
    config = example_config(EXAMPLE, folder, tiny_model_dir, demo_data_dir, steps=24,
                            **{"network.linear_alpha": 2, "train.lr": 1e-2})
    job = get_job(config)
    process = job.processes[0]
    captured = {}
    original_load = process.arch_cls.load

    def load_and_remember(*args, **kwargs):
        model = original_load(*args, **kwargs)
        captured["model"] = model
        captured["base"] = {k: v.clone() for k, v in model.transformer.state_dict().items()}
        return model

    batch = _fixed_batch(job)
    loss_before = _loss_on(original_load(process.cfg.model, torch.device("cpu"), torch.float32), batch)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(process.arch_cls, "load", load_and_remember)
        final = job.run()[0]
    return dict(final=final, batch=batch, loss_before=loss_before, config=config, **captured)


def test_lokr_trains_only_the_adapter_and_the_loss_falls(trained):
    model = trained["model"]
    assert _loss_on(model, trained["batch"]) < trained["loss_before"] * 0.98  # measured: 0.958
    after = model.transformer.state_dict()
    for key, before in trained["base"].items():
        name = key if key in after else key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
        assert torch.equal(before, after[name]), key
    layers = _lokr_layers(model.transformer)
    assert layers and all(m.lokr_w1["default"].abs().sum() > 0 for m in layers.values()), "w1 starts at 0"


def test_saved_file_has_comfy_lokr_keys_and_reproduces_the_update(trained):
    tensors = load_file(str(trained["final"]))
    assert tensors and all(KEY.match(k) for k in tensors), [k for k in tensors if not KEY.match(k)][:5]
    layers = _lokr_layers(trained["model"].transformer)
    assert {KEY.match(k).group(1) for k in tensors} == set(layers)
    leaves = {KEY.match(k).group(2) for k in tensors}
    assert {"lokr_w2", "lokr_w2_a"} <= leaves, "the tiny model has layers with a full and with a split w2"
    for module, layer in layers.items():
        theirs = comfy_delta(tensors, module, "transformer.", layer.get_base_layer().weight.shape)
        ours = layer.get_delta_weight("default").detach()
        assert ours.abs().max() > 0
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-7, msg=module)


def test_lokr_file_loads_back_exactly_and_mismatches_are_clear(trained, tiny_model_dir):
    process = load_job_config(trained["config"]).config.process[0]
    from extensions.flux_kontext import FluxKontext

    model = FluxKontext.load(process.model, torch.device("cpu"), torch.float32)
    config = make_adapter_config(process.network, FluxKontext.default_lora_targets)
    add_lora(model.transformer, config)
    assert load_pretrained(model.transformer, str(trained["final"]), config, None) > 0
    want = _lokr_layers(trained["model"].transformer)
    for module, layer in _lokr_layers(model.transformer).items():
        torch.testing.assert_close(layer.get_delta_weight("default"), want[module].get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-7)

    other = FluxKontext.load(process.model, torch.device("cpu"), torch.float32)
    bigger = make_lokr_config(8, 8, FluxKontext.default_lora_targets)  # rank 8: every w2 is full on this model
    add_lora(other.transformer, bigger)
    with pytest.raises(UserError, match=r"LoKr shapes of .* the file has .*lokr_w2_a \(\d+, 4\).*lokr_full_rank give"):
        load_pretrained(other.transformer, str(trained["final"]), bigger, None)


def test_full_rank_and_comfy_names(trained):
    layer = next(iter(_lokr_layers(trained["model"].transformer).values()))
    state = {f"m.{leaf}": getattr(layer, leaf)["default"].detach() for leaf in ("lokr_w1", "lokr_w2", "lokr_w2_a",
                                                                                "lokr_w2_b")
             if "default" in getattr(layer, leaf)}
    out = to_file(state, 4, 2.0, layout="comfy")
    assert all(k.startswith("lycoris_m.") for k in out)
    assert make_lokr_config(4, 4, "x", full_rank=True).r == FULL_RANK


def test_resume_from_a_pretrained_lokr_continues_the_trained_weights(trained, tmp_path, tiny_model_dir,
                                                                    demo_data_dir):
    """Start a LoKr run from the trained file, keep a state at step 2, put the run back to it and resume: the final
    file is bit-identical to the uninterrupted run (resume restored the trained weights, not the pretrained)."""
    overrides = {"network.linear_alpha": 2, "network.pretrained_lora": str(trained["final"]),
                 "save.save_every": 2, "save.max_step_saves_to_keep": 5}
    config = example_config(EXAMPLE, tmp_path / "a", tiny_model_dir, demo_data_dir, steps=4, **overrides)
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "a" / "output" / NAME
    resumed = resume_from_copy(EXAMPLE, run_dir, tmp_path / "b", tiny_model_dir, demo_data_dir, 4, 2, **overrides)
    first = assert_same_final_lora(run_dir, resumed)
    start = load_file(str(trained["final"]))
    assert any(not torch.equal(start[k], first[k]) for k in start), "4 more steps changed the weights"


def test_metadata_names_the_lycoris_module_of_the_key_layout(trained):
    """`lycoris.kohya` (sd-scripts' names, lora_unet_<original checkpoint name>) fits neither layout. LyCORIS's
    lycoris.wrapper loads `lycoris_<module>` files by matching f"lycoris_{name}" with dots as underscores over the
    transformer's named_modules (create_lycoris_from_weights): every module of a comfy-layout file must match."""
    meta = read_lora_metadata(trained["final"])  # save.format diffusers: transformer.* names
    assert "ss_network_module" not in meta and json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert ecosystem_metadata(-1, True, "comfy")["ss_network_module"] == "lycoris.wrapper"
    transformer = trained["model"].transformer
    layers = _lokr_layers(transformer)
    state = {f"{m}.{leaf}": getattr(layer, leaf)["default"].detach() for m, layer in layers.items()
             for leaf in ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b") if "default" in getattr(layer, leaf)}
    names = {f"lycoris_{name}".replace(".", "_") for name, _ in transformer.named_modules()}
    file_modules = {key.split(".")[0] for key in to_file(state, 4, 2.0, layout="comfy")}
    assert file_modules and file_modules <= names
