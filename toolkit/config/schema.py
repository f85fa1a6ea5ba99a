"""Typed config schema of a training job, in ai-toolkit's YAML shape (job -> config -> process[]).

Every field carries ``metadata["help"]``, a one-line docstring printed by ``--help-config``. The loader
(``loader.py``) also reads these optional metadata keys:

- ``checks``: rules (``Check``) the converted value must pass; ``item_checks``: rules for each list item.
- ``coerce``: applied to the raw YAML value before type conversion (e.g. a bare int -> ``[int]``).
- ``normalize``: applied to the converted value before the checks (e.g. strip a leading dot).
- ``aliases``: names users may write by mistake (from other trainers); only used for did-you-mean hints.

Field-level rules live here; rules that relate several fields live in ``checks.validate_job``;
``help.config_help`` renders all of it for ``--help-config``.
"""

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from toolkit.config.caption_schema import CaptionConfig, CaptionProcessConfig
from toolkit.config.dataset_schema import DatasetConfig
from toolkit.config.fields import (Check, _meta, _expand_home, folder_list, GT0, GE0, NON_EMPTY, SIZE16, DEVICE,
                                   FILE_NAME, DROPOUT, T5_LENGTH, HUB_REPO_ID)
from toolkit.config.trackers_schema import TrackersConfig
from toolkit.config.train_schema import EMAConfig, TrainConfig, TrainDType

__all__ = [
    "CaptionConfig", "CaptionProcessConfig", "Check", "DatasetConfig", "EMAConfig", "GenerateConfig",
    "GenerateProcessConfig", "JobConfig", "LoraFileConfig", "ModelConfig", "NetworkConfig", "RootConfig",
    "SampleConfig", "SaveConfig", "TrackersConfig", "TrainConfig", "TrainProcessConfig",
    "folder_list",
]


SaveDType = Literal["float16", "fp16", "bfloat16", "bf16", "float32", "fp32"]


@dataclass(kw_only=True)
class NetworkConfig:
    """The adapter trained on top of the frozen model."""

    type: Literal["lora", "lokr"] = field(default="lora", metadata=_meta(
        "Adapter kind: 'lora', or 'lokr' (peft's LoKr: a Kronecker product of two small matrices, both full with "
        "lokr_full_rank, else the larger one low-rank with rank `linear`; saved with ComfyUI's lokr_w1/lokr_w2 "
        "keys)."))
    linear: int = field(default=16, metadata=_meta("LoRA rank.", GT0, aliases=("rank", "r", "network_dim")))
    linear_alpha: float = field(default=16.0, metadata=_meta(
        "LoRA alpha; the LoRA update is scaled by linear_alpha / linear.", GT0,
        aliases=("alpha", "lora_alpha", "network_alpha")))
    dropout: float = field(default=0.0, metadata=_meta(
        "Dropout on the LoRA input during training.", DROPOUT, aliases=("lora_dropout",)))
    target_modules: Optional[list[str]] = field(default=None, metadata=_meta(
        "Module names to wrap with LoRA (peft target_modules); null uses the architecture's default.", NON_EMPTY))
    lokr_factor: int = field(default=-1, metadata=_meta(
        "LoKr only: Kronecker factor of each layer's sizes (ai-toolkit's key); -1 picks the most balanced split.",
        Check(lambda v: v == -1 or v >= 1, "-1 or >= 1"), aliases=("factor", "decompose_factor")))
    lokr_full_rank: bool = field(default=True, metadata=_meta(
        "LoKr only: keep both Kronecker factors full matrices (no low-rank split; linear and linear_alpha are "
        "then unused). Default true, as ai-toolkit reads it; false makes the larger factor low-rank with rank "
        "linear."))
    pretrained_lora: Optional[str] = field(default=None, metadata=_meta(
        "Start from this adapter file (.safetensors, diffusers/peft or ComfyUI/kohya keys; a LoKr file for "
        "type lokr) instead of a zero update; its rank and modules must match this network. A resumed run "
        "restores its trained weights instead.", NON_EMPTY, normalize=_expand_home,
        aliases=("pretrained_lora_path", "lora_path", "init_lora", "network_weights")))


