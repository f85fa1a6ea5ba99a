"""Captioning with a vision-language model: which images need a caption (files), what the model is asked and how its
answer becomes one caption line (prompt), and the model itself (vlm)."""
