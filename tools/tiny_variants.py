"""Pre-quantized variants of the tiny FLUX Kontext transformer, written the way the downloads people use are laid out.

- ``fp8``: every 2-D weight (all of them Linear weights in FLUX) cast to float8_e4m3fn, as a diffusers model saved
  after ``.to(torch.float8_e4m3fn)`` / layerwise casting stores it; biases and norms stay in full precision.
- ``fp8_scaled``: the same with a per-tensor scale (absmax / 448) in ``<layer>.scale_weight`` and ComfyUI's empty
  ``scaled_fp8`` marker tensor, as ComfyUI's "fp8_scaled" checkpoints carry them (here on diffusers' key names).
- ``nf4``: a bitsandbytes 4-bit NF4 export (diffusers BitsAndBytesConfig + save_pretrained). diffusers' bitsandbytes
  quantizer refuses to run without a GPU, so this variant can only be written on a CUDA machine.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.errors import UserError

QUANTIZED_VARIANTS = ("fp8", "fp8_scaled", "nf4")
WEIGHTS = "diffusion_pytorch_model.safetensors"
E4M3_MAX = 448.0


def check_variant(variant: str) -> None:
    """A UserError, before anything is built, for an unknown variant or nf4 without a GPU."""
    import torch

    if variant not in QUANTIZED_VARIANTS:
        raise UserError(f"unknown quantized variant {variant!r}; choose one of {list(QUANTIZED_VARIANTS)}")
    if variant == "nf4" and not torch.cuda.is_available():
        raise UserError("the nf4 variant is written by diffusers' bitsandbytes quantizer, which needs a CUDA GPU; "
                        "build it on a GPU machine (fp8 and fp8_scaled work anywhere)")


def quantize_transformer_folder(folder: Path, variant: str) -> None:
    """Rewrite the full-precision transformer in `folder` (config.json + one safetensors file) as `variant`."""
    check_variant(variant)
    if variant == "nf4":
        _write_nf4(folder)
    else:
        _write_fp8(folder, scaled=variant == "fp8_scaled")


def _write_fp8(folder: Path, scaled: bool) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / WEIGHTS))
    out = {}
    for key, tensor in state.items():
        if tensor.ndim != 2 or not key.endswith(".weight"):
            out[key] = tensor
            continue
        if scaled:
            scale = (tensor.abs().max().float() / E4M3_MAX).clamp_min(1e-12)
            out[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[key] = tensor.to(torch.float8_e4m3fn)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, str(folder / WEIGHTS), metadata={"format": "pt"})


def _write_nf4(folder: Path) -> None:
    import torch
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = FluxTransformer2DModel.from_pretrained(str(folder), quantization_config=config, dtype=torch.bfloat16)
    for path in folder.iterdir():
        path.unlink()
    model.save_pretrained(str(folder), safe_serialization=True)


__all__ = ["QUANTIZED_VARIANTS", "check_variant", "quantize_transformer_folder"]
