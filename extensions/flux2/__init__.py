"""FLUX.2: `model.arch: flux2_klein_4b`, `flux2_klein_9b` (Flux2KleinPipeline) and `flux2` ([dev], Flux2Pipeline).
Importing the package registers the architectures, their renderer, model-card facts and LoRA key layout."""

from extensions.flux2.model import Flux2Denoiser, Flux2Dev, Flux2Klein, Flux2Klein9B
from extensions.flux2.generate import Flux2Renderer  # registers the renderer of all three
from extensions.flux2.hub_card import FLUX2_DEV_CARD, FLUX2_KLEIN_4B_CARD, FLUX2_KLEIN_9B_CARD  # card facts
from extensions.flux2.lora_keys import register as _register_lora_keys

_register_lora_keys()  # the BFL / ComfyUI key layout of the three archs (save.format: comfy, convert-lora)

__all__ = ["FLUX2_DEV_CARD", "FLUX2_KLEIN_4B_CARD", "FLUX2_KLEIN_9B_CARD", "Flux2Denoiser", "Flux2Dev", "Flux2Klein",
           "Flux2Klein9B", "Flux2Renderer"]
