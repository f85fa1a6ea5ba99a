"""Typed config of a caption process: `type: pair_captioner` writes edit instructions for pairs, ai-toolkit's
`type: Qwen3VLCaptioner` (and `type: captioner`) describes single images. Both read ai-toolkit's `caption:` block.

ai-toolkit's caption keys that change nothing here (its web UI's bookkeeping, compile, worker threads, layer
offloading) are dropped with one log line by ``aitoolkit_translate``; the ones whose value would change the written
captions and are not implemented (a second model, "thinking" output) are refused unless off.
"""


from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from toolkit.config.fields import DEVICE, GT0, NON_EMPTY, Check, _expand_folders, _expand_home, _meta, folder_list
from toolkit.config.train_schema import TrainDType

PAIR_TYPES = ("pair_captioner",)
SINGLE_TYPES = ("Qwen3VLCaptioner", "captioner")
CAPTION_TYPES = PAIR_TYPES + SINGLE_TYPES

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_PAIR_PROMPT = (
    "The first image is the original and the last image is the edited result. Write the one instruction an image "
    "editor would need to turn the original into the result, as a short imperative sentence (for example: make the "
    "jacket red). Mention only what changes. Answer with the instruction alone, no preamble or explanation."
)
DEFAULT_SINGLE_PROMPT = "Describe this image in one detailed paragraph. No preamble; state what is there."
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

_EXTENSION = Check(lambda v: v.strip().lstrip(".") != "" and "/" not in v, "a file extension such as png")


@dataclass(kw_only=True)
class CaptionConfig:
    """What to caption, with which vision-language model, and how the captions are written."""

    path_to_caption: str = field(metadata=_meta(
        "Folder of the images to caption (with pairs: the target images, as a dataset's folder_path).",
        NON_EMPTY, normalize=_expand_home, aliases=("folder_path", "path")))
    control_path: Optional[Union[str, list[str]]] = field(default=None, metadata=_meta(
        "pair_captioner only: folder(s) of the control (input) images, named like their targets; several folders "
        "give several control images, shown to the model in this order before the target.",
        normalize=_expand_folders, aliases=("control_folder", "controls")))
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata=_meta(
        "An instruction-tuned vision-language model (transformers image-text-to-text), a Hub id or a local "
        "folder: Qwen2.5-VL or Qwen3-VL.", NON_EMPTY, normalize=_expand_home, aliases=("model", "vlm")))
    caption_prompt: Optional[str] = field(default=None, metadata=_meta(
        "The instruction given to the model after the images; null uses a built-in prompt asking for one short "
        "imperative edit instruction (pairs) or a one-paragraph description (single images).", NON_EMPTY,
        aliases=("prompt",)))
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS), metadata=_meta(
        "Image file extensions to caption.", NON_EMPTY, item_checks=(_EXTENSION,),
        normalize=lambda v: [e.strip().lstrip(".").lower() for e in v]))
    caption_extension: str = field(default="txt", metadata=_meta(
        "Extension of the caption files written next to the images (as a dataset's caption_ext).", _EXTENSION,
        normalize=lambda v: v.strip().lstrip("."), aliases=("caption_ext",)))
    recaption: bool = field(default=False, metadata=_meta(
        "Also caption images whose caption file already has text, replacing it; by default they are skipped."))
    trigger_word: Optional[str] = field(default=None, metadata=_meta(
        "Written at the start of every new caption (e.g. '[trigger]', which the trainer replaces with its "
        "trigger_word); null keeps captions free of it.", NON_EMPTY))
    max_res: int = field(default=512, metadata=_meta(
        "Images larger than max_res x max_res pixels are scaled down (aspect kept) before the model sees them.",
        GT0))
    max_new_tokens: int = field(default=128, metadata=_meta("Most tokens the model may write per caption.", GT0))
    device: str = field(default="auto", metadata=_meta(
        "Torch device of the model: cpu, cuda, cuda:N, mps or auto (under a multi-process launch each rank uses "
        "its own GPU).", DEVICE))
    dtype: TrainDType = field(default="bf16", metadata=_meta(
        "Dtype of the model weights (float32 on CPU, where half precision is slow)."))
    quantize: bool = field(default=False, metadata=_meta("Quantize the model's language part with qtype (quanto)."))
    qtype: Literal["qfloat8", "qint8"] = field(default="qfloat8", metadata=_meta(
        "quanto weight type used with quantize.", aliases=("quantize_type",)))
    low_vram: bool = field(default=False, metadata=_meta(
        "Load and quantize the model on the CPU, then move it to the device (peak GPU memory is the quantized "
        "model's, not the full-precision one's)."))


@dataclass(kw_only=True)
class CaptionProcessConfig:
    """A caption process: write a caption file for every image (or pair) that has none."""

    type: Literal["pair_captioner", "Qwen3VLCaptioner", "captioner"] = field(default="pair_captioner", metadata=_meta(
        "pair_captioner: edit instructions for control -> target pairs; Qwen3VLCaptioner or captioner: a "
        "description of each single image (ai-toolkit's caption job)."))
    training_folder: str = field(default="output", metadata=_meta(
        "The report of every caption written goes to <training_folder>/<name>/caption_report.jsonl.", NON_EMPTY,
        normalize=_expand_home, aliases=("output_folder", "output_dir")))
    caption: CaptionConfig = field(metadata=_meta("What to caption and how."))


def control_folders(cfg: CaptionConfig) -> list[str]:
    return folder_list(cfg.control_path)
