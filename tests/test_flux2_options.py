"""FLUX.2 with the options every architecture offers: 8-bit base and text encoder, `generate` with several
--ctrl_img and a LoRA, EMA and the validation loss in a training run."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tests.qwen_helpers import batch_of, control_image
from tests.test_flux2_math import load_flux2
from tests.test_flux2_train import NAME, example
from toolkit.render.sampling import SampleRequest


def test_quantized_transformer_and_text_encoder_stay_frozen_and_train_a_lora(tiny_flux2_dir) -> None:
    from optimum.quanto import QLinear

    from extensions.flux2.model import QUANTIZE_EXCLUDE
    from toolkit.adapters.lora import add_lora, make_lora_config
    from tests.helpers import fixed_inputs

    klein = load_flux2(tiny_flux2_dir, quantize=True, quantize_te=True, qtype="qint8")
    quantized = {name for name, m in klein.transformer.named_modules() if isinstance(m, QLinear)}
    assert {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_qkv_mlp_proj"} <= quantized
    assert not quantized & {"x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                            "single_stream_modulation.linear"}
    assert "x_embedder" in QUANTIZE_EXCLUDE
    assert any(isinstance(m, QLinear) for m in klein.pipe.text_encoder.modules())
    # accelerate's load_state on resume re-enables requires_grad on quanto weights: the hook switches it off again
    klein.transformer.load_state_dict(klein.transformer.state_dict())
    assert not any(p.requires_grad for p in klein.transformer.parameters())

    add_lora(klein.transformer, make_lora_config(4, 4, klein.lora_targets()))
    controls = [[control_image(64, 64, 1)], [control_image(64, 64, 2)]]
    inputs, target = fixed_inputs(klein, batch_of([control_image(64, 64, 3)] * 2, controls, ["a", "b"]))
    torch.nn.functional.mse_loss(klein.denoiser()(**inputs), target).backward()
    grads = {n: p.grad for n, p in klein.transformer.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().max() > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at 0: A gets none yet


def test_run_generate_renders_base_and_lora_with_two_controls(tmp_path, tiny_flux2_dir) -> None:
    """`run.py generate --arch flux2_klein_4b` with two --ctrl_img: a LoRA changes the image, our sampler gives the
    same image with the same LoRA."""
    import run
    from toolkit.adapters.lora import add_lora, lora_state_dict, make_lora_config, save_lora

    klein = load_flux2(tiny_flux2_dir, max_sequence_length=512)  # generate's default prompt length
    config = make_lora_config(4, 8, klein.lora_targets())
    add_lora(klein.transformer, config)
    g = torch.Generator().manual_seed(1)
    for name, param in klein.transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=g) * 0.3
    lora = save_lora(tmp_path / "edit.safetensors", lora_state_dict(klein.transformer), config, "float32")
    control_image(64, 64, 1).save(tmp_path / "a.png")
    control_image(64, 64, 2).save(tmp_path / "b.png")
    prompt = f"make it blue --ctrl_img {tmp_path / 'a.png'} --ctrl_img {tmp_path / 'b.png'}"
    out = tmp_path / "out"
    assert run.main(["generate", "--arch", "flux2_klein_4b", "--model", str(tiny_flux2_dir), "--ctrl-img",
                     str(tmp_path / "a.png"), "--prompt", prompt, "--width", "64", "--height", "64", "--steps", "2",
                     "--guidance", "1", "--device", "cpu", "--out", str(out), "--lora", str(lora)]) == 0
    images = {c: np.asarray(Image.open(out / f"a_p00_{c}.png"), dtype=np.int16) for c in ("base", "edit")}
    assert np.abs(images["edit"] - images["base"]).max() > 10, "the LoRA changed nothing"
    request = SampleRequest(index=0, prompt="make it blue", ctrl_img=None, seed=42, width=64, height=64,
                            guidance_scale=1.0, steps=2)
    ours = klein.sample([request], [[control_image(64, 64, 1), control_image(64, 64, 2)]])[0]
    assert np.array_equal(np.asarray(ours, dtype=np.int16), images["edit"])


def test_ema_and_validation_loss_in_a_training_run(tmp_path, tiny_flux2_dir, flux2_data) -> None:
    import run
    from tests.example_configs import scalars
    from toolkit.train.ema import EMA_FILE

    import shutil

    held_out = tmp_path / "val"  # held-out pairs may not be training files: copies stand in
    for sub in ("target", "control", "control_2"):
        shutil.copytree(flux2_data / sub, held_out / sub)
    val = {"val_folder_path": str(held_out / "target"),
           "val_control_path": [str(held_out / "control"), str(held_out / "control_2")]}
    config = example(tmp_path, tiny_flux2_dir, flux2_data, val, **{
        "train.steps": 2, "save.save_every": 1000, "sample.prompts": [], "sample.sample_every": 2,
        "train.ema_config.use_ema": True, "train.ema_config.ema_decay": 0.5})
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "output" / NAME
    values = scalars(run_dir / "logs", "val/loss")
    assert list(values) == [0, 2] and all(np.isfinite(v) and v > 0 for v in values.values())  # baseline, final
    assert any(run_dir.rglob(EMA_FILE))


def test_low_vram_loads_the_same_quantized_transformer_block_by_block(tiny_flux2_dir) -> None:
    """model.low_vram (the [dev] multi-GPU recipe): quantized on the CPU unit by unit, the same weights as quantizing
    the loaded model."""
    whole = load_flux2(tiny_flux2_dir, quantize=True, qtype="qint8").transformer.state_dict()
    blockwise = load_flux2(tiny_flux2_dir, quantize=True, qtype="qint8", low_vram=True).transformer
    assert not any(p.requires_grad for p in blockwise.parameters())
    state = blockwise.state_dict()
    assert state.keys() == whole.keys()
    assert all(torch.equal(state[k], whole[k]) for k in whole)


def test_match_target_res_is_accepted_and_the_model_card_names_the_base() -> None:
    """ai-toolkit FLUX.2 configs often set model_kwargs.match_target_res: true, which is what FLUX.2 does here."""
    import dataclasses

    import yaml

    from extensions.flux2 import Flux2Klein9B
    from tests.test_flux2_train import EXAMPLE
    from toolkit.config import load_job_config
    from toolkit.config.schema import ModelConfig
    from toolkit.publish.model_card import RunFacts, model_card

    assert Flux2Klein9B.check_model_options(ModelConfig(name_or_path="x", arch="flux2_klein_9b",
                                                        match_target_res=True)) == []
    process = load_job_config(EXAMPLE).config.process[0]
    cfg = dataclasses.replace(process, model=dataclasses.replace(
        process.model, name_or_path="black-forest-labs/FLUX.2-klein-base-4B"))
    card = model_card(cfg, RunFacts(name="x", repo_id="me/x", weight_name="x.safetensors"))
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "black-forest-labs/FLUX.2-klein-base-4B" and meta["license"] == "apache-2.0"
    assert 'Flux2KleinPipeline.from_pretrained("black-forest-labs/FLUX.2-klein-base-4B"' in body
