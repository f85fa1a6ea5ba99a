"""8-bit frozen base weights (optimum-quanto) and low-VRAM block-by-block loading, for any diffusers transformer;
each architecture keeps only its own list of layers that stay in full precision (extensions/<arch>/quantize.py)."""