@dataclass(kw_only=True)
class SaveConfig:
    """When and how checkpoints of the LoRA are written."""

    dtype: SaveDType = field(default="float16", metadata=_meta("Precision of the saved LoRA weights."))
    format: Literal["diffusers", "comfy"] = field(default="diffusers", metadata=_meta(
        "Key layout of saved LoRA files: 'diffusers' (transformer.*.lora_A/B; diffusers, ComfyUI, ai-toolkit) or "
        "'comfy' (kohya lora_unet_* with the original model's names; ComfyUI, Forge, kohya, diffusers). LoKr files "
        "always have ComfyUI's lokr keys, named transformer.* (diffusers) or lycoris_* (comfy).",
        aliases=("save_format", "lora_format")))
    save_every: int = field(default=250, metadata=_meta("Save a checkpoint every this many steps.", GT0))
    max_step_saves_to_keep: int = field(default=4, metadata=_meta(
        "How many intermediate step checkpoints to keep; older ones are pruned.", GE0))
    push_to_hub: bool = field(default=False, metadata=_meta(
        "After the final save, upload the final LoRA, the latest samples and a generated model card (README.md) "
        "to hf_repo_id on the Hugging Face Hub; the token (HF_TOKEN in the environment or .env, or `hf auth "
        "login`) and its write access are checked before any model loads. Retry: python run.py push RUN_FOLDER.",
        aliases=("upload_to_hub", "push_to_huggingface")))
    hf_repo_id: Optional[str] = field(default=None, metadata=_meta(
        "Hub repository 'namespace/name' (your user name or an organisation) that push_to_hub uploads to; "
        "created when missing.", HUB_REPO_ID, aliases=("hub_model_id", "hub_repo_id", "repo_id")))
    hf_private: bool = field(default=True, metadata=_meta(
        "Create the Hub repository as private (ai-toolkit defaults to public; an existing repository keeps its "
        "visibility).", aliases=("hub_private_repo", "private")))


@dataclass(kw_only=True)
class ModelConfig:
    """The frozen base model."""

    name_or_path: str = field(metadata=_meta(
        "Hub id or local folder (diffusers format) of the base model.", NON_EMPTY, normalize=_expand_home,
        aliases=("pretrained_model_name_or_path", "path", "model_path")))
    arch: str = field(metadata=_meta(
        "Architecture name, e.g. flux_kontext; checked against the architecture registry.", NON_EMPTY))
    quantize: bool = field(default=False, metadata=_meta(
        "Quantize the frozen transformer's linear weights to 8 bit (optimum-quanto; proj_out, x_embedder, "
        "context_embedder and norm_out.linear stay full precision); the LoRA trains on top in fp32."))
    qtype: Literal["qfloat8", "qint8"] = field(default="qfloat8", metadata=_meta(
        "8-bit format of quantize and quantize_te: qfloat8 (float8 e4m3) or qint8 (int8 with a scale per row).",
        aliases=("quantize_type", "qtype_weights")))
    quantize_te: bool = field(default=False, metadata=_meta(
        "Also quantize the T5 text encoder (text_encoder_2) with qtype.", aliases=("quantize_text_encoder",)))
    low_vram: bool = field(default=False, metadata=_meta(
        "Load the transformer block by block on the CPU, quantizing each block there (with quantize) before moving "
        "it to the device, so the device never holds the full-precision transformer; slower to load."))
    max_sequence_length: int = field(default=512, metadata=_meta(
        "T5 prompt length in tokens; shorter is faster.", T5_LENGTH))
    trim_text_tokens: bool = field(default=False, metadata=_meta(
        "Train on each batch's T5 embeddings cut after its longest caption (its T5 token count rounded up to a "
        "multiple of 64) instead of all max_sequence_length padded tokens: fewer tokens per step (512 px: 2560 -> "
        "2112 with 64 kept). The embeddings are still encoded at max_sequence_length, as the pipeline does; what "
        "changes is that image and text tokens no longer attend to the cut padding tokens, which FLUX attends to "
        "at inference (it has no text attention mask), so the LoRA trains on slightly other inputs than it is used "
        "with. Training only: samples use the full length. flux_kontext only; not with diff_output_preservation."))
    match_target_res: bool = field(default=False, metadata=_meta(
        "Encode the control images for the transformer at the target's size instead of the architecture's fixed "
        "reference size (Qwen-Image-Edit-Plus: about 1024x1024 pixels, as its pipeline does); much cheaper for small "
        "targets, but samples then differ from the upstream pipeline's (ai-toolkit's model_kwargs.match_target_res). "
        "An error for architectures that always use the target's size (flux_kontext)."))
    transformer_path: Optional[str] = field(default=None, metadata=_meta(
        "A diffusers transformer folder (config.json + safetensors) used instead of the base model's transformer, "
        "e.g. a full fine-tune's <run folder>/transformer; '[process:N]' means the final transformer of the earlier "
        "full fine-tune config.process[N] of this job (training stages).", NON_EMPTY, normalize=_expand_home,
        aliases=("transformer", "transformer_folder", "resume_from_stage")))


