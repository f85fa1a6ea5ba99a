"""model.arch qwen_image_edit: the first Qwen-Image-Edit (one control image) equals QwenImageEditPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extensions.qwen_image_edit.sampling import render
from tests.qwen_helpers import batch_of, control_image, load_qwen
from toolkit.errors import ArchitectureError
from tools.tiny_qwen import build_tiny_qwen_pipeline


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = build_tiny_qwen_pipeline(tmp_path_factory.mktemp("models") / "tiny-qwen-edit", arch="qwen_image_edit")
    return load_qwen(folder, arch="qwen_image_edit")


def test_sampler_and_training_inputs_equal_the_pipeline(qwen) -> None:
    """One pipeline run (its ~1024x1024 px control costs ~20 s here) checks the image and the transformer inputs."""
    from tests.test_qwen_math import capture_transformer_call

    control = control_image(64, 48, 1)
    seen, out, theirs = capture_transformer_call(qwen.pipe, image=control, prompt="make it blue", width=64, height=48,
                                                 output_type="np")
    cond = qwen.condition("make it blue", [control], 64, 48)
    n = (48 // 16) * (64 // 16)
    assert torch.equal(cond.references, seen["hidden_states"][:, n:])
    assert torch.equal(cond.prompt_embeds, seen["encoder_hidden_states"])
    encoded = qwen.encode_batch(batch_of([control_image(64, 48, 9)], [[control]], ["make it blue"]))
    inputs = qwen.denoiser_inputs(encoded, seen["hidden_states"][:, :n], seen["timestep"], 1.0)
    assert inputs["img_shapes"] == seen["img_shapes"]
    with torch.no_grad():
        torch.testing.assert_close(qwen.denoiser()(**inputs), out[:, :n], rtol=0, atol=1e-6)
    ours = render(qwen.pipe, qwen.denoiser(), cond, 64, 48, 2, torch.Generator().manual_seed(0), output_type="np")
    assert np.array_equal(ours, theirs.images[0])


def test_more_than_one_control_is_refused(qwen) -> None:
    with pytest.raises(ArchitectureError, match="at most 1 control"):
        qwen.condition("x", [control_image(32, 32, 1), control_image(32, 32, 2)], 32, 32)
