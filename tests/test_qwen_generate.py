"""Our Qwen-Image-Edit-Plus sampler gives QwenImageEditPlusPipeline's image for the same seed, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from extensions.qwen_image_edit.sampling import render
from tests.qwen_helpers import control_image, load_qwen
from tests.test_qwen_math import small_reference_area
from toolkit.render.sampling import SampleRequest
from tools.tiny_qwen import build_tiny_qwen_pipeline


def request(seed: int, guidance: float, width: int = 64, height: int = 48) -> SampleRequest:
    return SampleRequest(index=0, prompt="make it blue", ctrl_img=None, seed=seed, width=width, height=height,
                         guidance_scale=guidance, steps=2)


def ours_and_pipeline(qwen, controls, req: SampleRequest) -> tuple[np.ndarray, np.ndarray]:
    cond = qwen.condition(req.prompt, controls, req.width, req.height)
    negative = qwen.condition("", controls, req.width, req.height) if req.guidance_scale > 1 else None
    ours = render(qwen.pipe, qwen.denoiser(), cond, req.width, req.height, req.steps,
                  torch.Generator().manual_seed(req.seed), req.guidance_scale, negative, output_type="np")
    theirs = qwen.pipe(image=controls, prompt=req.prompt, negative_prompt="" if negative is not None else None,
                       true_cfg_scale=req.guidance_scale, width=req.width, height=req.height,
                       num_inference_steps=req.steps, generator=torch.Generator().manual_seed(req.seed),
                       output_type="np").images[0]
    return ours, theirs


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    return load_qwen(tiny_qwen_dir)


def test_two_controls_with_true_cfg_equal_the_pipeline(qwen, monkeypatch) -> None:
    small_reference_area(monkeypatch)
    ours, theirs = ours_and_pipeline(qwen, [control_image(64, 48, 1), control_image(48, 64, 2)], request(5, 3.0))
    assert np.array_equal(ours, theirs)


def test_one_control_at_the_real_reference_size_equals_the_pipeline(qwen) -> None:
    ours, theirs = ours_and_pipeline(qwen, [control_image(64, 48, 1)], request(7, 1.0))
    assert np.array_equal(ours, theirs)


def test_2511_zero_cond_t_equals_the_pipeline(tmp_path, monkeypatch) -> None:
    small_reference_area(monkeypatch)
    qwen = load_qwen(build_tiny_qwen_pipeline(tmp_path / "q2511", variant="2511"))
    ours, theirs = ours_and_pipeline(qwen, [control_image(64, 48, 1)], request(5, 1.0))
    assert np.array_equal(ours, theirs)


def test_sample_renders_each_request_with_its_seed_as_the_pipeline(qwen, monkeypatch) -> None:
    small_reference_area(monkeypatch)
    controls = [control_image(64, 48, 1)]
    first, again, other = qwen.sample([request(1, 1.0), request(1, 1.0), request(2, 1.0)], [controls] * 3)
    assert first.size == (64, 48)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    upstream = qwen.pipe(image=controls, prompt="make it blue", true_cfg_scale=1.0, width=64, height=48,
                         num_inference_steps=2, generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(np.asarray(first), np.asarray(upstream))


def test_run_generate_renders_base_and_lora_with_two_controls(tmp_path, tiny_qwen_dir, monkeypatch) -> None:
    """`run.py generate --arch qwen_image_edit_plus`: a random LoRA changes the image, scale 0 is the base model."""
    import run
    from toolkit.adapters.lora import add_lora, lora_state_dict, make_lora_config, save_lora

    small_reference_area(monkeypatch)
    qwen = load_qwen(tiny_qwen_dir)
    config = make_lora_config(4, 8, qwen.lora_targets())
    add_lora(qwen.transformer, config)
    g = torch.Generator().manual_seed(1)
    for name, param in qwen.transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=g) * 0.3
    lora = save_lora(tmp_path / "edit.safetensors", lora_state_dict(qwen.transformer), config, "float32")
    control_image(64, 48, 1).save(tmp_path / "a.png")
    control_image(64, 48, 2).save(tmp_path / "b.png")
    prompt = f"make it blue --ctrl_img {tmp_path / 'a.png'} --ctrl_img {tmp_path / 'b.png'}"

    def generate(out, *extra):
        assert run.main(["generate", "--arch", "qwen_image_edit_plus", "--model", str(tiny_qwen_dir), "--ctrl-img",
                         str(tmp_path / "a.png"), "--prompt", prompt, "--width", "64", "--height", "48", "--steps",
                         "2", "--guidance", "1", "--device", "cpu", "--out", str(out), "--lora", str(lora),
                         *extra]) == 0
        return {c: np.asarray(Image.open(out / f"a_p00_{c}.png"), dtype=np.int16) for c in ("base", "edit")}

    images = generate(tmp_path / "out")
    assert np.abs(images["edit"] - images["base"]).max() > 10, "the LoRA changed nothing"
    ours = qwen.sample([request(42, 1.0)], [[control_image(64, 48, 1), control_image(64, 48, 2)]])[0]
    assert np.array_equal(np.asarray(ours, dtype=np.int16), images["edit"])  # the same sampler, the same LoRA
    zero = generate(tmp_path / "zero", "--lora-scale", "0")
    assert np.array_equal(zero["edit"], zero["base"])


def test_a_stop_request_ends_the_denoising_loop_after_the_current_step(qwen, monkeypatch) -> None:
    """Training's sampling rounds pass stop=...: a stop signal ends the loop after the step it arrived in."""
    small_reference_area(monkeypatch)
    calls = []
    denoiser = qwen.denoiser()
    hook = denoiser.register_forward_hook(lambda *_: calls.append(1))
    try:
        qwen.sample([request(1, 1.0)], [[control_image(64, 48, 1)]], stop=lambda: True)
        stopped = len(calls)
        calls.clear()
        qwen.sample([request(1, 1.0)], [[control_image(64, 48, 1)]])
    finally:
        hook.remove()
    assert (stopped, len(calls)) == (1, 2)  # request(...) asks for 2 denoising steps
