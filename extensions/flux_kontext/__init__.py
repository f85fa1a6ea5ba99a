"""FLUX.1 Kontext: `model.arch: flux_kontext`. Importing the package registers the architecture."""

from extensions.flux_kontext.model import FluxKontext, KontextDenoiser

__all__ = ["FluxKontext", "KontextDenoiser"]
