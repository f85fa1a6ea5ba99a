"""Latent and prompt caching for Qwen-Image-Edit(-Plus) (toolkit.data.cache), mixed into the architecture class.

Cached latents per item: the target's normalised latents and each control image's reference latents, made exactly as
training makes them on the fly (the reference size follows model.match_target_res, so it is part of the encoder's
identity). Cached prompts: Qwen2.5-VL sees the control images inside the prompt, so an entry belongs to one item's
caption AND its control images (toolkit.data.cache keys it by both: `text_sees_images`); the encoder's input is
(caption, control pixels). Embeddings have the length of their prompt; the dataset's collate pads them with their
mask.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Optional, Sequence

import torch

from extensions.qwen_image_edit.conditioning import VAE_IMAGE_SIZE, pipeline_inputs, to_pil
from toolkit.data.cache import Encoder, make_key, module_fingerprint
from toolkit.data.dataset import control_names

log = logging.getLogger(__name__)


def _module_identity(module: Any) -> dict:
    config = module.config
    config = dict(config) if isinstance(config, dict) else config.to_dict()  # diffusers FrozenDict / transformers
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    return {"config": config, "weights": module_fingerprint(module), "dtype": str(module.dtype)}


class QwenCaching:
    """CachingModel for the Qwen edit architectures (uses the host class's pipe, vae, device, dtype,
    reference_area and condition_area)."""

    #: toolkit.data.cache: prompt embeddings depend on the control images, not on the caption alone.
    text_sees_images = True

    def _reference_rule(self) -> dict:
        """What decides the size of the images behind the reference latents (and, for the first Qwen-Image-Edit,
        the images Qwen2.5-VL sees)."""
        return {"arch": self.name, "match_target_res": self.match_target_res, "vae_image_size": VAE_IMAGE_SIZE,
                "condition_area": self.condition_area}

    # -- latents ------------------------------------------------------------------------------------------------
    def latent_encoder(self) -> Encoder:
        """{"target", "control"[, "control_2", ...]} pixels -> {"target_latents": (z, h, w), "control_latents":
        (z, h', w') at the reference size, ...}."""
        identity = make_key("vae", {**_module_identity(self.vae), "latents": "posterior mode, normalised",
                                    **self._reference_rule()})
        return Encoder(identity, self._encode_item_latents)

    def _encode_item_latents(self, items: list[dict]) -> list[dict]:
        targets = [self.encode_images(item["target"][None])[0] for item in items]
        return [{"target_latents": t, **r} for t, r in zip(targets, self.reference_latents(items))]

    @torch.no_grad()
    def reference_latents(self, items: Sequence[dict]) -> list[dict]:
        """Per sample {"control_latents": (z, h, w), "control_2_latents", ...}: each control image (3, H, W) at the
        target's size, resized to the reference size as the pipeline does, through the VAE."""
        out = []
        for item in items:
            names = control_names(item)
            target = item["target"]
            _, pixels = pipeline_inputs(self.pipe, [to_pil(item[n]) for n in names],
                                        self.reference_area(target.shape[-1], target.shape[-2]), self.condition_area)
            out.append({f"{n}_latents": self.encode_images(p)[0] for n, p in zip(names, pixels)})
        return out

    # -- prompts ------------------------------------------------------------------------------------------------
    def text_encoder(self) -> Encoder:
        """(caption, {"control", ...: pixels at the bucket size}) -> {"prompt_embeds": (L, D), "prompt_mask": (L,)}."""
        pipe = self.pipe
        if pipe.text_encoder is None:
            raise RuntimeError("the text encoder is unloaded")
        parts = {"text_encoder": _module_identity(pipe.text_encoder),
                 "tokenizer": pipe.processor.tokenizer.backend_tokenizer.to_str(),
                 "image_processor": pipe.processor.image_processor.to_dict(),
                 "template": [pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx],
                 **self._reference_rule()}
        return Encoder(make_key("text", parts), self._encode_item_prompts)

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str], controls: Sequence[dict]) -> list[dict]:
        """Per sample its prompt embedding (L, D) and mask (L,), the control pixels (3, H, W) seen as training sees
        them."""
        rows = []
        for caption, pixels in zip(captions, controls):
            names = control_names(pixels)
            images = [to_pil(pixels[n]) for n in names]
            width, height = (pixels[names[0]].shape[-1], pixels[names[0]].shape[-2]) if names else (0, 0)
            condition_images, _ = pipeline_inputs(self.pipe, images, self.reference_area(width, height),
                                                  self.condition_area)
            # No control image (control dropout): the prompt without any "Picture N", as encode_conditioning.
            embeds, mask = self.pipe.encode_prompt(caption, image=condition_images or None, device=self.device)
            rows.append({"prompt_embeds": embeds[0].to(self.dtype),
                         "prompt_mask": torch.ones(embeds.shape[1], dtype=torch.long, device=embeds.device)
                         if mask is None else mask[0]})
        return rows

    def _encode_item_prompts(self, inputs: list[tuple[str, dict]]) -> list[dict]:
        return self.encode_captions([caption for caption, _ in inputs], [pixels for _, pixels in inputs])

    def unload_text_encoders(self, keep: Sequence[str]) -> None:
        """Free Qwen2.5-VL when nothing asks for it any more. Sample and validation prompts are encoded with their
        control images at each use, so with any prompt in `keep` it stays loaded (and says so)."""
        if self.pipe.text_encoder is None:
            return
        if keep:
            log.info("text encoder kept loaded: %s encodes the %d sample / validation prompts together with their "
                     "control images at each use", self.name, len(set(keep)))
            return
        self.pipe.text_encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("text encoder unloaded")


def stack_padded(rows: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of {"prompt_embeds": (L_i, D), "prompt_mask": (L_i,)} -> zero-padded (B, L, D) and (B, L)."""
    length = max(r["prompt_embeds"].shape[0] for r in rows)
    embeds = torch.stack([torch.nn.functional.pad(r["prompt_embeds"], (0, 0, 0, length - r["prompt_embeds"].shape[0]))
                          for r in rows])
    mask = torch.stack([torch.nn.functional.pad(r["prompt_mask"], (0, length - r["prompt_mask"].shape[0]))
                        for r in rows])
    return embeds, mask


def batch_items(batch: dict, names: Sequence[str]) -> Optional[list[dict]]:
    """The per-sample pixel dicts of a collated batch ({"target", "control", ...}); None when it carries no pixels."""
    if "target" not in batch:
        return None
    return [{n: batch[n][i] for n in names} for i in range(batch["target"].shape[0])]
