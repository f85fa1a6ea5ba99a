"""FLUX.1 Kontext: `model.arch: flux_kontext`. Importing the package registers the architecture."""

from extensions.flux_kontext.model import FluxKontext, KontextDenoiser
from extensions.flux_kontext.generate import FluxKontextRenderer  # registers the renderer and the LoRA key layout
from extensions.flux_kontext.hub_card import FLUX_KONTEXT_CARD  # registers the Hub model card facts

__all__ = ["FLUX_KONTEXT_CARD", "FluxKontext", "FluxKontextRenderer", "KontextDenoiser"]
