"""Cross-field checks of a loaded job config: the problems no single field's type or rule can see, each returned as
``key.path: message`` (the loader reports them all at once)."""

from __future__ import annotations

import os

from toolkit.config.schema import (CaptionProcessConfig, DatasetConfig, GenerateProcessConfig, JobConfig, NetworkConfig, TrainProcessConfig,
                                   folder_list)
from toolkit.config.caption_schema import PAIR_TYPES
from toolkit.train.lr_schedule import schedule_problems
from toolkit.train.stages import full_finetune_problems, stage_problems

__all__ = ["validate_job"]


def validate_job(job: JobConfig) -> list[str]:
    """Return the problems that involve more than one field, each as ``key.path: message``."""
    problems: list[str] = []
    for index, process in enumerate(job.config.process):
        path = f"config.process[{index}]"
        if isinstance(process, CaptionProcessConfig):
            problems += _caption_problems(process, path)
        else:
            problems += (_generate_problems(process, path) if isinstance(process, GenerateProcessConfig)
                         else _process_problems(process, path))
    return problems + stage_problems(job.config.name, job.config.process)


def _caption_problems(process: CaptionProcessConfig, path: str) -> list[str]:
    """A pair captioner needs control images; a single-image captioner would ignore them."""
    pairs = process.type in PAIR_TYPES
    if pairs and not folder_list(process.caption.control_path):
        return [f"{path}.caption.control_path: type {process.type} needs the folder(s) of control images (the "
                "targets are in caption.path_to_caption); for single images use type captioner"]
    if not pairs and folder_list(process.caption.control_path):
        return [f"{path}.caption.control_path: type {process.type} describes single images and would ignore "
                "control images; use type pair_captioner or remove control_path"]
    return []


def _generate_problems(process: GenerateProcessConfig, path: str) -> list[str]:
    """Cross-field problems of one generate process."""
    gen = process.generate
    problems: list[str] = []
    if (gen.width is None) != (gen.height is None):
        problems.append(f"{path}.generate.width: set width and height together, or neither")
    if not process.loras and not gen.include_base:
        problems.append(f"{path}.generate.include_base: false with no loras would render nothing")
    seen: dict[str, int] = {}
    for index, lora in enumerate(process.loras):
        name = lora.name or os.path.splitext(os.path.basename(lora.path))[0]
        if name in ("base", "control"):
            problems.append(f"{path}.loras[{index}].name: {name!r} names another contact-sheet column; "
                            "set another name")
        elif name in seen:
            problems.append(f"{path}.loras[{index}].name: {name!r} is already used by loras[{seen[name]}]; "
                            "set a distinct name")
        seen.setdefault(name, index)
    return problems


def _process_problems(process: TrainProcessConfig, path: str) -> list[str]:
    """Cross-field problems of one process; ``path`` is the process's key path."""
    train, save = process.train, process.save
    problems: list[str] = []
    if process.sample.sampler != train.noise_scheduler:
        problems.append(f"{path}.sample.sampler: must equal train.noise_scheduler "
                        f"({train.noise_scheduler!r}), got {process.sample.sampler!r}")
    if train.train_text_encoder:
        problems.append(f"{path}.train.train_text_encoder: training the text encoder is not supported; "
                        "set it to false")
    if not train.train_unet and process.network is not None:
        problems.append(f"{path}.train.train_unet: false would train nothing, because the LoRA is on the "
                        "transformer; set it to true")
    problems += schedule_problems(train.lr_scheduler, train.lr_scheduler_params, train.lr_warmup_steps,
                                  train.steps, f"{path}.train")
    if process.network is not None:  # null: a full fine-tune
        problems += _network_problems(process.network, f"{path}.network")
    if train.diff_output_preservation:
        if not process.trigger_word:
            problems.append(f"{path}.train.diff_output_preservation: needs trigger_word (it is replaced by "
                            "diff_output_preservation_class in the preservation captions)")
        if process.network is None or train.full_finetune:
            problems.append(f"{path}.train.diff_output_preservation: needs a LoRA or LoKr network (the base "
                            "model's prediction is the LoRA switched off); a full fine-tune has none")
        if process.model.trim_text_tokens:
            problems.append(f"{path}.model.trim_text_tokens: cannot be combined with train.diff_output_preservation "
                            "(its two captions train in one batch of one text length)")
    if save.push_to_hub and not save.hf_repo_id:
        problems.append(f"{path}.save.hf_repo_id: required when save.push_to_hub is true ('namespace/name')")
    return (problems + _dataset_problems(process.datasets, f"{path}.datasets") + _cache_problems(process, path)
            + full_finetune_problems(process, path))


def _network_problems(network: NetworkConfig, path: str) -> list[str]:
    """Options that only one adapter kind has."""
    problems: list[str] = []
    if network.type == "lokr" and network.dropout:
        problems.append(f"{path}.dropout: peft's LoKr has no input dropout; set it to 0 for type lokr")
    if network.type == "lora":
        if network.lokr_factor != -1:
            problems.append(f"{path}.lokr_factor: only used by type lokr; remove it or set type: lokr")
    return problems


