"""Typed config of one training dataset entry (``datasets:`` of a training process), in ai-toolkit's key names.

Split out of ``schema.py`` (re-exported there) to keep files small; the metadata keys are the same (see schema.py).
"""

from dataclasses import dataclass, field
from typing import Optional, Union

from toolkit.config.fields import (Check, _meta, _expand_home, _expand_folders, _one_size_to_list, GE0, GE1, NON_EMPTY,
                                   FOLDERS, UNIQUE, RESOLUTION, PROBABILITY)

__all__ = ["DatasetConfig"]


@dataclass(kw_only=True)
class DatasetConfig:
    """One folder of training images with captions, paired with control images by file name."""

    folder_path: str = field(metadata=_meta(
        "Folder of target images and their caption files.", NON_EMPTY, normalize=_expand_home))
    control_path: Optional[Union[str, list[str]]] = field(default=None, metadata=_meta(
        "Folder of control (input) images, paired with the targets by file name; a list of folders gives each "
        "target several control images (one per folder, same file name), appended in list order.",
        FOLDERS, normalize=_expand_folders))
    caption_ext: str = field(default="txt", metadata=_meta(
        "Extension of the caption files, without the dot.", NON_EMPTY, normalize=lambda v: v.lstrip(".")))
    default_caption: Optional[str] = field(default=None, metadata=_meta(
        "Caption used for images that have no caption file."))
    caption_dropout_rate: float = field(default=0.05, metadata=_meta(
        "Probability of training a sample with an empty caption.", PROBABILITY))
    shuffle_tokens: bool = field(default=False, metadata=_meta(
        "Shuffle the comma-separated parts of each caption."))
    resolution: list[int] = field(default_factory=lambda: [512], metadata=_meta(
        "Training sizes in pixels; images are bucketed at each size (a bare number means one size).",
        NON_EMPTY, UNIQUE, item_checks=(RESOLUTION,), coerce=_one_size_to_list))
    control_resolution: Optional[int] = field(default=None, metadata=_meta(
        "Control images at about this many pixels squared (the target's crop and aspect ratio, sides multiples of "
        "16, never upscaled) instead of the target's size: Kontext's control tokens shrink with the area (1024 px "
        "target, control_resolution 512: 4096 -> 1024 control tokens), with their own position ids as "
        "FluxKontextPipeline gives a control image of that size. null: the target's size. ai-toolkit's "
        "full_size_control_images: false maps to 512.", RESOLUTION))
    cache_latents_to_disk: bool = field(default=False, metadata=_meta(
        "Encode target and control latents once, before training, into cache_dir; later steps and runs read them "
        "(an image, resolution or VAE change re-encodes just what changed)."))
    cache_latents: bool = field(default=False, metadata=_meta(
        "Encode target and control latents once, before training, and keep them in memory (with "
        "cache_latents_to_disk: read from disk once, then kept in memory)."))
    cache_dir: Optional[str] = field(default=None, metadata=_meta(
        "Folder of the disk cache (latents; text embeddings with train.cache_text_embeddings); null means "
        "<folder_path>/_latent_cache.", NON_EMPTY, normalize=_expand_home, aliases=("latent_cache_dir",)))
    num_repeats: int = field(default=1, metadata=_meta("Times each image is seen per epoch.", GE1))
    flip_x: bool = field(default=False, metadata=_meta(
        "Also train a left-right mirrored copy of every item (target, control images and mask mirrored together), "
        "as ai-toolkit: the dataset doubles; with flip_y as well, it quadruples."))
    flip_y: bool = field(default=False, metadata=_meta(
        "Also train an upside-down copy of every item (of the flip_x copies too), as ai-toolkit."))
    loss_multiplier: float = field(default=1.0, metadata=_meta(
        "Weight of this dataset's items in the loss: each item's flow-matching loss is multiplied by it, as "
        "ai-toolkit's loss_multiplier.", GE0))
    network_weight: float = field(default=1.0, metadata=_meta(
        "Strength of the trained LoRA while this dataset's items train (its update is multiplied by it; negative "
        "values train away from the data), as ai-toolkit; batches never mix values. Samples use strength 1.",
        Check(lambda v: v != 0, "non-zero")))
    mask_path: Optional[str] = field(default=None, metadata=_meta(
        "Folder of loss masks, one greyscale image per target with the same file name: the loss of each latent is "
        "weighted by the mask there (white 1, black mask_min_value; mean 1 per batch), as ai-toolkit. Cut, resized "
        "and mirrored with its target.", NON_EMPTY, normalize=_expand_home))
    mask_min_value: float = field(default=0.0, metadata=_meta(
        "Weight of black mask pixels: mask values v become mask_min_value + v * (1 - mask_min_value).", PROBABILITY))
    invert_mask: bool = field(default=False, metadata=_meta("Invert the masks (black counts fully, white least)."))
    trigger_word: Optional[str] = field(default=None, metadata=_meta(
        "Trigger word of this dataset's captions, in place of the process's trigger_word (which sample prompts "
        "keep using).", NON_EMPTY))
    keep_tokens: int = field(default=0, metadata=_meta(
        "token_dropout_rate never drops the first this many comma-separated caption parts.", GE0))
    token_dropout_rate: float = field(default=0.0, metadata=_meta(
        "Probability of dropping each comma-separated caption part (after the first keep_tokens) in a step, as "
        "ai-toolkit; the trigger word is added after dropout. Not with train.cache_text_embeddings.", PROBABILITY))
    random_crop: bool = field(default=False, metadata=_meta(
        "Cut each item at a random place along the side that does not fit its bucket, drawn anew every epoch "
        "(from seed, epoch and item), instead of at the centre, as ai-toolkit; the same cut for the target, its "
        "control images and mask. Not with latent caching."))
    is_reg: bool = field(default=False, metadata=_meta(
        "Regularisation data, as ai-toolkit: every other optimizer step (1, 3, 5, ...; not a step followed by a save "
        "or a sampling round) trains on these items instead of the others, with their own captions (the trigger word "
        "is not added), the LoRA on, and the loss times train.reg_weight. Sharded across processes like the rest."))
    val_folder_path: Optional[str] = field(default=None, metadata=_meta(
        "Held-out target images with captions, never trained on; their flow-matching loss is logged as val/loss "
        "every sample.sample_every steps and plotted by `run.py compare`.", NON_EMPTY, normalize=_expand_home,
        aliases=("validation_folder", "val_folder")))
    val_control_path: Optional[Union[str, list[str]]] = field(default=None, metadata=_meta(
        "Control images of the held-out pairs, matched to val_folder_path by file name; as many folders as "
        "control_path.", FOLDERS, normalize=_expand_folders, aliases=("validation_control_path", "val_control")))
    control_dropout_rate: float = field(default=0.0, metadata=_meta(
        "Probability of training an item without its control images (plain generation from the caption), so the "
        "LoRA keeps text-to-image. Drawn per item and epoch from train.seed (the same on every rank and after a "
        "resume); a batch trains without controls when its first item's draw says so (with train.batch_size 1: "
        "exactly per item; datasets with different rates never share a batch).", PROBABILITY,
        aliases=("prompt_image_dropout_rate",)))
    changed_region_loss: bool = field(default=False, metadata=_meta(
        "Weight the loss towards where the edit changes the image: per pixel |target - control| (first control "
        "image), blurred, scaled to [changed_region_floor, 1], mean 1; cut, resized and mirrored with the target "
        "and cached with its latents. Needs control_path; not with mask_path (a mask file sets the weights "
        "itself)."))
    changed_region_floor: float = field(default=0.1, metadata=_meta(
        "With changed_region_loss: weight of unchanged pixels relative to the most-changed ones.", PROBABILITY))
    changed_region_blur: int = field(default=8, metadata=_meta(
        "With changed_region_loss: Gaussian blur radius (sigma) in pixels of the bucket-sized difference map, so "
        "edges of an edit weigh too.", GE0))
    caption_per_line: bool = field(default=True, metadata=_meta(
        "A caption file of several non-empty lines holds several instructions for its pair: each epoch every item "
        "trains on one line, picked from train.seed (the same on every rank and after a resume); with "
        "train.cache_text_embeddings every line is cached. false: the whole file is one caption."))
    max_image_pixels: int = field(default=89_478_485, metadata=_meta(
        "Largest image (width x height, read from the header before any decoding) this dataset accepts; a larger "
        "file is reported by name before training (decompression-bomb guard; also PIL's MAX_IMAGE_PIXELS). "
        "Default: PIL's, about 9459 x 9459.", GE1))
