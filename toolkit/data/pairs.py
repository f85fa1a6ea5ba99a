"""Find (target, control, caption) pairs and check every file before any model is loaded.

A Kontext LoRA learns "control image + instruction -> target image", so every target in ``folder_path`` needs a
control image with the same file stem in ``control_path`` and a caption ``STEM.<caption_ext>`` next to it (or a
``default_caption``). ``control_path`` may list several folders: then every target needs one control image per
folder, each matched by file stem and checked like the first. Without ``control_path`` a dataset is plain images
with captions (text-to-image items with no control tokens, as ai-toolkit's Kontext example allows). All problems of all datasets are collected and raised
as ONE DatasetError: a user with 40 broken files should fix them in one pass, not in 40 runs that each load a 12 GB
model first.

Integrity checks are cheap (header + JPEG draft decode / PNG CRC check, in threads), not a full decode.
Hidden files (``.DS_Store``, macOS ``._name.jpg`` resource forks) and sub-folders are ignored.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

from toolkit.data.captions import read_caption
from toolkit.data.images import (DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, is_image_file, read_image_size,
                                 set_max_image_pixels, verify_image)
from toolkit.data.masks import find_masks
from toolkit.errors import DatasetError

logger = logging.getLogger(__name__)

MIN_SIDE_PX = 16  # one packed FLUX token is 16x16 pixels
_ASPECT_TOLERANCE = 0.01
# Image formats a user may expect to work; worth a warning when skipped (other files are silently ignored).
_UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl")


class DatasetConfigLike(Protocol):
    """The attributes of one dataset entry of the config that toolkit/data reads (duck-typed on purpose)."""

    folder_path: str
    control_path: Union[str, Sequence[str], None]
    caption_ext: str
    default_caption: Optional[str]
    caption_dropout_rate: float
    shuffle_tokens: bool
    resolution: Sequence[int]
    num_repeats: int
    cache_latents_to_disk: bool


@dataclass(frozen=True)
class Pair:
    """One training example. ``caption`` is the raw text (``[trigger]`` not yet applied); sizes are after EXIF
    rotation, as (width, height). ``dataset_index`` says which dataset entry (resolutions, caption options) it
    belongs to."""

    target: Path
    control: Optional[Path]  # None: a dataset without control_path (no control image at all)
    caption: str
    target_size: tuple[int, int]
    control_size: Optional[tuple[int, int]]
    dataset_index: int = 0
    extra_controls: tuple[Path, ...] = ()  # the 2nd, 3rd ... control images (control_path lists several folders)
    extra_control_sizes: tuple[tuple[int, int], ...] = ()
    mask: Optional[Path] = None  # loss mask (dataset mask_path), same stem as the target
    mask_size: Optional[tuple[int, int]] = None

    @property
    def controls(self) -> tuple[Path, ...]:
        """Every control image, in sequence order (position-id frames 1, 2, ...); () without control_path."""
        return () if self.control is None else (self.control, *self.extra_controls)

    @property
    def control_sizes(self) -> tuple[tuple[int, int], ...]:
        return () if self.control_size is None else (self.control_size, *self.extra_control_sizes)


def control_folders(value: Union[str, Sequence[str], None]) -> list[str]:
    """``control_path`` as a list of folders (one folder or a list of them; None or blank -> [])."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _check_folder(raw: Optional[str], key: str, problems: list[str]) -> Optional[Path]:
    """The folder as a Path, or None after recording why it cannot be used."""
    if raw is None or not str(raw).strip():
        return None
    folder = Path(raw).expanduser().absolute()
    if not folder.exists():
        problems.append(f"{folder}: folder does not exist ({key})")
        return None
    if not folder.is_dir():
        problems.append(f"{folder}: is not a folder ({key})")
        return None
    return folder


