"""ai-toolkit's keys of a caption process (its captioner processes' `caption:` block and the process keys its web UI
writes) and what each means here; the dispositions are those of ``aitoolkit.py`` (Mapped, NoEffect, Unsupported).

Keys that are also our own (path_to_caption, model_name_or_path, extensions, caption_extension, recaption, dtype,
device, quantize, qtype, low_vram, max_res, max_new_tokens, caption_prompt) need no entry: they work the same.
"""

from __future__ import annotations

from toolkit.config.aitoolkit_rules import EMPTY, Mapped, NoEffect, Rule, Unsupported

__all__ = ["CAPTION_QTYPES", "CAPTION_TABLE", "OTHER_CAPTIONERS"]

_SPEED = "changes speed or memory, not the captions written"

CAPTION_TABLE: dict[str, dict[str, Rule]] = {
    "process": {
        "sqlite_db_path": NoEffect("bookkeeping of ai-toolkit's web UI"),
        "device": Mapped("caption.device", "the model's device", unless_set=True),
    },
    "caption": {
        "model_name_or_path2": Unsupported(EMPTY, "a second captioning model is not implemented"),
        "thinking": Unsupported((False,), "thinking-mode generation is not implemented"),
        "compile": NoEffect(_SPEED),
        "batch_size": NoEffect("images are captioned one at a time (greedy decoding); " + _SPEED),
        "num_workers": NoEffect(_SPEED),
        "layer_offloading": NoEffect(_SPEED),
        "layer_offloading_percent": NoEffect(_SPEED),
    },
}

# ai-toolkit's spellings of the 8-bit quanto types; other qtypes are refused when quantize is on.
CAPTION_QTYPES = {"float8": "qfloat8", "qfloat8": "qfloat8", "int8": "qint8", "qint8": "qint8"}

# ai-toolkit's other caption process types, refused by name (their key set is the same, so the rest of the process is
# still checked as a single-image captioner).
OTHER_CAPTIONERS = {
    "Qwen3OmniCaptioner": "video and audio captioning is not implemented; images: type Qwen3VLCaptioner",
    "AceStepCaptioner": "audio captioning is not implemented",
    "Ideogram4Captioner": "Ideogram's structured caption format is not implemented; type Qwen3VLCaptioner writes "
                          "plain descriptions",
}
