"""The edit metrics rise as the tiny demo learns the colour inversion (issue 19), with the block-mean VAE.

The preset "tiny" VAE has random weights: it decodes every latent to noise, so no render can look like its target
and PSNR stays flat however well the LoRA learns. `build_tiny_pipeline(vae="block_mean")` (tools.tiny_vae) keeps every
other component byte for byte and gives the VAE weights that reconstruct 8x8 block colours (about 20 dB), so the
held-out renders can approach their targets.
"""

from __future__ import annotations

import pytest
import torch

from jobs import get_job
from tests.helpers import merge, tiny_config_dict, write_config

# The random base transformer has to learn denoising itself, through a 32-wide embedder of 64-channel tokens, so the
# LoRA (rank 16) also wraps the image embedder and the output projection, which the default targets leave out.
_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
            "x_embedder"]
STEPS = 1000


@pytest.fixture(scope="module")
def block_mean_model_dir(tmp_path_factory):
    from tools.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-block-mean", vae="block_mean")


def _blocks(image: torch.Tensor) -> torch.Tensor:
    """Each 8x8 block filled with its mean: (B, C, H, W) -> same shape."""
    return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(image, 8), scale_factor=8, mode="nearest")


def test_block_mean_vae_reconstructs_and_inversion_negates_the_latent(block_mean_model_dir, tiny_model_dir):
    import numpy as np
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from tools.demo_data import random_shapes_image

    vae = AutoencoderKL.from_pretrained(block_mean_model_dir / "vae").eval()
    rng = np.random.default_rng(5)
    images = torch.from_numpy(np.stack([np.asarray(random_shapes_image(rng, 96, 64), dtype=np.float32)
                                        for _ in range(4)]) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.mode()).sample
        scaled = (posterior.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        inverted = vae.decode(-scaled / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert (decoded - _blocks(images)).abs().max() < 1e-3  # every block in its mean colour
    assert (inverted + decoded).abs().max() < 1e-3  # 255 - colour is the latent negated
    assert posterior.std.max() < 1e-6  # a sampled latent is the mean
    assert 0.5 < scaled.std() < 1.5  # about unit variance, as the transformer's noise
    # Only the VAE differs from the preset "tiny" build.
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        for file in (tiny_model_dir / part).glob("*.safetensors"):
            assert (block_mean_model_dir / part / file.name).read_bytes() == file.read_bytes(), file
    random_vae = load_file(str(next((tiny_model_dir / "vae").glob("*.safetensors"))))
    ours = load_file(str(next((block_mean_model_dir / "vae").glob("*.safetensors"))))
    assert ours.keys() == random_vae.keys() and not torch.equal(ours["encoder.conv_in.weight"],
                                                                 random_vae["encoder.conv_in.weight"])


def test_block_mean_build_is_byte_identical(block_mean_model_dir, tmp_path):
    from tools.tiny_model import build_tiny_pipeline

    again = build_tiny_pipeline(tmp_path / "again", vae="block_mean")
    for file in sorted(block_mean_model_dir.rglob("*.safetensors")):
        assert (again / file.relative_to(block_mean_model_dir)).read_bytes() == file.read_bytes(), file


@pytest.mark.slow
def test_psnr_and_ssim_rise_as_the_demo_learns_the_inversion(block_mean_model_dir, demo_data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tools.demo_data import build_demo_dataset

    held_out = build_demo_dataset(tmp_path / "held_out", num_pairs=3, seed=1)  # pairs training never sees
    cfg = tiny_config_dict(tmp_path / "out", block_mean_model_dir, demo_data_dir)
    cfg["config"]["process"][0]["datasets"][0].update(val_folder_path=str(held_out / "target"),
                                                       val_control_path=str(held_out / "control"))
    cfg = merge(cfg, {"train.steps": STEPS, "train.lr": 1e-2, "train.lr_scheduler": "cosine", "train.batch_size": 4,
                      "train.skip_first_sample": False,
                      "network.linear": 16, "network.linear_alpha": 16, "network.target_modules": _TARGETS,
                      "save.save_every": STEPS, "log_every": STEPS, "sample.sample_every": STEPS,
                      "sample.prompts": [], "sample.metric_steps": 4})
    get_job(write_config(tmp_path / "cfg.yaml", cfg)).run()

    events = EventAccumulator(str(tmp_path / "out" / "tiny" / "logs"))
    events.Reload()
    psnr, ssim = ({e.step: e.value for e in events.Scalars(tag)} for tag in ("val/psnr", "val/ssim"))
    assert sorted(psnr) == [0, STEPS]
    # Measured with train.seed 7 / 1 / 2 (cosine): PSNR 10.72 -> 12.51 / 11.53 / 11.83 dB, SSIM 0.185 -> 0.196 /
    # 0.207 / 0.202; with a constant lr 12.45 / 11.38 / 12.18 dB and 0.202 / 0.194 / 0.204. A flat grey image
    # scores about 11.9 dB on these pairs: the final renders beat it for most seeds, not all, so it is not asserted.
    assert psnr[STEPS] > psnr[0] + 0.4, psnr
    assert ssim[STEPS] > ssim[0] + 0.005, ssim
