"""8-bit quantized base (optimum-quanto): LoRA trains on top, the base stays frozen and bit-identical, the saved LoRA
loads in an unquantized diffusers pipeline, and low-VRAM block-by-block loading gives the same quantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from optimum import quanto
from PIL import Image
from safetensors.torch import load_file

from extensions.flux_kontext import FluxKontext
from extensions.flux_kontext.quantize import (TRANSFORMER_EXCLUDE, load_transformer_blockwise, safe_exclude,
                                              unsafe_qint8_layers, weight_bytes)
from jobs import get_job
from toolkit.adapters.lora import check_only_lora_trains
from tests.helpers import first_bucket_batch, fixed_inputs, merge, tiny_config_dict, write_config
from toolkit.train import flow_matching
from toolkit.config import load_job_config
from toolkit.dist import Runtime
from toolkit.errors import ConfigError
from toolkit.adapters.lora import add_lora, lora_state_dict, make_lora_config, save_lora


def _process(tmp_path, model_dir, data_dir, **overrides):
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir), overrides)
    return get_job(write_config(tmp_path / "cfg.yaml", cfg)).processes[0]


def _setup(process):
    pairs, requests, outputs = process.preflight()
    return process.setup(Runtime(distributed=False, device="cpu"), pairs, requests, outputs)


def _fixed_loss(ctx) -> float:
    """Flow-matching loss on two items of one bucket with fixed timesteps and noise (no LoRA dropout)."""
    inputs, target = fixed_inputs(ctx.model, first_bucket_batch(ctx.dataset))
    with torch.no_grad():
        return flow_matching.flow_matching_loss(ctx.model.denoiser()(**inputs), target, torch.ones(2)).item()


def _base_state(transformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in transformer.state_dict().items() if "lora_" not in k}


def _quantized_layers(transformer) -> set[str]:
    return {name for name, m in transformer.named_modules() if isinstance(m, quanto.QModuleMixin)}


def test_quantized_training_learns_keeps_base_and_saves_a_portable_lora(tmp_path, tiny_model_dir, demo_data_dir):
    process = _process(tmp_path, tiny_model_dir, demo_data_dir, **{
        "model.quantize": True, "model.qtype": "qint8", "train.lr": 2e-2, "network.linear_alpha": 8})
    process.cfg.datasets[0].cache_latents = True  # in memory: no VAE pass per step keeps the test fast
    ctx = _setup(process)
    transformer = ctx.model.transformer
    quantized = _quantized_layers(transformer)
    assert quantized and not quantized & set(TRANSFORMER_EXCLUDE)
    assert all(any(q.startswith(t) for q in quantized) for t in ("transformer_blocks.0.attn.to_q",
                                                                  "single_transformer_blocks.1.proj_out"))
    assert all("lora_" in n for n, p in transformer.named_parameters() if p.requires_grad)
    before, loss_before = _base_state(transformer), _fixed_loss(ctx)

    for _ in range(12):
        process.optimizer_step(ctx)
    ctx.model.denoiser().eval()
    assert _fixed_loss(ctx) < 0.9 * loss_before
    after = _base_state(transformer)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    request = ctx.requests[0]  # sampling during training works on the quantized model
    image = ctx.model.sample([request], [Image.open(request.ctrl_img).convert("RGB").resize((64, 64))])[0]
    assert image.size == (64, 64)

    path = save_lora(tmp_path / "q.safetensors", lora_state_dict(transformer), ctx.lora_config, "float32")
    state = load_file(str(path))
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    render = dict(image=Image.open(request.ctrl_img).convert("RGB").resize((64, 64)), prompt="inv3rt invert",
                  height=64, width=64, max_area=64 * 64, num_inference_steps=2, guidance_scale=2.5,
                  max_sequence_length=16, _auto_resize=False, output_type="np")
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    without = pipe(generator=torch.Generator().manual_seed(1), **render).images[0]
    pipe.load_lora_weights(str(path))  # an unquantized pipeline: the LoRA holds no quantized tensors
    with_lora = pipe(generator=torch.Generator().manual_seed(1), **render).images[0]
    assert np.abs(with_lora - without).max() > 1e-3


def test_base_stays_frozen_after_a_state_load(tmp_path, tiny_model_dir, demo_data_dir):
    process = _process(tmp_path, tiny_model_dir, demo_data_dir, **{"model.quantize": True})
    model = FluxKontext.load(process.cfg.model, torch.device("cpu"), torch.float32)
    params = add_lora(model.transformer, make_lora_config(4, 4, FluxKontext.default_lora_targets))
    check_only_lora_trains(model.transformer, params)
    # quanto re-creates weight Parameters with requires_grad=True on load_state_dict (here through a parent module)
    model.denoiser().load_state_dict(model.denoiser().state_dict())
    check_only_lora_trains(model.transformer, params)
    assert all(p.requires_grad for p in params)
    next(p for n, p in model.transformer.named_parameters() if "lora_" not in n).requires_grad_(True)
    with pytest.raises(RuntimeError, match="only LoRA weights may train"):
        check_only_lora_trains(model.transformer, params)


@pytest.mark.parametrize("qtype", ["qint8", "qfloat8"])
def test_low_vram_loading_gives_the_same_quantized_weights(tmp_path, tiny_model_dir, demo_data_dir, qtype):
    process = _process(tmp_path, tiny_model_dir, demo_data_dir, **{"model.quantize": True, "model.qtype": qtype})
    normal = FluxKontext.load(process.cfg.model, torch.device("cpu"), torch.float32).transformer
    process.cfg.model.low_vram = True
    low = FluxKontext.load(process.cfg.model, torch.device("cpu"), torch.float32).transformer
    assert _quantized_layers(low) == _quantized_layers(normal)
    a, b = normal.state_dict(), low.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert not any(p.requires_grad for p in low.parameters())
    assert weight_bytes(low) < 0.6 * sum(p.numel() * 4 for p in
                                         FluxKontextPipeline.from_pretrained(str(tiny_model_dir)).transformer
                                         .parameters())


def test_low_vram_moves_only_quantized_blocks_to_the_device(tiny_model_dir, monkeypatch):
    moved = []
    original_to = torch.nn.Module.to

    def record(module, *args, **kwargs):
        full_precision = [n for n, m in module.named_modules()
                          if type(m) is torch.nn.Linear and m.weight.device.type != "meta"]
        moved.append((type(module).__name__, full_precision))
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", record)
    load_transformer_blockwise(str(tiny_model_dir), torch.float32, torch.device("cpu"), "qint8")
    kinds = [kind for kind, _ in moved]
    assert kinds.count("FluxTransformerBlock") == 1 and kinds.count("FluxSingleTransformerBlock") == 2
    # each unit reaches the device after its own quantization: blocks with no full-precision Linear at all, and
    # over all units only the excluded layers (proj_out, x_embedder, context_embedder, norm_out.linear)
    assert all(not fp for kind, fp in moved if kind.endswith("TransformerBlock"))
    assert sum(len(fp) for _, fp in moved) == len(TRANSFORMER_EXCLUDE)


def test_low_vram_without_quantize_loads_the_checkpoint(tmp_path, tiny_model_dir, demo_data_dir):
    process = _process(tmp_path, tiny_model_dir, demo_data_dir, **{"model.low_vram": True})
    low = FluxKontext.load(process.cfg.model, torch.device("cpu"), torch.float32).transformer
    ref = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32).transformer.state_dict()
    got = low.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_quantize_te_quantizes_t5_and_captions_still_encode(tmp_path, tiny_model_dir, demo_data_dir):
    process = _process(tmp_path, tiny_model_dir, demo_data_dir, **{"model.quantize_te": True, "model.qtype": "qint8"})
    model = FluxKontext.load(process.cfg.model, torch.device("cpu"), torch.float32)
    model.full_pipe()  # the text encoders load (and T5 is quantized) on first use
    assert _quantized_layers(model.pipe.text_encoder_2)
    assert not _quantized_layers(model.transformer) and not _quantized_layers(model.pipe.text_encoder)
    embeds, pooled, _ = model.encode_captions(["inv3rt invert"])
    assert embeds.shape[:2] == (1, 16) and torch.isfinite(embeds).all() and torch.isfinite(pooled).all()


def test_qint8_in_half_precision_keeps_layers_with_odd_widths_unquantized():
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Linear(16, 8))
    assert unsafe_qint8_layers(net) == ["0"]
    assert safe_exclude(net, "qint8", torch.bfloat16, always=()) == ["0"]
    assert safe_exclude(net, "qint8", torch.float32, always=()) == []
    assert safe_exclude(net, "qfloat8", torch.bfloat16, always=()) == []


def test_qtype_is_checked_by_the_config(tmp_path, tiny_model_dir, demo_data_dir):
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir), {"model.qtype": "qint4"})
    with pytest.raises(ConfigError, match="qtype"):
        load_job_config(write_config(tmp_path / "cfg.yaml", cfg), environ={})


def test_quantization_benchmark_runs_a_variant_on_the_tiny_model(tmp_path, tiny_model_dir, demo_data_dir):
    from tools.bench_quant import format_table, run_variant

    config = write_config(tmp_path / "cfg.yaml", tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir))
    row = run_variant("+ low_vram loading", steps=1, warmup=0, device="cpu", config=str(config))
    assert row["encode_seconds"] < row["step_seconds"] and row["transformer_weight_bytes"] > 0
    assert row["peak_training_rss_mib"] > 0 and "+ low_vram loading" in format_table([row])