@dataclass(kw_only=True)
class SampleConfig:
    """Sample images generated during training."""

    sampler: Literal["flowmatch"] = field(default="flowmatch", metadata=_meta(
        "Sampling scheduler; must match train.noise_scheduler."))
    sample_every: int = field(default=250, metadata=_meta("Generate samples every this many steps.", GT0))
    sample_start_step: int = field(default=0, metadata=_meta(
        "No periodic samples before this step (ai-toolkit's rule: steps >= it that are multiples of sample_every); "
        "the before-training and final samples are still made.", GE0))
    width: int = field(default=1024, metadata=_meta(
        "Sample width in pixels; width x height is the pixel area of a sample, whose aspect ratio follows its "
        "control image (a prompt's --w/--h set an exact size).", SIZE16))
    height: int = field(default=1024, metadata=_meta("Sample height in pixels; see width.", SIZE16))
    prompts: list[str] = field(default_factory=list, metadata=_meta(
        "Sample prompts; flags such as --ctrl_img PATH may follow the text; [trigger] becomes trigger_word."))
    neg: str = field(default="", metadata=_meta("Negative prompt (unused by FLUX).", aliases=("negative_prompt",)))
    seed: int = field(default=42, metadata=_meta("Seed of the first sample prompt."))
    walk_seed: bool = field(default=True, metadata=_meta(
        "Add the prompt index to the seed so each prompt gets its own seed."))
    guidance_scale: float = field(default=4.0, metadata=_meta("Guidance value used when sampling.", GE0))
    sample_steps: int = field(default=20, metadata=_meta(
        "Denoising steps per sample.", GT0, aliases=("num_inference_steps", "steps")))
    metric_steps: int = field(default=8, metadata=_meta(
        "Denoising steps of the edit metrics (PSNR, SSIM and their keep-region variants, README 'Edit metrics'): "
        "every sample_every steps each held-out pair (datasets[].val_folder_path) is rendered with this many steps "
        "and compared with its target; 0 turns the edit metrics off.", GE0))


@dataclass(kw_only=True)
class TrainProcessConfig:
    """One training process: what to train, on which data, and how."""

    type: Literal["sd_trainer"] = field(default="sd_trainer", metadata=_meta(
        "Process kind; only 'sd_trainer' (LoRA training) exists."))
    training_folder: str = field(default="output", metadata=_meta(
        "Folder in which the run folder <training_folder>/<name> is created.", NON_EMPTY,
        normalize=_expand_home, aliases=("output_dir",)))
    device: str = field(default="cuda:0", metadata=_meta(
        "Torch device: cpu, cuda, cuda:N, mps, or auto to pick the best available.", DEVICE))
    trigger_word: Optional[str] = field(default=None, metadata=_meta(
        "Word that replaces [trigger] in captions and sample prompts; unset removes [trigger].", NON_EMPTY))
    performance_log_every: int = field(default=0, metadata=_meta(
        "Log step timings every this many steps; 0 turns it off.", GE0))
    log_every: int = field(default=10, metadata=_meta(
        "Steps between logged scalars (loss, learning rate).", GT0))
    name: Optional[str] = field(default=None, metadata=_meta(
        "Run folder and file prefix of this process (<training_folder>/<name>); null uses config.name. Set it when "
        "a job has several training processes (stages), e.g. '[name]_stage2'.", NON_EMPTY, FILE_NAME))
    network: Optional[NetworkConfig] = field(default_factory=NetworkConfig, metadata=_meta(
        "The adapter to train; null trains the transformer's own weights (full fine-tune, as train.full_finetune)."))
    save: SaveConfig = field(default_factory=SaveConfig, metadata=_meta("Checkpoint saving."))
    datasets: list[DatasetConfig] = field(metadata=_meta("Training data folders (at least one).", NON_EMPTY))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_meta("Optimisation settings."))
    model: ModelConfig = field(metadata=_meta("The base model."))
    sample: SampleConfig = field(default_factory=SampleConfig, metadata=_meta("Sample images during training."))
    trackers: TrackersConfig = field(default_factory=TrackersConfig, metadata=_meta(
        "Experiment trackers (Weights & Biases, MLflow) besides TensorBoard."))