def _cache_problems(process: TrainProcessConfig, path: str) -> list[str]:
    """Caches the trainer cannot honour: shuffled captions have too many variants to pre-encode, and a batch may mix
    datasets, so all of them or none give cached latents."""
    problems: list[str] = []
    if process.train.cache_text_embeddings:
        for index, dataset in enumerate(process.datasets):
            if dataset.shuffle_tokens:
                problems.append(f"{path}.datasets[{index}].shuffle_tokens: cannot be combined with "
                                "train.cache_text_embeddings (every shuffled order would need its own embedding); "
                                "turn one of them off")
            if dataset.token_dropout_rate > 0:
                problems.append(f"{path}.datasets[{index}].token_dropout_rate: cannot be combined with "
                                "train.cache_text_embeddings (every caption with parts dropped would need its own "
                                "embedding); set it to 0 or turn the cache off")
    cached = [d.cache_latents or d.cache_latents_to_disk for d in process.datasets]
    for index, dataset in enumerate(process.datasets):
        if dataset.random_crop and cached[index]:
            problems.append(f"{path}.datasets[{index}].random_crop: cannot be combined with cache_latents / "
                            "cache_latents_to_disk (every epoch cuts a new crop, so its latents differ); turn one "
                            "of them off")
    if any(cached) and not all(cached):
        index = cached.index(False)
        problems.append(f"{path}.datasets[{index}].cache_latents: other datasets cache their latents and a batch may "
                        "mix datasets; set cache_latents or cache_latents_to_disk on every dataset, or on none")
    return problems


def _dataset_problems(datasets: list[DatasetConfig], path: str) -> list[str]:
    """Datasets that repeat a folder, or use their target folder as control folder; only regularisation data."""
    problems: list[str] = []
    if datasets and all(d.is_reg for d in datasets):
        problems.append(f"{path}: every dataset has is_reg: true; regularisation data only accompanies training "
                        "data, so at least one dataset must have is_reg: false")
    first_index: dict[str, int] = {}
    for index, dataset in enumerate(datasets):
        folder = os.path.normpath(dataset.folder_path)
        if folder in first_index:
            problems.append(f"{path}[{index}].folder_path: {dataset.folder_path!r} is already used by "
                            f"datasets[{first_index[folder]}]")
        first_index.setdefault(folder, index)
        problems += _control_problems(dataset, folder, f"{path}[{index}]")
        problems += _edit_option_problems(dataset, f"{path}[{index}]")
    # Datasets may differ in their number of control images (none, one, several): batches never mix them.
    for index, dataset in enumerate(datasets):
        paired = dataset.control_path is not None
        if paired and (dataset.val_folder_path is None) != (dataset.val_control_path is None):
            problems.append(f"{path}[{index}].val_folder_path: set val_folder_path and val_control_path together")
        if not paired and dataset.val_control_path is not None:
            problems.append(f"{path}[{index}].val_control_path: the dataset has no control_path, so its held-out "
                            "images have no control images either; remove val_control_path")
        if dataset.val_folder_path is not None and os.path.normpath(dataset.val_folder_path) in first_index:
            problems.append(f"{path}[{index}].val_folder_path: {dataset.val_folder_path!r} is a training folder; "
                            "held-out pairs must not be trained on")
    return problems


def _control_problems(dataset: DatasetConfig, folder: str, path: str) -> list[str]:
    """Control folders that repeat the target folder or each other; held-out pairs with another control count."""
    problems: list[str] = []
    controls = folder_list(dataset.control_path)
    several = isinstance(dataset.control_path, list)
    seen: dict[str, int] = {}
    for k, control in enumerate(controls):
        key = f"{path}.control_path" + (f"[{k}]" if several else "")
        normalized = os.path.normpath(control)
        if normalized == folder:
            problems.append(f"{key}: must differ from folder_path ({dataset.folder_path!r}); control images are the "
                            "inputs, not the targets")
        elif normalized in seen:
            problems.append(f"{key}: {control!r} is already control_path[{seen[normalized]}]; each control image "
                            "comes from its own folder")
        seen.setdefault(normalized, k)
    val_controls = folder_list(dataset.val_control_path)
    if val_controls and controls and len(val_controls) != len(controls):
        problems.append(f"{path}.val_control_path: has {len(val_controls)} folder(s) but control_path has "
                        f"{len(controls)}; held-out pairs need as many control images as the training pairs")
    return problems


def _edit_option_problems(dataset: DatasetConfig, path: str) -> list[str]:
    """Edit-pair options that need control images, or that would override each other."""
    problems: list[str] = []
    for key in ("changed_region_loss", "control_dropout_rate"):
        if getattr(dataset, key) and dataset.control_path is None:
            problems.append(f"{path}.{key}: the dataset has no control_path (plain images have no control image to "
                            "compare with or drop); remove the option or set control_path")
    if dataset.changed_region_loss and dataset.mask_path is not None:
        problems.append(f"{path}.changed_region_loss: cannot be combined with mask_path (both set the loss weights); "
                        "keep one of them")
    return problems
