"""Differential output preservation (ai-toolkit's train.diff_output_preservation) as pure functions.

For each sample the caption is rewritten with the trigger word replaced by a class word ("ohwx woman" -> "woman
woman"). At the same x_t and t, the base model (LoRA off, no gradient) and the LoRA model predict on that class
caption; the loss gains multiplier * mean((pred_class_lora - pred_class_base)^2), pulling the LoRA towards changing
nothing when the trigger is absent. ai-toolkit adds it to every batch, unweighted by timestep.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["class_captions", "preservation_loss"]


def class_captions(captions: Sequence[str], trigger_word: str, class_word: str) -> list[str]:
    """Each caption with every occurrence of the trigger word replaced by the class word (plain substring
    replacement, as ai-toolkit's str.replace)."""
    return [caption.replace(trigger_word, class_word) for caption in captions]


def preservation_loss(lora_pred: torch.Tensor, base_pred: torch.Tensor, multiplier: float) -> torch.Tensor:
    """multiplier * mean squared difference over all elements, in fp32; `base_pred` carries no gradient."""
    return (lora_pred.float() - base_pred.detach().float()).pow(2).mean() * multiplier
