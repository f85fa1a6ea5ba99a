"""Differential output preservation (train.diff_output_preservation): the loss gains multiplier * MSE between the
LoRA's and the base model's predictions on the class caption, with gradient only through the LoRA's; multiplier 0
trains the same LoRA as a normal run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from jobs import get_job
from tests.helpers import first_bucket_batch, merge, tiny_config_dict, write_config
from toolkit.config import ConfigProblems, load_job_config
from toolkit.dist import Runtime
from toolkit.train import flow_matching, preservation

DOP = {"train.diff_output_preservation": True, "train.diff_output_preservation_class": "picture",
       "train.diff_output_preservation_multiplier": 0.7}


def _setup(tmp_path, model_dir, data_dir, **overrides):
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir), {"network.dropout": 0.0, **overrides})
    process = get_job(write_config(tmp_path / "cfg.yaml", cfg)).processes[0]
    pairs, _, outputs = process.preflight()
    return process, process.setup(Runtime(distributed=False, device="cpu"), pairs, [], outputs)


def _by_hand(run, batch, trigger, class_word, multiplier):
    """The same draws as compute_loss; the base model made by zeroing lora_B (not by switching adapters off)."""
    model = run.model
    encoded = model.encode_batch(batch)
    x0 = model.clean_latents(encoded)
    t, weights = flow_matching.sample_timesteps("sigmoid", x0.shape[0], run.generator, x0.shape[1])
    noise = torch.randn(x0.shape, generator=run.generator)
    x_t, target = flow_matching.noisy_latents(x0, noise, t), flow_matching.flow_target(x0, noise)
    class_encoded = model.with_captions(encoded, [c.replace(trigger, class_word) for c in batch["caption"]])
    denoiser = model.denoiser()
    lora_b = [p for n, p in model.transformer.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    with torch.no_grad():
        for p in lora_b:
            p.zero_()
        base = denoiser(**model.denoiser_inputs(class_encoded, x_t, t, 1.0))
        for p, value in zip(lora_b, saved):
            p.copy_(value)
    pred = denoiser(**model.denoiser_inputs(encoded, x_t, t, 1.0))  # after the in-place edits above
    class_pred = denoiser(**model.denoiser_inputs(class_encoded, x_t, t, 1.0))
    normal = ((pred - target) ** 2).mean()
    return normal + multiplier * ((class_pred - base) ** 2).mean(), normal


def test_preservation_term_matches_a_hand_computation(tmp_path, tiny_model_dir, demo_data_dir):
    process, run = _setup(tmp_path, tiny_model_dir, demo_data_dir, **DOP)
    with torch.no_grad():  # a LoRA that changes the output: a fresh one (lora_B = 0) preserves trivially
        for name, p in run.model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    batch = first_bucket_batch(run.dataset)
    assert all("inv3rt" in c for c in batch["caption"])
    state = run.generator.get_state()
    loss = process.compute_loss(run, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in run.model.transformer.named_parameters() if p.grad is not None}
    run.optimizer.zero_grad(set_to_none=True)
    run.generator.set_state(state)
    expected, normal = _by_hand(run, batch, "inv3rt", "picture", 0.7)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > normal.item() * 1.01  # the extra term is there and not negligible
    expected.backward()  # the base prediction was made under no_grad: gradient only through the LoRA's
    assert grads.keys() == {n for n, p in run.model.transformer.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, run.model.transformer.get_parameter(name).grad, rtol=1e-4, atol=1e-7)
    assert all(p.requires_grad for p in run.params)  # switching the LoRA off for the base prediction left it trainable


def test_multiplier_zero_trains_the_same_lora_as_a_normal_run(tmp_path, tiny_model_dir, demo_data_dir):
    """With cached text embeddings too: the class captions are encoded before the text encoders are unloaded."""
    common = {"train.steps": 2, "train.cache_text_embeddings": True}
    finals = []
    for name, extra in (("plain", {}), ("dop", {**DOP, "train.diff_output_preservation_multiplier": 0.0})):
        cfg = merge(tiny_config_dict(tmp_path / name, tiny_model_dir, demo_data_dir), {**common, **extra})
        finals.append(get_job(write_config(tmp_path / f"{name}.yaml", cfg)).run()[0])
    plain, dop = (load_file(str(f)) for f in finals)
    assert plain.keys() == dop.keys()
    for key in plain:
        torch.testing.assert_close(dop[key], plain[key], rtol=1e-4, atol=1e-6)


def test_class_captions_replace_the_trigger():
    assert preservation.class_captions(["inv3rt, a cat", "no trigger"], "inv3rt", "photo") == ["photo, a cat",
                                                                                                "no trigger"]
    base = torch.zeros(2, 3)
    assert preservation.preservation_loss(torch.ones(2, 3), base, 0.5).item() == 0.5


@pytest.mark.parametrize("overrides,expected", [
    ({"trigger_word": None}, "train.diff_output_preservation: needs trigger_word"),
    ({"network": None}, "train.diff_output_preservation: needs a LoRA or LoKr network"),
])
def test_preservation_without_trigger_or_network_is_refused(tmp_path, overrides, expected):
    cfg = merge(tiny_config_dict(tmp_path / "out", tmp_path / "m", tmp_path / "d"), {**DOP, **overrides})
    with pytest.raises(ConfigProblems) as caught:
        load_job_config(write_config(tmp_path / "c.yaml", cfg), environ={})
    assert any(p.startswith(f"config.process[0].{expected}") for p in caught.value.problems), caught.value.problems
