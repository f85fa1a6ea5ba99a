"""Rendering images: sample prompts and their flags, contact sheets, LoRA renderers for generate/compare, PNG
metadata and plots."""
