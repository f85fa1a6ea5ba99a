"""The frozen encoders of FLUX Kontext (VAE, CLIP + T5), loaded only when something is encoded, on their own device.

Why lazily: when every latent and caption embedding a run needs is already cached (`python run.py cache CONFIG`, or a
previous run), training never calls an encoder, so the VAE and the two text encoders (T5-XXL alone is 9.5 GB) are
never read. Sampling still needs the VAE: it loads at the first sampling round, and the VAE is moved to the
training device for each round (the pipeline runs everything on its first module's device).

model.vae_device / model.te_device place the encoders on another device (outputs move to the training device);
model.vae_dtype / model.te_dtype give their dtype (float32 on a CPU). Cache keys must not need the loaded modules,
so the encoders' identity (`identity`) is built from their files: config.json plus a content digest of every file
in the component folder (toolkit.data.cache.folder_fingerprint), with the dtype and any quantization.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from extensions.flux_kontext.quantize import quantize_frozen, safe_exclude
from toolkit.data.cache import folder_fingerprint
from toolkit.dtypes import compute_dtype

log = logging.getLogger(__name__)


def _place(name: Optional[str], dtype_name: Optional[str], device: torch.device, dtype: torch.dtype, key: str
           ) -> tuple[torch.device, torch.dtype]:
    where = device if name in (None, "auto") else torch.device(name)
    if dtype_name is not None:
        return where, compute_dtype(dtype_name, where, key=key)
    return where, torch.float32 if where.type == "cpu" else dtype


class LazyEncoders:
    """Loads the VAE and the text encoders of `source` into `pipe` on first use; records what it loaded."""

    def __init__(self, pipe: Any, source: str, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe, self.source = pipe, source
        self.vae_device, self.vae_dtype = _place(model_cfg.vae_device, model_cfg.vae_dtype, device, dtype,
                                                 "model.vae_dtype")
        self.te_device, self.te_dtype = _place(model_cfg.te_device, model_cfg.te_dtype, device, dtype,
                                               "model.te_dtype")
        self.quantize_te = model_cfg.qtype if model_cfg.quantize_te else None
        self.text_unloaded = False
        self.loaded: list[str] = []  # component names in the order they were loaded

    # -- loading ----------------------------------------------------------------------------------------------
    def vae(self) -> torch.nn.Module:
        if self.pipe.vae is None:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(self.source, subfolder="vae", dtype=self.vae_dtype)
            self.pipe.vae = vae.to(self.vae_device).requires_grad_(False).eval()
            self._loaded("vae", self.vae_device, self.vae_dtype)
        return self.pipe.vae

    def text_encoders(self) -> None:
        if self.text_unloaded:
            raise RuntimeError("the text encoders were unloaded after caching (train.cache_text_embeddings)")
        if self.pipe.text_encoder_2 is not None:
            return
        from transformers import CLIPTextModel, T5EncoderModel

        clip = CLIPTextModel.from_pretrained(self.source, subfolder="text_encoder", dtype=self.te_dtype)
        t5 = T5EncoderModel.from_pretrained(self.source, subfolder="text_encoder_2", dtype=self.te_dtype)
        if self.quantize_te:  # on the CPU when the device is a GPU would be slower; quantize where it will live
            t5 = t5.to(self.te_device)
            quantize_frozen(t5, self.quantize_te, safe_exclude(t5, self.quantize_te, self.te_dtype, always=()))
        for name, module in (("text_encoder", clip), ("text_encoder_2", t5)):
            setattr(self.pipe, name, module.to(self.te_device).requires_grad_(False).eval())
            self._loaded(name, self.te_device, self.te_dtype)

    def unload_text(self) -> None:
        self.pipe.text_encoder = None
        self.pipe.text_encoder_2 = None
        self.text_unloaded = True
        gc.collect()
        if self.te_device.type == "cuda":
            torch.cuda.empty_cache()

    def _loaded(self, name: str, device: torch.device, dtype: torch.dtype) -> None:
        self.loaded.append(name)
        log.info("loaded %s on %s (%s)", name, device, dtype)

    # -- identity without loading ------------------------------------------------------------------------------
    def component_folder(self, name: str) -> Path:
        local = Path(self.source).expanduser()
        if local.exists():
            return local / name
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.source, allow_patterns=[f"{name}/*"])) / name

    def identity(self, name: str) -> dict:
        """What determines a component's outputs: its config, its files' contents, its dtype (and quantization)."""
        folder = self.component_folder(name)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        dtype = self.vae_dtype if name == "vae" else self.te_dtype
        parts = {"config": config, "files": folder_fingerprint(folder), "dtype": str(dtype)}
        if name == "text_encoder_2" and self.quantize_te:
            parts["quantized"] = self.quantize_te
        return parts


__all__ = ["LazyEncoders"]