@dataclass(kw_only=True)
class LoraFileConfig:
    """One LoRA file used by a generate process."""

    path: str = field(metadata=_meta(
        "LoRA .safetensors file, in diffusers or ComfyUI/kohya layout.", NON_EMPTY, normalize=_expand_home))
    scale: float = field(default=1.0, metadata=_meta(
        "Strength: multiplies the LoRA's update (1 = as trained).", aliases=("weight", "strength", "lora_scale")))
    name: Optional[str] = field(default=None, metadata=_meta(
        "Column title and file-name part of its images; null uses the file name without extension.",
        NON_EMPTY, FILE_NAME))


@dataclass(kw_only=True)
class GenerateConfig:
    """What a generate process renders: every prompt on every control image."""

    prompts: list[str] = field(metadata=_meta(
        "Prompts; flags as in sample.prompts (--ctrl_img, --seed, --w, --h, --cfg, --steps) may follow the text; "
        "[trigger] becomes trigger_word.", NON_EMPTY))
    ctrl_img: Optional[str] = field(default=None, metadata=_meta(
        "Control image, or a folder of them, for the prompts without --ctrl_img.", NON_EMPTY,
        normalize=_expand_home, aliases=("control", "control_path", "ctrl_img_folder")))
    width: Optional[int] = field(default=None, metadata=_meta(
        "Output width in pixels; null (with height null) keeps each control image's aspect ratio at about "
        "1 megapixel.", SIZE16))
    height: Optional[int] = field(default=None, metadata=_meta("Output height in pixels; see width.", SIZE16))
    sample_steps: int = field(default=28, metadata=_meta(
        "Denoising steps per image.", GT0, aliases=("num_inference_steps", "steps")))
    guidance_scale: float = field(default=2.5, metadata=_meta(
        "Guidance value (FLUX Kontext's guidance embedding).", GE0, aliases=("cfg", "guidance")))
    seed: int = field(default=42, metadata=_meta(
        "Seed of every image, so the base model and each LoRA start from the same noise."))
    batch_size: int = field(default=1, metadata=_meta(
        "Images of the same size rendered together; faster on a GPU, needs more memory.", GT0))
    include_base: bool = field(default=True, metadata=_meta(
        "Also render with no LoRA (the base model column of the contact sheet)."))


@dataclass(kw_only=True)
class GenerateProcessConfig:
    """A generate process: render prompts on control images with the base model and each LoRA."""

    type: Literal["generate"] = field(default="generate", metadata=_meta("Process kind: 'generate'."))
    output_folder: str = field(default="output", metadata=_meta(
        "Images and contact sheets go to <output_folder>/<name>.", NON_EMPTY, normalize=_expand_home,
        aliases=("output_dir", "training_folder")))
    device: str = field(default="auto", metadata=_meta(
        "Torch device: cpu, cuda, cuda:N, mps, or auto to pick the best available.", DEVICE))
    dtype: TrainDType = field(default="bf16", metadata=_meta(
        "Compute dtype of the model weights (float32 on CPU, where half precision is slow)."))
    trigger_word: Optional[str] = field(default=None, metadata=_meta(
        "Word that replaces [trigger] in the prompts; unset removes [trigger].", NON_EMPTY))
    model: ModelConfig = field(metadata=_meta("The base model."))
    loras: list[LoraFileConfig] = field(default_factory=list, metadata=_meta(
        "LoRA files, each rendered on its own next to the base model."))
    generate: GenerateConfig = field(metadata=_meta("Prompts, control images and sampler settings."))


ProcessConfig = Union[TrainProcessConfig, GenerateProcessConfig, CaptionProcessConfig]


@dataclass(kw_only=True)
class RootConfig:
    """The run: its name and its processes."""

    name: str = field(metadata=_meta(
        "Run name, used as output sub-folder and file prefix; replaces [name] in string values.",
        NON_EMPTY, FILE_NAME))
    process: list[ProcessConfig] = field(metadata=_meta(
        "Processes, run in order; `type` picks the kind (sd_trainer when absent).", NON_EMPTY))


@dataclass(kw_only=True)
class JobConfig:
    """A whole config file."""

    job: Literal["extension", "generate"] = field(default="extension", metadata=_meta(
        "Job kind: 'extension' (processes of any type; sd_trainer when a process has no type) or 'generate' "
        "(processes default to type generate)."))
    config: RootConfig = field(metadata=_meta("The run: name and processes."))
    meta: dict[str, Any] = field(default_factory=dict, metadata=_meta(
        "Free-form metadata kept with the outputs; not used for training."))
