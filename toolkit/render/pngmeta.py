"""Generation parameters in PNG text chunks, readable by image viewers, A1111-style tools and by us.

Two tEXt chunks: `parameters` in the A1111 / Civitai convention (prompt on the first line, then `Key: value, ...`),
and `kontext_trainer` with the same values as JSON. Every value goes through redact_text.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from toolkit.redact import redact_text

JSON_KEY = "kontext_trainer"
A1111_KEY = "parameters"


def _a1111_text(params: Mapping[str, Any]) -> str:
    rest = ", ".join(f"{key.replace('_', ' ').capitalize()}: {value}" for key, value in params.items()
                     if key != "prompt" and value is not None)
    return f"{params.get('prompt', '')}\n{rest}"


def png_bytes(image: Image.Image, params: Mapping[str, Any]) -> bytes:
    """`image` encoded as PNG with `params` (prompt, seed, steps, ...) in its text chunks."""
    clean = {key: (redact_text(value) if isinstance(value, str) else value) for key, value in params.items()}
    info = PngInfo()
    info.add_text(A1111_KEY, _a1111_text(clean))
    info.add_text(JSON_KEY, json.dumps(clean, sort_keys=True, default=str))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_params(path: Path) -> dict[str, Any]:
    """The parameters png_bytes stored (empty when the PNG has none)."""
    with Image.open(path) as img:
        raw = img.text.get(JSON_KEY) if hasattr(img, "text") else None
    return json.loads(raw) if raw else {}


__all__ = ["A1111_KEY", "JSON_KEY", "png_bytes", "read_png_params"]
