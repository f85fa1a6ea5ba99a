"""Pre-quantized transformers (extensions/flux_kontext/prequantized.py): an FP8 export trains on the CPU with its
Linear weights kept in float8, and the LoRA loads in the full-precision diffusers pipeline; bitsandbytes 4-bit
exports need a GPU (a clear error on the CPU, a GPU-only test)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors.torch import load_file

import run
from extensions.flux_kontext import FluxKontext, prequantized
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.adapters.lora import lora_state_dict
from toolkit.errors import UserError
from tools.tiny_model import build_tiny_pipeline

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def test_float8_linear_matches_the_upcast_weight_forward_and_backward():
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    scale = weight.abs().max() / 448
    stored = (weight / scale).to(torch.float8_e4m3fn)
    layer = prequantized.Float8Linear(stored, scale, torch.randn(6), torch.float32)
    upcast = stored.float() * scale
    x = torch.randn(3, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = layer(x), torch.nn.functional.linear(x_ref, upcast, layer.bias)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
    layer.weight.requires_grad_(True)  # a full fine-tune would train it: refused, not silently skipped
    with pytest.raises(UserError, match="cannot be fully fine-tuned"):
        layer(x).sum().backward()


def test_detect_reads_only_headers_and_config(tmp_path, tiny_model_dir):
    assert prequantized.detect(tiny_model_dir / "transformer") is None
    found = prequantized.detect(build_tiny_pipeline(tmp_path / "s", variant="fp8_scaled") / "transformer")
    assert found.kind == "fp8" and "scales" in found.detail
    folder = tmp_path / "bnb"
    shutil.copytree(tiny_model_dir / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    found = prequantized.detect(folder)
    assert found.kind == "bnb4" and "nf4" in found.detail
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        prequantized.require_device(found, folder, torch.device("cpu"))
    config["quantization_config"] = {"quant_method": "fp8"}  # says FP8, the files are full precision: nothing to do
    (folder / "config.json").write_text(json.dumps(config))
    assert prequantized.detect(folder) is None
    config["quantization_config"] = {"quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="'gguf' is not supported"):
        prequantized.detect(folder)


def test_fp8_export_trains_on_cpu_and_its_lora_loads_in_full_precision(tmp_path, tiny_model_dir, demo_data_dir,
                                                                      monkeypatch):
    fp8_dir = build_tiny_pipeline(tmp_path / "fp8", variant="fp8_scaled")
    loaded = []
    original = FluxKontext.load.__func__
    monkeypatch.setattr(FluxKontext, "load", classmethod(lambda cls, *a: loaded.append(original(cls, *a))
                                                         or loaded[-1]))
    cfg = merge(tiny_config_dict(tmp_path / "out", fp8_dir, demo_data_dir), {
        "train.steps": 3, "train.lr": 2e-2, "save.save_every": 100})
    cfg["config"]["process"][0]["datasets"][0]["cache_latents"] = True
    assert run.main([str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0

    transformer = loaded[0].transformer
    base = {k: t for k, t in transformer.state_dict().items() if "lora_" not in k}
    linear = [k for k, t in base.items() if k.endswith("base_layer.weight") or (t.ndim == 2 and k.endswith("weight"))]
    assert linear and all(base[k].dtype in FP8 for k in linear)  # every Linear weight stayed float8
    stored = sum(t.numel() * t.element_size() for t in base.values())
    assert stored < 0.3 * sum(t.numel() * 4 for t in base.values())  # fp8-sized, not fp32-sized
    assert lora_state_dict(transformer)

    lora = tmp_path / "out" / "tiny" / "tiny.safetensors"
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(str(lora)))
    control = Image.open(next((demo_data_dir / "control").glob("*.png"))).convert("RGB").resize((64, 64))
    render = dict(image=control, prompt="inv3rt invert", height=64, width=64, max_area=64 * 64,
                  num_inference_steps=2, guidance_scale=2.5, max_sequence_length=16, _auto_resize=False,
                  output_type="np")
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    without = pipe(generator=torch.Generator().manual_seed(1), **render).images[0]
    pipe.load_lora_weights(str(lora))
    with_lora = pipe(generator=torch.Generator().manual_seed(1), **render).images[0]
    assert np.abs(with_lora - without).max() > 1e-3


def test_prequantized_and_quantize_conflict_before_loading(tmp_path, demo_data_dir):
    fp8_dir = build_tiny_pipeline(tmp_path / "fp8", variant="fp8")
    model_cfg = type("M", (), {"name_or_path": str(fp8_dir), "transformer_path": None, "quantize": True,
                               "low_vram": False, "match_target_res": False})
    problems = FluxKontext.check_model_options(model_cfg)
    assert any("already quantized" in p for p in problems)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit needs a CUDA GPU (kernels and "
                                                          "diffusers' quantizer)")
def test_nf4_export_trains_on_gpu_and_its_lora_loads_in_full_precision(tmp_path, tiny_model_dir, demo_data_dir):
    nf4_dir = build_tiny_pipeline(tmp_path / "nf4", variant="nf4")
    assert prequantized.detect(nf4_dir / "transformer").kind == "bnb4"
    cfg = merge(tiny_config_dict(tmp_path / "out", nf4_dir, demo_data_dir), {
        "train.steps": 3, "train.lr": 2e-2, "save.save_every": 100, "device": "cuda", "train.dtype": "bf16",
        "train.disable_sampling": True})
    assert run.main([str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    lora = tmp_path / "out" / "tiny" / "tiny.safetensors"
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