def _list_images(folder: Path, key: str, problems: list[str]) -> dict[str, Path]:
    """Images of a folder by file stem. Two images with one stem are a problem: the stem is what pairs them."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    ignored: list[str] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        problems.append(f"{folder}: cannot list folder ({err.strerror or err}) ({key})")
        return {}
    for entry in entries:
        if entry.name.startswith(".") or entry.is_dir():
            continue
        if is_image_file(entry):
            by_stem[entry.stem].append(entry)
        elif entry.suffix.lower() in _UNSUPPORTED_IMAGE_EXTENSIONS:
            ignored.append(entry.name)
    if ignored:
        logger.warning(
            "%s: ignoring %d image(s) in formats other than %s, e.g. %s; convert them to train on them",
            folder, len(ignored), "/".join(IMAGE_EXTENSIONS), ", ".join(ignored[:3]),
        )
    for stem, files in by_stem.items():
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            problems.append(
                f"{folder}: several images share the name '{stem}' ({names}); keep one, the file name (stem) is "
                f"what pairs targets, controls and captions"
            )
    return {stem: files[0] for stem, files in by_stem.items()}


def _verify_all(paths: Sequence[Path], max_pixels: int, key: str) -> dict[Path, Union[tuple[int, int], str]]:
    """Size of each image, or the reason it is unusable. Threads: PIL releases the GIL while decoding."""

    def check(path: Path) -> Union[tuple[int, int], str]:
        try:
            width, height = read_image_size(path)  # the header only: a bomb is refused before any decoding
            if width * height > max_pixels:
                return (f"{path}: image is {width}x{height} = {width * height:,} pixels, above {key}.max_image_pixels "
                        f"({max_pixels:,}); a decompression bomb, or far larger than training needs: downscale it "
                        "or raise the limit")
            width, height = verify_image(path)
        except DatasetError as err:
            return str(err)
        if width < MIN_SIDE_PX or height < MIN_SIDE_PX:
            return f"{path}: image is {width}x{height} px; both sides must be at least {MIN_SIDE_PX} px"
        return (width, height)

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(check, paths)))


def _case_hint(stem: str, others: dict[str, Path]) -> str:
    """Point at a near miss that differs only in letter case (datasets made on macOS/Windows)."""
    for other_stem, other in others.items():
        if other_stem.lower() == stem.lower():
            return f" (found '{other.name}', which differs only in letter case)"
    return ""


def _caption_for(
    target: Path, cfg: DatasetConfigLike, key: str, problems: list[str]
) -> Optional[str]:
    """Raw caption text for a target, or None after recording the problem."""
    ext = cfg.caption_ext.lstrip(".")
    caption_path = target.with_name(f"{target.stem}.{ext}")
    if caption_path.is_file():
        try:
            return read_caption(caption_path)
        except DatasetError as err:
            problems.append(str(err))
            return None
    if cfg.default_caption is not None:
        return cfg.default_caption
    problems.append(
        f"{target}: no caption file; add {caption_path.name} next to it or set default_caption ({key}.default_caption)"
    )
    return None


def _control_keys(cfg: DatasetConfigLike, key: str) -> list[str]:
    """Key path of each control folder: `control_path`, or `control_path[k]` when it is a list."""
    folders = control_folders(cfg.control_path)
    if isinstance(cfg.control_path, str):
        return [f"{key}.control_path"]
    return [f"{key}.control_path[{k}]" for k in range(len(folders))]


def _check_settings(
    cfg: DatasetConfigLike, key: str, problems: list[str]
) -> tuple[Optional[Path], list[Optional[Path]]]:
    """The usable target folder and control folders (None when unusable, with the reason recorded)."""
    folder = _check_folder(cfg.folder_path, f"{key}.folder_path", problems)
    if cfg.folder_path is None or not str(cfg.folder_path).strip():
        problems.append(f"{key}.folder_path is empty; set it to the folder of target images and captions")
    raw_controls = control_folders(cfg.control_path)
    if raw_controls and not any(str(raw).strip() for raw in raw_controls):
        problems.append(f"{key}.control_path is empty; set it to the folder of control (input) images named like "
                        f"their targets in {cfg.folder_path}, or remove it to train on the images alone")
    control_dirs: list[Optional[Path]] = []
    for raw, control_key in zip(raw_controls, _control_keys(cfg, key)):
        if len(raw_controls) > 1 and not str(raw).strip():
            problems.append(f"{control_key} is empty; set it to a folder of control images or remove it")
        control_dir = _check_folder(raw, control_key, problems)
        if folder is not None and control_dir is not None and control_dir.resolve() == folder.resolve():
            problems.append(f"{folder}: folder_path and control_path are the same folder ({control_key}); "
                            "controls must be separate")
            control_dir = None
        control_dirs.append(control_dir)
    return folder, control_dirs


def _match(
    targets: dict[str, Path], controls: dict[str, Path], folder: Path, control_dir: Path, problems: list[str]
) -> None:
    """Record every target without a control and every control without a target."""
    for stem in sorted(set(targets) - set(controls)):
        problems.append(
            f"{targets[stem]}: no control image named '{stem}.*' in {control_dir}{_case_hint(stem, controls)}"
        )
    for stem in sorted(set(controls) - set(targets)):
        problems.append(
            f"{controls[stem]}: control image has no target named '{stem}.*' in {folder}{_case_hint(stem, targets)}"
        )


def _list_controls(control_dirs: Sequence[Optional[Path]], keys: Sequence[str], folder: Optional[Path],
                   targets: dict[str, Path], problems: list[str]) -> list[dict[str, Path]]:
    """The images of each control folder by stem, each folder matched against the targets."""
    images = "/".join(IMAGE_EXTENSIONS)
    all_controls: list[dict[str, Path]] = []
    for control_dir, control_key in zip(control_dirs, keys):
        controls = _list_images(control_dir, control_key, problems) if control_dir else {}
        if control_dir and not controls:
            problems.append(f"{control_dir}: no {images} images in the folder ({control_key})")
        if folder and control_dir and targets and controls:
            _match(targets, controls, folder, control_dir, problems)
        all_controls.append(controls)
    return all_controls


def _discover_one(cfg: DatasetConfigLike, index: int, key: str, problems: list[str]) -> list[Pair]:
    """Pairs of one dataset entry; appends every problem found to ``problems``.

    Files are checked even when the other folder is unusable, so one run reports everything there is to fix.
    """
    folder, control_dirs = _check_settings(cfg, key, problems)
    images = "/".join(IMAGE_EXTENSIONS)
    targets = _list_images(folder, f"{key}.folder_path", problems) if folder else {}
    if folder and not targets:
        problems.append(f"{folder}: no {images} images in the folder ({key}.folder_path)")
    all_controls = _list_controls(control_dirs, _control_keys(cfg, key), folder, targets, problems)

    sizes = _verify_all(sorted({*targets.values(), *(p for c in all_controls for p in c.values())}),
                        getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS), key)
    problems.extend(result for result in sizes.values() if isinstance(result, str))
    captions = {stem: _caption_for(path, cfg, key, problems) for stem, path in sorted(targets.items())}
    masks = find_masks(getattr(cfg, "mask_path", None), targets, f"{key}.mask_path", problems)

    pairs: list[Pair] = []
    # Without control_path every target is an item; with it, only targets that every control folder has.
    stems = set(targets).intersection(*all_controls)
    for stem in sorted(stems):
        controls = [c[stem] for c in all_controls] or [None]
        control_sizes = [sizes[c] if c is not None else None for c in controls]
        target_size, caption = sizes[targets[stem]], captions[stem]
        if isinstance(target_size, str) or any(isinstance(s, str) for s in control_sizes) or caption is None:
            continue
        mask, mask_size = masks.get(stem, (None, None))
        pairs.append(Pair(targets[stem], controls[0], caption, target_size, control_sizes[0], index,
                          tuple(controls[1:]), tuple(control_sizes[1:]), mask, mask_size))
    if folder:
        _log_warnings(pairs, cfg, folder)
    return pairs


def _log_warnings(pairs: Sequence[Pair], cfg: DatasetConfigLike, folder: Path) -> None:
    """Legal but surprising situations, as one count per kind instead of one line per file."""
    if not pairs:
        return
    smallest = min(cfg.resolution) if cfg.resolution else 0
    small = [p for p in pairs if p.target_size[0] * p.target_size[1] < smallest * smallest]
    if small:
        logger.warning(
            "%s: %d of %d target images have fewer pixels than %dx%d; they train at their own size (no upscaling), "
            "e.g. %s", folder, len(small), len(pairs), smallest, smallest, small[0].target.name,
        )
    target_aspect = {p.target: p.target_size[0] / p.target_size[1] for p in pairs}
    stretched = [
        control for p in pairs for control, (w, h) in zip(p.controls, p.control_sizes)
        if abs(target_aspect[p.target] / (w / h) - 1) > _ASPECT_TOLERANCE
    ]
    if stretched:
        logger.warning(
            "%s: %d control images have a different aspect ratio than their target; they are stretched to the "
            "target's crop, e.g. %s", folder, len(stretched), stretched[0],
        )
    empty = [p for p in pairs if not p.caption]
    if empty:
        logger.warning("%s: %d captions are empty, e.g. for %s", folder, len(empty), empty[0].target.name)


def format_problems(problems: Sequence[str]) -> str:
    """The DatasetError message: a count, then one problem per line."""
    lines = "\n".join(f"  - {problem}" for problem in problems)
    noun, them = ("problem", "it") if len(problems) == 1 else ("problems", "them")
    return f"The dataset has {len(problems)} {noun}; fix {them} and run again:\n{lines}"


def discover_pairs(
    datasets: Sequence[DatasetConfigLike], config_path_prefix: str = "config.process[0].datasets"
) -> list[Pair]:
    """All pairs of all dataset entries, sorted by target path. Raises one DatasetError listing every problem."""
    started = time.perf_counter()
    problems: list[str] = []
    pairs: list[Pair] = []
    if not datasets:
        problems.append(f"{config_path_prefix} is empty; add at least one dataset with folder_path (and control_path)")
    # While checking, each dataset's own limit applies (header read first, nothing decoded above it); afterwards
    # PIL's process-wide guard (Image.MAX_IMAGE_PIXELS) protects every later decode.
    set_max_image_pixels(None)
    try:
        for index, cfg in enumerate(datasets):
            pairs.extend(_discover_one(cfg, index, f"{config_path_prefix}[{index}]", problems))
    finally:
        set_max_image_pixels(max((getattr(d, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS) for d in datasets),
                                 default=DEFAULT_MAX_IMAGE_PIXELS))
    if problems:
        raise DatasetError(format_problems(problems))
    pairs.sort(key=lambda pair: (str(pair.target), pair.dataset_index))
    logger.info(
        "Found %d image pairs in %d dataset(s), checked in %.1f s",
        len(pairs), len(datasets), time.perf_counter() - started,
    )
    return pairs
